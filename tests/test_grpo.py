"""GRPO (DDPO-style) on the tiny SDXL: the mean reward rises; on-policy ratios are exactly 1."""

import json

from glm_training.config import ConfigError, config_from_dict
from glm_training.trainers.grpo import GRPOTrainer

import pytest

from conftest import sdxl_config

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def grpo_config(tmp_path, prompts, **grpo):
    return sdxl_config(tmp_path, prompts,
                       training={"method": "grpo", "max_train_steps": 40, "batch_size": 8, "learning_rate": 1e-2},
                       lora={"rank": 8, "alpha": 8, "target_modules": TARGETS},
                       grpo={"num_generations": 4, "sample_steps": 6, "noise_level": 1.0, "epsilon": 0.2, **grpo},
                       reward={"rewards": {"brightness": {"weight": 1.0}}})


def test_brightness_reward_rises(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    run = GRPOTrainer(config_from_dict(grpo_config(tmp_path, prompts))).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward/total_mean"] for row in rows]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.02, (start, end)
    assert rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first update is on-policy
    assert rows[0]["clip_fraction"] == 0.0
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_grpo_config_errors(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="num_iterations"):
        GRPOTrainer(config_from_dict(grpo_config(tmp_path, prompts, num_iterations=2))).train()
