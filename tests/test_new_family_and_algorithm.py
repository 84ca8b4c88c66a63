"""The claim "a new family is one file plus a tiny builder, a new algorithm is one trainer": a
throwaway family and a throwaway algorithm defined here, with no edit of glm_training/, train
with SFT, DPO and GRPO through the shipped trainers (and the new trainer through the shipped base).

The family (tests/toy_family.py) is a small pure-torch flow denoiser that implements only the
declared denoiser hooks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_family import logged, toy_config

from glm_training.config import config_from_dict
from glm_training.data.synthetic import make_colour_preference_pairs, make_shapes_dataset
from glm_training.parts.denoiser import denoising_errors
from glm_training.trainers.base import BaseTrainer
from glm_training.trainers.dpo import DPOTrainer
from glm_training.trainers.grpo import GRPOTrainer
from glm_training.trainers.sft import SFTTrainer

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("toy_shapes") / "data", count=8, size=16)


def test_a_family_defined_outside_the_package_trains_with_sft(tmp_path, shapes):
    trainer = SFTTrainer(config_from_dict(toy_config(tmp_path, shapes, "sft")))
    run_dir = trainer.train()
    rows = logged(run_dir)
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (run_dir / "final" / "net.safetensors").is_file()
    assert [part.kind for part in trainer.parts] == ["denoiser"]


def test_the_same_family_trains_with_dpo_and_its_reference_is_the_start(tmp_path):
    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=8, size=16)
    trainer = DPOTrainer(config_from_dict(toy_config(tmp_path, pairs, "dpo", dpo={"beta": 100.0})))
    trainer.setup()
    first = trainer.evaluate(trainer.pairs, draws=1)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference: log 2
    trainer.train()
    rows = logged(trainer.run_dir)
    assert len(rows) == 6 and all("implicit_acc" in r for r in rows)


def test_the_same_family_trains_with_grpo_and_a_reward_moves(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(4)))
    raw = toy_config(tmp_path, prompts, "grpo", grpo={"num_generations": 4, "sample_steps": 3, "eval_steps": 3,
                                                      "epsilon": 0.2, "noise_level": 0.7},
                     reward={"rewards": {"brightness": {"weight": 1.0}}})
    trainer = GRPOTrainer(config_from_dict(raw))
    rows = logged(trainer.train())
    assert len(rows) == 6
    assert rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0  # first iteration on-policy
    assert all(r["reward/brightness_mean"] == r["reward/total_mean"] for r in rows)


class ChosenOnlySFT(BaseTrainer):
    """A throwaway algorithm: SFT on the preferred image of each pair, weighted by how much
    worse the rejected one is denoised (a toy "margin-weighted SFT"). It reuses the parts' data
    and denoising helpers; no other trainer is edited."""

    method = "chosen_sft"
    needs_attribute = "preference_needs"

    def build_dataset(self, records):
        self.family.prepare(records)
        self.pairs = records
        return self.family.dataset(records, "pairs")

    def compute_loss(self, batch):
        (part,) = self.parts
        pairs = [self.pairs[i] for i in batch["index"]]
        latents, condition, noise, timesteps = part.pair_inputs(batch, self.epoch, pairs)
        errors = denoising_errors(part, latents, condition, noise, timesteps)
        half = len(errors) // 2
        weight = torch.sigmoid(errors[half:] - errors[:half]).detach()
        loss = (weight * errors[:half]).mean()
        return loss, {"loss": loss.item(), "weight_mean": weight.mean().item()}


def chosen_errors(trainer: ChosenOnlySFT) -> float:
    """Denoising error of the preferred images at fixed noise and timesteps (epochs 0-3)."""
    from glm_training.data.datasets import collate

    (part,) = trainer.parts
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    with torch.no_grad():
        errors = [denoising_errors(part, *part.pair_inputs(batch, epoch, trainer.pairs))[: len(trainer.pairs)].mean()
                  for epoch in range(4)]
    return float(sum(errors) / 4)


def test_a_new_algorithm_is_one_trainer_on_the_parts(tmp_path):
    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=8, size=16)
    trainer = ChosenOnlySFT(config_from_dict(toy_config(tmp_path, pairs, "dpo", training={"max_train_steps": 40})))
    trainer.setup()
    before = chosen_errors(trainer)
    rows = logged(trainer.train())
    assert len(rows) == 40 and all(0 < r["weight_mean"] < 1 for r in rows)
    assert chosen_errors(trainer) < 0.9 * before
