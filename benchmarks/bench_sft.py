#!/usr/bin/env python
"""SFT throughput and peak memory on a tiny model, with and without the embedding cache.

    python benchmarks/bench_sft.py [--family sdxl|flux_kontext|qwen_image|glm_image] [--steps 40]
                                   [--resolution 64] [--batch-size 4]

Each variant runs in its own process (so peak memory is its own) on the same data and seed.
Reported: steps/s after a warm-up, peak memory (CUDA max allocated on GPU, max RSS on CPU),
and the ratios cached/uncached, which are comparable across machines where absolute figures are not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import torch

    from glm_training.cli import fill_cache
    from glm_training.config import config_from_dict
    from glm_training.data.synthetic import make_shapes_dataset
    from glm_training.trainers.sft import SFTTrainer

    work = Path(args.work)
    data = make_shapes_dataset(work / "data", count=32, size=args.resolution, seed=0)
    raw = {
        "model": {"family": args.family, "pretrained_model_name_or_path": f"tiny:{args.family}"},
        "data": {"path": str(data), "resolution": args.resolution},
        "training": {"max_train_steps": args.steps, "batch_size": args.batch_size,
                     "checkpointing_steps": 10_000, "seed": 0},
        "lora": {"rank": 8, "alpha": 8},
        "logging": {"output_dir": str(work / f"out-{args.variant}"), "project": "bench", "report_to": []},
        "cache": {"enabled": args.variant == "cached", "dir": str(work / "cache")},
    }
    cfg = config_from_dict(raw)
    if args.variant == "cached":
        fill_cache(cfg)
    trainer = SFTTrainer(cfg)
    trainer.setup()
    times: list[float] = []
    step = trainer.optimizer_step

    def timed_step():
        result = step()
        times.append(time.perf_counter())
        return result

    trainer.optimizer_step = timed_step
    trainer.train()
    warm = times[len(times) // 4:]  # skip warm-up steps
    steps_per_s = (len(warm) - 1) / (warm[-1] - warm[0])
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda_max_allocated_mib"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "max_rss_mib"
    print(json.dumps({"variant": args.variant, "steps_per_s": steps_per_s, "peak": peak, "peak_kind": kind}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sdxl", choices=("sdxl", "flux_kontext", "qwen_image", "glm_image"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variant", choices=("uncached", "cached"))
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        for variant in ("uncached", "cached"):
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--work", work, "--family", args.family,
                 "--steps", str(args.steps),
                 "--resolution", str(args.resolution), "--batch-size", str(args.batch_size)],
                check=True, capture_output=True, text=True, env=env)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base, cached = results["uncached"], results["cached"]
    print(f"tiny {args.family} LoRA SFT, {args.steps} steps, batch {args.batch_size}, {args.resolution}px "
          f"({base['peak_kind']})")
    for name, row in results.items():
        print(f"  {name:9s} {row['steps_per_s']:7.2f} steps/s   peak {row['peak']:8.1f} MiB")
    print(f"  cached/uncached: speed x{cached['steps_per_s'] / base['steps_per_s']:.2f}, "
          f"peak memory x{cached['peak'] / base['peak']:.2f}")


if __name__ == "__main__":
    main()
