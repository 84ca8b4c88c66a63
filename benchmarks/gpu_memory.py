#!/usr/bin/env python
"""Measured peak memory and s/step of LoRA training next to the memory planner's estimate.

    python benchmarks/gpu_memory.py                      # CUDA: real-size FLUX.1 Kontext and Qwen-Image
                                                         # transformers (random weights), 1024 px, LoRA r16,
                                                         # bf16 / fp8 / nf4 / block swap (< 8 min on one H100)
    python benchmarks/gpu_memory.py --tiny [--family sdxl --resolution 512 --batch-size 2]
                                                         # CPU: a real tiny training step (SFTTrainer), peak
                                                         # RSS above the process baseline vs the plan
    python benchmarks/gpu_memory.py --planner-table      # the README's planner table (planner only, no GPU)

GPU variants: bf16 weights; fp8 storage (diffusers `enable_layerwise_casting`, computed in bf16);
nf4 (bitsandbytes, skipped when it is not installed); block swap (diffusers block-level group
offloading: every block streamed from CPU); swap16_adamw8bit (the sd-scripts setting "16 blocks
swapped + 8-bit AdamW": our `models.offload.BlockSwap` of 16 blocks, bf16 base, and the trainer's
`optimizer.name: adamw8bit`, bitsandbytes when installed else torchao). Each variant runs in its own process. The planner's
figure is for the transformer step alone (text embeddings and latents precomputed).
On CPU the step runs in a child process with glibc's mmap threshold fixed, so freed tensors leave
the resident set and the peak RSS follows the live tensors; a warm-up run at 64 px first loads the
libraries and kernels the measured run would otherwise count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1024 ** 3


def tiny_config(family: str, work: Path, resolution: int, batch_size: int, checkpointing: bool, tag: str):
    from glm_training.config import config_from_dict
    from glm_training.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(work / f"data-{resolution}", count=max(4, batch_size), size=resolution, seed=0)
    raw = {
        "model": {"family": family, "pretrained_model_name_or_path": f"tiny:{family}",
                  "gradient_checkpointing": checkpointing},
        "data": {"path": str(data), "resolution": resolution, "shuffle": False},
        "training": {"max_train_steps": 1, "batch_size": batch_size, "checkpointing_steps": 10_000, "seed": 0},
        "lora": {"rank": 8, "alpha": 8},
        "logging": {"output_dir": str(work / f"out-{tag}"), "project": "mem", "report_to": []},
    }
    return config_from_dict(raw)


def measure_tiny(args: argparse.Namespace) -> dict:
    """Child process: peak RSS of one real SFT step above the RSS before it, and the plan."""
    from glm_training.planner import WhatIf, plan_memory
    from glm_training.trainers.sft import SFTTrainer
    from glm_training.utils.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    work = Path(args.work)
    SFTTrainer(tiny_config(args.family, work, 64, 1, args.checkpointing, "warmup")).train()
    cfg = tiny_config(args.family, work, args.resolution, args.batch_size, args.checkpointing, "run")
    gc.collect()
    baseline = current_rss_bytes()
    if not reset_peak_rss():
        raise SystemExit("this OS does not allow resetting the peak RSS (/proc/self/clear_refs)")
    started = time.perf_counter()
    run_dir = SFTTrainer(cfg).train()
    seconds = time.perf_counter() - started
    # The trainer resets the peak after logging each step (per-step peaks in metrics.jsonl): the
    # run's peak is the largest of them, or what is left since the last step.
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [row["memory/peak_rss_gb"] * 2**30 for row in rows if "memory/peak_rss_gb" in row]
    measured = max([peak_rss_bytes(), *logged]) - baseline
    plan = plan_memory(cfg, WhatIf(device="cpu"))  # CPU kernels: oneDNN convolution reorders count
    return {"family": args.family, "resolution": args.resolution, "batch_size": args.batch_size,
            "checkpointing": args.checkpointing, "measured_bytes": measured, "estimate_bytes": plan.total_bytes,
            "ratio": plan.total_bytes / measured, "seconds": seconds, "plan": plan.report()}


# -- CUDA: real-size transformers --------------------------------------------------------------------

GPU_FAMILIES = {"flux_kontext": "black-forest-labs/FLUX.1-Kontext-dev", "qwen_image": "Qwen/Qwen-Image"}


def measure_gpu(args: argparse.Namespace) -> dict:
    """Child process: LoRA steps of the real-size transformer with random weights on CUDA."""
    import torch
    from peft import LoraConfig

    from glm_training.config import config_from_dict
    from glm_training.models.base import family_class
    from glm_training.planner import (ARCHITECTURES_DIR, FAMILY_ARCHITECTURE, FAMILY_PARTS, WhatIf, _denoiser_inputs,
                                      build_meta, plan_memory)

    family, variant = args.family, args.variant
    spec = FAMILY_PARTS[family][0]
    folder = ARCHITECTURES_DIR / FAMILY_ARCHITECTURE[family]
    raw = {"model": {"family": family, "pretrained_model_name_or_path": GPU_FAMILIES[family],
                     "gradient_checkpointing": True},
           "data": {"path": "unused", "resolution": args.resolution},
           "training": {"mixed_precision": "bf16", "batch_size": args.batch_size}, "cache": {"enabled": True},
           "lora": {"rank": 16, "alpha": 16}}
    cfg = config_from_dict(raw)
    meta = build_meta(spec, folder)
    blocks = len(meta.transformer_blocks) + len(getattr(meta, "single_transformer_blocks", []))
    what_if = {"bf16": WhatIf(), "fp8": WhatIf(quantize=(("transformer", "fp8"),)),
               "nf4": WhatIf(quantize=(("transformer", "nf4"),)),
               "block_swap": WhatIf(block_swap=blocks - 2),
               "swap16_adamw8bit": WhatIf(block_swap=16, optimizer="adamw8bit")}[variant]
    plan = plan_memory(cfg, what_if)
    estimate = plan.part("transformer").device_bytes + plan.part("transformer").activation_bytes
    device = torch.device("cuda")
    cls = type(meta)
    config = dict(meta.config)
    del meta
    module = cls.from_config(config).to(torch.bfloat16)  # random weights (CPU init, then moved)
    if variant == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"family": family, "variant": variant, "skipped": "bitsandbytes not installed"}
        from accelerate.utils import BnbQuantizationConfig, load_and_quantize_model  # noqa: F401
        from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
        from diffusers import BitsAndBytesConfig

        module = replace_with_bnb_linear(module, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    module.requires_grad_(False)
    swapper = None
    if variant == "block_swap":
        module.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                    offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    else:
        module.to(device)
    if variant == "fp8":
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    targets = family_class(family).default_lora_targets["transformer"]
    module.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float().to(device)
    module.enable_gradient_checkpointing()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    if variant == "swap16_adamw8bit":
        from glm_training.models.offload import BlockSwap
        from glm_training.trainers.optim import adamw8bit_class

        blocks = list(module.transformer_blocks) + list(getattr(module, "single_transformer_blocks", []))
        swapper = BlockSwap(module, blocks, 16, device)  # as ModelFamily.setup_block_swap
        optimizer = adamw8bit_class()(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    make = _denoiser_inputs(family, module, cfg, torch.bfloat16, args.batch_size, args.resolution)

    def real(value):
        if isinstance(value, torch.Tensor):
            return (torch.randn(value.shape, device=device).to(value.dtype) if value.is_floating_point()
                    else torch.ones(value.shape, device=device, dtype=value.dtype))
        if isinstance(value, dict):
            return {k: real(v) for k, v in value.items()}
        return value

    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        inputs = real(make())
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(**inputs)[0]
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    row = {"family": family, "variant": variant, "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
           "estimate_gb": estimate / GB, "s_per_step": sum(times[1:]) / max(1, len(times) - 1)}
    if swapper is not None:
        row["optimizer"] = type(optimizer).__name__
    return row


# -- the README's planner table ------------------------------------------------------------------

TABLE_FAMILIES = [("flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev", "transformer"),
                  ("qwen_image", "Qwen/Qwen-Image", "transformer"),
                  ("glm_image", "zai-org/GLM-Image", "dit"),
                  ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "unet")]


def planner_table(resolution: int = 1024) -> list[str]:
    """Markdown rows: LoRA r16, batch 1, bf16, gradient checkpointing, embeddings and latents
    cached, AdamW; bf16 / fp8 / nf4 base, fp8 + half the blocks swapped, and fp8 + 16 blocks
    swapped + 8-bit AdamW (the sd-scripts setting)."""
    from glm_training.config import config_from_dict
    from glm_training.planner import FAMILY_PARTS, WhatIf, _swap_blocks, architecture_dir, build_meta, plan_memory

    rows = []
    for family, path, part in TABLE_FAMILIES:
        cfg = config_from_dict({"model": {"family": family, "pretrained_model_name_or_path": path,
                                          "gradient_checkpointing": True},
                                "data": {"path": "unused", "resolution": resolution},
                                "training": {"mixed_precision": "bf16", "batch_size": 1},
                                "cache": {"enabled": True}, "lora": {"rank": 16, "alpha": 16}})
        spec = next(s for s in FAMILY_PARTS[family] if s.name == part)
        blocks = len(_swap_blocks(build_meta(spec, architecture_dir(cfg)[0])))
        cells = []
        for kind in ("none", "fp8", "nf4"):
            cells.append(f"{plan_memory(cfg, WhatIf(quantize=((part, kind),))).total_gb:.1f}")
        if blocks:
            half = WhatIf(quantize=((part, "fp8"),), block_swap=blocks // 2)
            sd_scripts = WhatIf(quantize=((part, "fp8"),), block_swap=16, optimizer="adamw8bit")
            cells.append(f"{plan_memory(cfg, half).total_gb:.1f} ({blocks // 2} of {blocks})")
            cells.append(f"{plan_memory(cfg, sd_scripts).total_gb:.1f}")
        else:
            cells += ["-", "-"]
        plan = plan_memory(cfg)
        params = plan.part(part).parameters / 1e9
        rows.append(f"| {family} ({part} {params:.2f}B) | " + " | ".join(cells) + " |")
    return rows


def run_child(argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child {argv} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny models through the real trainer.")
    parser.add_argument("--family", action="append", help="Repeatable; default: all of the mode.")
    parser.add_argument("--resolution", type=int, default=None, help="Default 1024 (GPU) / 512 (tiny).")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="GPU: LoRA steps per variant (first is warm-up).")
    parser.add_argument("--checkpointing", action="store_true", help="Tiny: gradient checkpointing on.")
    parser.add_argument("--variant", action="append",
                        help="GPU: bf16, fp8, nf4, block_swap, swap16_adamw8bit (repeatable).")
    parser.add_argument("--planner-table", action="store_true", help="Print the README's planner table rows.")
    parser.add_argument("--child", choices=("tiny", "gpu"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.family = args.family[0]
        args.variant = args.variant[0] if args.variant else None
        result = measure_tiny(args) if args.child == "tiny" else measure_gpu(args)
        print(json.dumps(result))
        return
    if args.planner_table:
        print("\n".join(planner_table(args.resolution or 1024)))
        return
    rows = []
    if args.tiny:
        resolution = args.resolution or 512
        for family in args.family or ["sdxl", "flux_kontext", "qwen_image", "glm_image"]:
            with tempfile.TemporaryDirectory() as work:
                row = run_child(["--child", "tiny", "--work", work, "--family", family, "--resolution",
                                 str(resolution), "--batch-size", str(args.batch_size)]
                                + (["--checkpointing"] if args.checkpointing else []))
            rows.append(row)
            print(f"{family:<14} {resolution}px b{args.batch_size}: measured {row['measured_bytes'] / 2**20:8.1f} MiB "
                  f"(peak RSS above baseline), planner {row['estimate_bytes'] / 2**20:8.1f} MiB, "
                  f"ratio {row['ratio']:.2f}, {row['seconds']:.1f} s/step")
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on CPU")
        resolution = args.resolution or 1024
        for family in args.family or list(GPU_FAMILIES):
            for variant in args.variant or ["bf16", "fp8", "nf4", "block_swap", "swap16_adamw8bit"]:
                row = run_child(["--child", "gpu", "--family", family, "--variant", variant, "--resolution",
                                 str(resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps)])
                rows.append(row)
                if "skipped" in row:
                    print(f"{family:<14} {variant:<10} skipped: {row['skipped']}")
                    continue
                print(f"{family:<14} {variant:<10} peak {row['peak_allocated_gb']:6.2f} GiB  planner "
                      f"{row['estimate_gb']:6.2f} GiB  {row['s_per_step']:.2f} s/step")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
