#!/usr/bin/env python
"""DiffusionNFT vs Flow-GRPO on the tiny FLUX.1 Kontext (CPU): reward per generated image.

    python benchmarks/rl_compare.py [--steps 50] [--seed 0] [--nft-lr 3e-2] [--out DIR]

Both runs use the setting of the Flow-GRPO learning test (tests/test_flow_rl.py): 16 px, the
brightness reward, 4 prompts, 8 images per optimizer step (2 prompts x num_generations 4),
4 sampling steps, LoRA rank 8 on the same modules, the same training seed and prompt order.
Flow-GRPO keeps its tuned settings (SDE noise level 0.9, clip 1e-4, lr 3e-2); DiffusionNFT samples
with the old policy's ODE and trains `nft.timesteps_per_sample` noised copies of each image.
Printed: the rollout reward (mean of the 8 images of each step, averaged over a window) against
the number of images generated, the ODE evaluation (same 4 prompts, fixed noise) at the start
and at the end, and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
# The attention projections plus the output projections (as the GRPO learning test trains).
TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
           "attn.add_v_proj", "attn.to_add_out", "proj_mlp", "proj_out"]


def base_config(out: Path, prompts: Path, method: str, steps: int, seed: int) -> dict:
    return {
        "model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext",
                  "max_sequence_length": 32},
        "data": {"path": str(prompts), "resolution": 16},
        "training": {"method": method, "max_train_steps": steps, "batch_size": 8, "learning_rate": 3e-2,
                     "checkpointing_steps": 100_000, "seed": seed},
        "lora": {"rank": 8, "alpha": 8, "target_modules": TARGETS},
        "grpo": {"num_generations": 4, "sample_steps": 4, "eval_steps": 8},
        "reward": {"rewards": {"brightness": {"weight": 1.0}}},
        "logging": {"output_dir": str(out), "project": method, "report_to": [], "sample_steps": 100_000},
    }


def configs(out: Path, prompts: Path, steps: int, seed: int, nft_lr: float) -> dict[str, dict]:
    grpo = base_config(out, prompts, "grpo", steps, seed)
    grpo["grpo"].update(noise_level=0.9, epsilon=1e-4)  # the Flow-GRPO test's tuned settings
    nft = base_config(out, prompts, "nft", steps, seed)
    nft["training"]["learning_rate"] = nft_lr
    nft["nft"] = {"beta": 1.0, "timesteps_per_sample": 2, "decay_schedule": "linear_to_0.5"}
    return {"Flow-GRPO": grpo, "DiffusionNFT": nft}


def run(raw: dict) -> dict:
    from glm_training.config import config_from_dict
    from glm_training.trainers.grpo import GRPOTrainer
    from glm_training.trainers.nft import NFTTrainer

    trainer = (NFTTrainer if raw["training"]["method"] == "nft" else GRPOTrainer)(config_from_dict(raw))
    started = time.time()
    trainer.setup()
    eval_before = trainer.evaluate(0)["eval/reward/total_mean"]
    run_dir = trainer.train()
    wall = time.time() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row["reward/total_mean"] for row in rows if "reward/total_mean" in row]
    evals = [row["eval/reward/total_mean"] for row in rows if "eval/reward/total_mean" in row]
    return {"rewards": train, "eval_before": eval_before, "eval_after": evals[-1], "wall_s": wall,
            "images_per_step": raw["training"]["batch_size"]}


def window_means(values: list[float], width: int) -> list[tuple[int, float]]:
    """(last step of the window, mean reward of its steps) for consecutive windows."""
    return [(start + len(values[start:start + width]), sum(values[start:start + width]) / len(values[start:start + width]))
            for start in range(0, len(values), width)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps of each run (4: a quick check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nft-lr", type=float, default=3e-2)
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import logging

    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or tempfile.mkdtemp(prefix="rl_compare_"))
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    results = {name: run(raw) for name, raw in configs(out, prompts, args.steps, args.seed, args.nft_lr).items()}

    width = max(1, args.steps // 5)
    names = list(results)
    print(f"\nrollout reward (brightness, mean over windows of {width} steps) vs images generated")
    print(f"{'images':>8}  " + "  ".join(f"{n:>12}" for n in names))
    curves = {n: window_means(r["rewards"], width) for n, r in results.items()}
    for i, (step, _) in enumerate(curves[names[0]]):
        images = step * results[names[0]]["images_per_step"]
        print(f"{images:>8}  " + "  ".join(f"{curves[n][i][1]:>12.4f}" for n in names))
    print()
    for name, r in results.items():
        first, last = curves[name][0][1], curves[name][-1][1]
        print(f"{name:>12}: rollout {first:.4f} -> {last:.4f} ({last - first:+.4f}); ODE eval "
              f"{r['eval_before']:.4f} -> {r['eval_after']:.4f} ({r['eval_after'] - r['eval_before']:+.4f}); "
              f"{len(r['rewards'])} steps, {len(r['rewards']) * r['images_per_step']} images, "
              f"wall {r['wall_s']:.1f} s")
    print(f"(run folders: {out})")


if __name__ == "__main__":
    main()
