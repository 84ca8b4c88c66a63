"""DDP vs FSDP2 vs DeepSpeed ZeRO-2, one process each, on a real-width FLUX Kontext block stack.

Each strategy runs LoRA training steps in its own `torchrun --nproc_per_node=N` launch through the
project's `make_accelerator` (the same wiring as `train.py`: ACCELERATE_USE_FSDP for FSDP2,
`distributed.deepspeed: zero2` for ZeRO-2), on a random-weight FluxTransformer2DModel built from
glm_training/models/architectures/flux_kontext/transformer/config.json with fewer blocks (no
download). Prints peak memory and s/step per strategy and the ratio to DDP.

    benchmarks/gpu_distributed.sh                 # one CUDA GPU, real width (< 5 min on an H100)
    benchmarks/gpu_distributed.sh --tiny          # CPU check that the script works (the test suite)

With one process FSDP / ZeRO-2 have no other rank to shard over: the numbers show their fixed
overhead against DDP; with N GPUs (--nproc N) the optimizer state (ZeRO-2) and the parameters
(FSDP) are split N ways.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "glm_training" / "models" / "architectures" / "flux_kontext" / "transformer" / "config.json"
STRATEGIES = ("ddp", "fsdp", "zero2")
#: --tiny: the real config's structure at a width a CPU trains in a second.
TINY = {"attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
        "in_channels": 16, "axes_dims_rope": [4, 6, 6]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="A tiny width on the CPU: checks the script works.")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="Comma-separated subset of ddp,fsdp,zero2.")
    parser.add_argument("--nproc", type=int, default=1, help="Processes (GPUs) per strategy.")
    parser.add_argument("--double-blocks", type=int, default=None, help="FluxTransformerBlocks (default 2; tiny 1).")
    parser.add_argument("--single-blocks", type=int, default=None, help="FluxSingleTransformerBlocks (default 4; tiny 1).")
    parser.add_argument("--image-tokens", type=int, default=None,
                        help="Image + control tokens (default 2048: 512 px, Kontext; tiny 16).")
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512; tiny 8).")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 10; tiny 2) after 2 warm-up steps.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"double_blocks": (2, 1), "single_blocks": (4, 1), "image_tokens": (2048, 16), "text_tokens": (512, 8),
                "steps": (10, 2)}
    for name, (real, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else real)
    return args


def build_model(args: argparse.Namespace, device, dtype):
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    config = json.loads(ARCHITECTURE.read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(num_layers=args.double_blocks, num_single_layers=args.single_blocks, **(TINY if args.tiny else {}))
    torch.manual_seed(0)
    with torch.device(device):  # random weights made in place: no 20 GB round trip through the CPU
        model = FluxTransformer2DModel(**config).to(dtype)
    model.requires_grad_(False)
    # The family's LoRA targets (attention projections); the adapter weights stay fp32.
    model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, config


def worker(args: argparse.Namespace) -> None:
    """One strategy, every rank; rank 0 writes the figures to --result."""
    import torch

    from glm_training.config import config_from_dict
    from glm_training.trainers.base import make_accelerator
    from glm_training.utils.memory import memory_stats

    cuda = torch.cuda.is_available() and not args.tiny
    precision = "bf16" if cuda else "no"
    cfg = config_from_dict({
        "model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext"},
        "data": {"path": str(REPO / "data" / "quickstart")},
        "training": {"batch_size": args.batch_size, "mixed_precision": precision, "max_grad_norm": 1.0},
        "distributed": {"deepspeed": "zero2" if args.worker == "zero2" else "none"}})
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    memory_stats(device)  # the peak from here on
    model, config = build_model(args, device, torch.bfloat16 if cuda else torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)

    generator = torch.Generator().manual_seed(accelerator.process_index)
    batch = args.batch_size

    def inputs():
        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device)

        side = max(1, int(args.image_tokens ** 0.5))
        index = torch.arange(args.image_tokens)
        img_ids = torch.stack([torch.zeros_like(index), index // side, index % side], -1).float().to(device)
        return {"hidden_states": rand(batch, args.image_tokens, config["in_channels"]),
                "encoder_hidden_states": rand(batch, args.text_tokens, config["joint_attention_dim"]),
                "pooled_projections": rand(batch, config["pooled_projection_dim"]),
                "timestep": torch.rand(batch, generator=generator).to(device),
                "guidance": torch.full((batch,), 3.5, device=device),
                "img_ids": img_ids, "txt_ids": torch.zeros(args.text_tokens, 3, device=device)}

    def step() -> float:
        x = inputs()
        with accelerator.autocast():
            out = model(**x, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), x["hidden_states"].float())  # a flow-matching-sized loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):  # warm-up: allocator, kernels, DeepSpeed buffers
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    stats = memory_stats(device, reset=False)
    peak = stats.get("memory/peak_allocated_gb", stats.get("memory/peak_rss_gb"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and args.result:
        params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        Path(args.result).write_text(json.dumps({
            "strategy": args.worker, "distributed_type": accelerator.distributed_type.value,
            "processes": accelerator.num_processes, "device": str(device), "peak_gb": peak,
            "memory": "peak allocated (CUDA)" if cuda else "peak RSS (CPU)", "s_per_step": seconds,
            "loss": losses[-1], "trainable": sum(p.numel() for p in trainable), "params_rank0": params}))


def run_strategy(args: argparse.Namespace, strategy: str, folder: Path) -> dict:
    result = folder / f"{strategy}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", strategy, "--result", str(result),
               "--double-blocks", str(args.double_blocks), "--single-blocks", str(args.single_blocks),
               "--image-tokens", str(args.image_tokens), "--text-tokens", str(args.text_tokens),
               "--batch-size", str(args.batch_size), "--lora-rank", str(args.lora_rank), "--steps", str(args.steps)]
    if args.tiny:
        command.append("--tiny")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(name, None)
    if strategy == "fsdp":  # what accelerate launch --config_file configs/accelerate/fsdp.yaml exports
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=folder)
    if done.returncode != 0 or not result.is_file():
        return {"strategy": strategy, "error": (done.stderr or done.stdout)[-2500:]}
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        print(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(STRATEGIES)}", file=sys.stderr)
        return 2
    if not args.tiny and not torch.cuda.is_available():
        print("No CUDA GPU: run with --tiny on the CPU (a check that the script works), or on a GPU machine.",
              file=sys.stderr)
        return 2
    rows, skipped = [], []
    if "zero2" in strategies and importlib.util.find_spec("deepspeed") is None:
        skipped.append("zero2: deepspeed is not installed (pip install -e '.[deepspeed]'); the rest runs")
        strategies.remove("zero2")
    if "fsdp" in strategies and args.tiny and args.nproc < 2 and not torch.cuda.is_available():
        # accelerate turns FSDP on only for accelerator devices; the trainer runs torch's fully_shard
        # on CPU ranks only with 2+ processes (tests/test_fsdp.py).
        skipped.append("fsdp: on the CPU the trainer runs FSDP with 2+ processes only (--nproc 2)")
        strategies.remove("fsdp")
    width = "tiny" if args.tiny else "real-width"
    print(f"{width} FLUX Kontext stack: {args.double_blocks} double + {args.single_blocks} single blocks, "
          f"{args.image_tokens} image + {args.text_tokens} text tokens, batch {args.batch_size}, LoRA rank "
          f"{args.lora_rank}, {args.nproc} process(es), {args.steps} timed steps", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for strategy in strategies:
            started = time.time()
            row = run_strategy(args, strategy, Path(folder))
            row["wall_s"] = time.time() - started
            rows.append(row)
            if "error" in row:
                print(f"{strategy}: FAILED\n{row['error']}", flush=True)
    reference = next((r for r in rows if r["strategy"] == "ddp" and "error" not in r), None)
    print(f"{'strategy':10s} {'accelerate':12s} {'peak GB':>9s} {'s/step':>9s} {'mem/DDP':>8s} {'time/DDP':>9s}")
    for row in rows:
        if "error" in row:
            continue
        ratio_mem = row["peak_gb"] / reference["peak_gb"] if reference else float("nan")
        ratio_time = row["s_per_step"] / reference["s_per_step"] if reference else float("nan")
        print(f"{row['strategy']:10s} {row['distributed_type']:12s} {row['peak_gb']:9.3f} {row['s_per_step']:9.4f} "
              f"{ratio_mem:8.3f} {ratio_time:9.3f}")
    if rows and "error" not in rows[0]:
        print(f"memory: {rows[0]['memory']}; trainable {rows[0]['trainable']:,} of {rows[0]['params_rank0']:,} "
              f"parameters", flush=True)
    for line in skipped:
        print(f"skipped {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
