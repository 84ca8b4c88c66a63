"""GRPO num_iterations on the tiny SDXL: one rollout trains several optimizer steps (the ratio
leaves 1 and the clip acts after the first), resume inside a block is exact; full fine-tuning
gets a frozen-copy reference (KL 0 at the start)."""

import pytest

from glm_training.config import config_from_dict
from glm_training.trainers.grpo import BUFFER_FILE, GRPOTrainer

from test_grpo import grpo_config, prompts_file, read_rows


def test_num_iterations_reuse_the_rollout_and_the_clip_acts(tmp_path):
    # 4 prompts, 2 per micro-batch: 2 rollout blocks per epoch, each trained for 2 optimizer steps.
    raw = grpo_config(tmp_path, prompts_file(tmp_path), training={"max_train_steps": 4}, num_iterations=2,
                      epsilon=1e-4, sample_steps=4, eval_steps=2)
    run = GRPOTrainer(config_from_dict(raw)).train()
    rows = [row for row in read_rows(run) if "loss" in row]
    assert [row["iteration"] for row in rows] == [0, 1, 0, 1]
    for first, second in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert first["ratio_mean"] == 1.0 and first["clip_fraction"] == 0.0  # on-policy: exactly 1
        assert second["ratio_min"] != 1.0 or second["ratio_max"] != 1.0  # the policy moved since the rollout
        assert second["clip_fraction"] > 0  # and with a tiny epsilon the clip acts
        assert second["reward/total_mean"] == first["reward/total_mean"]  # same rollout, same rewards
    assert rows[2]["reward/total_mean"] != rows[0]["reward/total_mean"]  # a new block samples anew


def test_num_iterations_resume_mid_block_is_exact(tmp_path):
    prompts = prompts_file(tmp_path)
    raw = grpo_config(tmp_path / "a", prompts, training={"max_train_steps": 4, "checkpointing_steps": 3},
                      num_iterations=2, beta=0.01, sample_steps=4, eval_steps=2)
    full = GRPOTrainer(config_from_dict(raw)).train()
    checkpoint = full / "checkpoint-3"  # after iteration 0 of the second block
    assert (checkpoint / BUFFER_FILE.format(rank=0)).is_file()
    assert not (full / "checkpoint-4" / BUFFER_FILE.format(rank=0)).exists()  # block complete: no buffer
    # Resume from step 3 in a fresh trainer: step 4 trains on the stored rollout.
    raw_resume = grpo_config(tmp_path / "a", prompts, training={
        "max_train_steps": 4, "checkpointing_steps": 3, "resume_from_checkpoint": str(checkpoint)},
        num_iterations=2, beta=0.01, sample_steps=4, eval_steps=2)
    resumed = GRPOTrainer(config_from_dict(raw_resume)).train()
    assert resumed == full
    rows = [row for row in read_rows(full) if "loss" in row]
    unbroken, again = rows[3], rows[-1]
    assert again["step"] == unbroken["step"] == 4
    for key in ("loss", "ratio_mean", "clip_fraction", "kl", "reward/total_mean"):
        assert again[key] == pytest.approx(unbroken[key], rel=1e-5, abs=1e-7), key



def test_full_fine_tuning_kl_reference_is_a_frozen_copy(tmp_path):
    raw = grpo_config(tmp_path, prompts_file(tmp_path), training={"max_train_steps": 2, "learning_rate": 1e-3},
                      beta=0.04, sample_steps=3, eval_steps=2)
    raw["lora"] = {"enabled": False}
    trainer = GRPOTrainer(config_from_dict(raw))
    run = trainer.train()
    rows = [row for row in read_rows(run) if "loss" in row]
    assert rows[0]["kl"] == 0.0  # policy == its frozen copy before the first update
    assert rows[1]["kl"] > 0  # the copy did not follow the update
    reference = trainer.family._reference_modules["unet"]
    assert not any(p.requires_grad for p in reference.parameters())
