"""DPO with full fine-tuning (frozen-copy reference) and with online pairs (sample, score, best vs
worst) on the tiny SDXL."""

import json
import logging
import math

import pytest
import torch

from glm_training.config import ConfigError, DataConfig, config_from_dict
from glm_training.data.synthetic import make_colour_preference_pairs
from glm_training.data.datasets import load_records
from glm_training.trainers.dpo import DPOTrainer, OnlinePairSource

from conftest import sdxl_config


def test_full_fine_tuning_reference_is_a_frozen_copy(tmp_path, caplog):
    pairs = make_colour_preference_pairs(tmp_path / "train", count=4, size=32, seed=0)
    raw = sdxl_config(tmp_path, pairs, training={"method": "dpo", "max_train_steps": 2, "batch_size": 2,
                                                 "learning_rate": 1e-4},
                      lora={"enabled": False}, dpo={"beta": 2000.0})
    trainer = DPOTrainer(config_from_dict(raw))
    with caplog.at_level(logging.WARNING):
        trainer.setup()
    assert any("frozen reference is a copy of unet" in r.message and "GB" in r.message for r in caplog.records)
    held_out = load_records(DataConfig(path=pairs), {"prompt", "chosen", "rejected"})
    before = trainer.evaluate(held_out, draws=2)
    # policy == reference. A separate copy is not bit-identical in its arithmetic (CPU kernels round
    # differently for some inputs, ~6e-8 in one MSE; LoRA's disabled adapter is the same module and is
    # exact, see test_dpo.py), so compare to float tolerance rather than exactly.
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert before["policy_mse_gap"] == pytest.approx(before["ref_mse_gap"], abs=1e-7)
    assert abs(before["reward_margin"]) < 1e-3
    reference = trainer.family._reference_modules["unet"]
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    trainer.train()
    after = trainer.evaluate(held_out, draws=2)
    assert after["loss"] != pytest.approx(math.log(2), abs=1e-6)  # the policy moved away from it
    for key, value in reference.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # the reference did not move
    policy = trainer.family.unwrapped("unet")
    assert any(not torch.equal(p, frozen[k]) for k, p in policy.state_dict().items())


def test_online_pairs_prefer_the_higher_reward(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    raw = sdxl_config(tmp_path, prompts, training={"method": "dpo", "max_train_steps": 3, "batch_size": 2,
                                                   "learning_rate": 1e-3},
                      dpo={"beta": 2000.0, "online": True, "num_generations": 3, "sample_steps": 3},
                      reward={"rewards": {"brightness": {"weight": 1.0}}})
    trainer = DPOTrainer(config_from_dict(raw))
    run = trainer.train()
    source = trainer.pair_source
    assert isinstance(source, OnlinePairSource) and source.last_scores
    for chosen, rejected in source.last_scores:
        assert chosen > rejected
    # The pair images are on disk, and their recorded rewards match what the reward gives them.
    folder = run / "online_pairs" / "rank0" / "step-000002"
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    from PIL import Image
    import numpy as np

    for row in rows:
        chosen = np.asarray(Image.open(folder / row["chosen"]), dtype=np.float32).mean() / 255
        rejected = np.asarray(Image.open(folder / row["rejected"]), dtype=np.float32).mean() / 255
        assert chosen > rejected
        assert max(row["rewards"]) == pytest.approx(chosen, abs=2e-3)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(logged) == 3
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy == reference
    assert all(row["online/reward_chosen"] > row["online/reward_rejected"] for row in logged)


def test_online_dpo_needs_rewards(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    raw = sdxl_config(tmp_path, prompts, training={"method": "dpo"}, dpo={"online": True})
    with pytest.raises(ConfigError, match="reward.rewards"):
        DPOTrainer(config_from_dict(raw)).setup()


@pytest.mark.parametrize("name", ["sdxl_dpo", "sdxl_grpo", "flux_kontext_dpo", "flux_kontext_grpo",
                                  "qwen_image_edit_grpo", "glm_image_grpo"])
def test_example_configs_are_valid(name):
    from conftest import REPO
    from glm_training.config import load_config
    from glm_training.rewards.calculator import resolve_weights

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.training.method in ("dpo", "grpo")
    if cfg.training.method == "grpo":
        weights = resolve_weights(cfg.to_dict()["reward"], cfg.model.component)
        assert sum(weights.values()) > 0
    if name == "glm_image_grpo":
        assert {k: v["weight"] for k, v in cfg.reward.rewards.items()} == {"lpips": 0.4, "aesthetic": 0.3, "ocr": 0.3}
        assert (cfg.grpo.num_generations, cfg.grpo.beta, cfg.grpo.epsilon) == (4, 0.05, 0.2)
        assert set(cfg.reward.weights) == {"ar", "dit"}
