"""BAGEL's flow side on preference pairs (Diffusion-DPO): shared draws, log 2 at the start, learning."""

from __future__ import annotations

import dataclasses
import math

import torch

from glm_training.algorithms.dpo import diffusion_dpo_loss
from glm_training.config import DataConfig, config_from_dict
from glm_training.data.datasets import load_records
from glm_training.data.synthetic import make_colour_preference_pairs
from glm_training.models.base import build_family


def family_for(tmp_path, pairs_file):
    cfg = config_from_dict({
        "model": {"family": "bagel", "pretrained_model_name_or_path": "tiny:bagel", "component": "gen"},
        "data": {"path": str(pairs_file), "resolution": 16},
        "training": {"method": "dpo", "seed": 0},
        "lora": {"rank": 8, "alpha": 8},
        "logging": {"output_dir": str(tmp_path / "out"), "report_to": []},
    })
    family = build_family(cfg)
    family.setup_training()
    return family


def dpo(family, pairs, seed: int, beta: float = 1000.0):
    policy, reference = family.preference_errors({"sample": pairs}, seed)
    half = len(pairs)
    return diffusion_dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], beta)


def test_pairs_share_draws_and_start_at_log_2(tmp_path):
    pairs = load_records(DataConfig(path=make_colour_preference_pairs(tmp_path / "pairs", count=4, size=16)),
                         {"prompt", "chosen", "rejected"})
    family = family_for(tmp_path, tmp_path / "pairs" / "pairs.jsonl")
    # The same image as winner and loser: identical errors, so dropout, timestep and noise are shared.
    same = [dataclasses.replace(p, rejected=p.chosen) for p in pairs]
    policy, reference = family.preference_errors({"sample": same}, seed=3)
    torch.testing.assert_close(policy[:4], policy[4:])
    # Fresh LoRA (B = 0): policy == reference, so the loss is log 2 and the accuracy 1/2 (ties).
    loss, metrics = dpo(family, pairs, seed=3)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["implicit_acc"].item() == 0.5
    assert policy.requires_grad and not reference.requires_grad


def test_dpo_learns_the_colour_preference(tmp_path):
    pairs = load_records(DataConfig(path=make_colour_preference_pairs(tmp_path / "pairs", count=12, size=16)),
                         {"prompt", "chosen", "rejected"})
    train, held_out = pairs[:8], pairs[8:]
    family = family_for(tmp_path, tmp_path / "pairs" / "pairs.jsonl")
    params = [p for p in family.modules["bagel"].parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)

    def held_out_accuracy() -> float:
        with torch.no_grad():
            return sum(dpo(family, held_out, seed=1000 + k)[1]["implicit_acc"].item() for k in range(4)) / 4

    before = held_out_accuracy()
    for step in range(30):
        batch = [train[(2 * step + i) % len(train)] for i in range(2)]
        loss, _ = dpo(family, batch, seed=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_accuracy()
    print(f"BAGEL DPO held-out implicit accuracy {before:.2f} -> {after:.2f}")
    assert before == 0.5 and after >= 0.75, (before, after)
