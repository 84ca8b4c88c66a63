"""Pluggable rewards for GRPO-style training.

A reward maps a batch (`RewardInputs`: images in [0, 1], prompts, optional target/source images
and metadata) to B float scores, larger is better. Rewards are chosen by name in the `reward:`
section of the YAML and combined by `RewardCalculator` into a weighted sum, optionally with
per-component weights (GLM-Image `ar` / `dit`). See `calculator.py` for the YAML shape.

Built-in types (options in each class's docstring):
    brightness, color, jpeg_compressibility, jpeg_incompressibility   (simple.py)
    lpips, ssim                                                        (similarity.py)
    ocr                                                                (ocr.py)
    clip_score, aesthetic                                              (clip.py)
    http, python:package.module:function                               (external.py)
A new reward is one class decorated with `@register_reward("name")`, or a plain function named
with `python:`.
"""

from glm_training.rewards.base import (
    Reward,
    RewardError,
    RewardInputs,
    available_rewards,
    build_reward,
    register_reward,
)
from glm_training.rewards.calculator import RewardCalculator, build_reward_calculator, resolve_weights

__all__ = [
    "Reward",
    "RewardCalculator",
    "RewardError",
    "RewardInputs",
    "available_rewards",
    "build_reward",
    "build_reward_calculator",
    "register_reward",
    "resolve_weights",
]
