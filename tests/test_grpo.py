"""GRPO (DDPO-style) on the tiny SDXL: the mean reward rises; on-policy ratios are exactly 1; ODE
evaluation is logged and saved with each image's rewards; groups stay on one rank."""

import json

import pytest
import torch

from glm_training.config import ConfigError, config_from_dict
from glm_training.data.datasets import ShardedBatchSampler, collate
from glm_training.trainers.grpo import GRPOTrainer

from conftest import sdxl_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
PROMPTS = "a red circle\na blue square\na green triangle\na yellow star\n"


def grpo_config(tmp_path, prompts, training=None, **grpo):
    return sdxl_config(tmp_path, prompts,
                       training={"method": "grpo", "max_train_steps": 40, "batch_size": 8, "learning_rate": 1e-2,
                                 **(training or {})},
                       lora={"rank": 8, "alpha": 8, "target_modules": TARGETS},
                       grpo={"num_generations": 4, "sample_steps": 6, "noise_level": 1.0, "epsilon": 0.2,
                             "eval_steps": 8, **grpo},
                       reward={"rewards": {"brightness": {"weight": 1.0}}})


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    return prompts


def test_brightness_reward_rises(tmp_path):
    raw = grpo_config(tmp_path, prompts_file(tmp_path))
    raw["logging"]["sample_steps"] = 20
    run = GRPOTrainer(config_from_dict(raw)).train()
    rows = read_rows(run)
    train = [row for row in rows if "reward/total_mean" in row]
    rewards = [row["reward/total_mean"] for row in train]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.02, (start, end)
    assert train[0]["ratio_mean"] == 1.0 and train[0]["ratio_min"] == 1.0 == train[0]["ratio_max"]  # on-policy
    assert train[0]["clip_fraction"] == 0.0
    for key in ("reward/brightness_mean", "reward/brightness_std", "reward/total_std", "zero_std_fraction",
                "loss", "clip_fraction"):
        assert key in train[0]
    # ODE evaluation at steps 20 and 40, with the rewards of each image under it in the grids.
    evals = [row for row in rows if "eval/reward/total_mean" in row]
    assert [row["step"] for row in evals] == [20, 40]
    assert evals[-1]["eval/reward/total_mean"] > evals[0]["eval/reward/total_mean"] - 0.05
    for name in ("step-000040.png", "rollout-step-000040.png"):
        assert (run / "samples" / name).is_file()
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_groups_stay_on_one_rank(tmp_path):
    """2 simulated ranks: each gets whole prompts and samples all G members itself, so its group
    statistics (zero-mean advantages per group) need nothing from the other rank."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
    trainer = GRPOTrainer(config_from_dict(grpo_config(tmp_path, prompts, sample_steps=3)))
    trainer.setup()
    per_rank = trainer.dataset_items_per_batch()
    assert per_rank == 2  # batch_size 8 / num_generations 4
    ranks = [list(ShardedBatchSampler(8, per_rank, 2, r, seed=0)) for r in (0, 1)]
    for batch0, batch1 in zip(*ranks):
        assert not set(batch0) & set(batch1) and len(set(batch0) | set(batch1)) == 2 * per_rank
    batch = collate([trainer.dataset[i] for i in ranks[1][0]])
    rollout = trainer.make_rollout(batch)
    assert rollout.indices == ranks[1][0]
    advantages = rollout.advantages["unet"].view(per_rank, 4)  # prompt-major: one row per prompt's group
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(per_rank), atol=1e-5)
    assert rollout.records["unet"].trajectory.final.shape[0] == per_rank * 4


def test_grpo_config_errors(tmp_path):
    prompts = prompts_file(tmp_path)
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        config_from_dict(grpo_config(tmp_path, prompts, training={"batch_size": 6}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):  # too few prompts for one block
        GRPOTrainer(config_from_dict(grpo_config(tmp_path, prompts, num_iterations=2, training={
            "gradient_accumulation_steps": 4}))).setup()
