"""training.ema wired into the trainers (issue 16, item 5) on the toy family: decay 0 equals the raw
weights; the averages follow diffusers' EMAModel recurrence on the weights after each optimizer
step; evaluation uses them; final/ema/ loads; a resumed run continues the averages exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import train_sft
from toy_family import toy_config

from glm_training.config import ConfigError, config_from_dict
from glm_training.data.synthetic import make_shapes_dataset
from glm_training.evaluation import validation
from glm_training.trainers.sft import SFTTrainer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("ema_shapes") / "data", count=8, size=16)


def ema_raw(tmp_path: Path, shapes: Path, ema: dict | None, **training) -> dict:
    return toy_config(tmp_path, shapes, "sft", training={"max_train_steps": 6, "batch_size": 2, "ema": ema,
                                                         **training})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_decay_zero_equals_the_raw_weights(tmp_path, shapes):
    run_dir = SFTTrainer(config_from_dict(ema_raw(tmp_path, shapes, {"decay": 0.0}))).train()
    raw, ema = load_file(run_dir / "final" / "net.safetensors"), load_file(run_dir / "final" / "ema" / "net.safetensors")
    assert raw.keys() == ema.keys()
    for key in raw:  # EMAModel computes s - (1 - 0) * (s - p): p up to one rounding
        torch.testing.assert_close(ema[key], raw[key], rtol=0, atol=1e-7)
    assert (run_dir / "checkpoint-6" / "ema.safetensors").is_file()


def test_ema_follows_the_recurrence_and_is_what_evaluation_uses(tmp_path, shapes):
    decay, after = 0.8, 1
    trainer = SFTTrainer(config_from_dict(ema_raw(tmp_path, shapes, {"decay": decay, "update_after_step": after})))
    trainer.setup()
    history = []  # the raw weights after every optimizer step
    step = trainer.optimizer_step

    def recording_step():
        norm = step()
        history.append({k: v.detach().clone() for k, v in validation.trainable_parameters(trainer.family).items()})
        return norm

    trainer.optimizer_step = recording_step
    run_dir = trainer.train()
    # diffusers' EMAModel: step k uses decay 0 while k <= update_after_step + 1, then
    # min(decay, (1 + n) / (10 + n)) with n = k - update_after_step - 1.
    expected = None
    for k, weights in enumerate(history, start=1):
        n = k - after - 1
        d = 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))
        expected = {key: w.clone() for key, w in weights.items()} if expected is None else {
            key: expected[key] - (1 - d) * (expected[key] - w) for key, w in weights.items()}
    averages = trainer.ema.averages()
    for key in expected:
        torch.testing.assert_close(averages[key], expected[key], rtol=0, atol=1e-6)
    saved = load_file(run_dir / "final" / "ema" / "net.safetensors")
    for key, value in saved.items():
        torch.testing.assert_close(value, expected[f"net.{key}"], rtol=0, atol=1e-6)
    assert not same(saved, load_file(run_dir / "final" / "net.safetensors"))
    # Samples and evaluation see the averages; the raw weights are back afterwards.
    raw = {k: v.clone() for k, v in validation.trainable_parameters(trainer.family).items()}
    with validation.weights(trainer):
        inside = validation.trainable_parameters(trainer.family)
        assert all(torch.equal(inside[k], averages[k].to(inside[k])) for k in inside)
    assert same(raw, {k: v.detach() for k, v in validation.trainable_parameters(trainer.family).items()})


run = train_sft


def test_ema_resume_is_exact(tmp_path, shapes):
    ema = {"decay": 0.9, "update_after_step": 1, "device": "same"}
    straight = run(ema_raw(tmp_path / "a", shapes, ema, checkpointing_steps=3)).run_dir
    broken = ema_raw(tmp_path / "b", shapes, ema, checkpointing_steps=3)
    first = run(broken, stop_at=3).run_dir
    assert not (first / "final").exists()
    broken["training"]["resume_from_checkpoint"] = "latest"
    assert run(broken).run_dir == first
    for name in ("checkpoint-6/ema.safetensors", "final/ema/net.safetensors", "final/net.safetensors"):
        assert same(load_file(straight / name), load_file(first / name)), name
    state = load_file(first / "checkpoint-6" / "ema.safetensors")
    assert int(state["optimization_step"]) == 6


def test_resuming_with_ema_from_a_checkpoint_without_it_is_refused(tmp_path, shapes):
    raw = ema_raw(tmp_path, shapes, None, max_train_steps=2)
    run_dir = run(raw).run_dir
    raw["training"].update({"ema": {"decay": 0.9}, "resume_from_checkpoint": str(run_dir / "checkpoint-2"),
                            "max_train_steps": 3})
    with pytest.raises(ConfigError, match="training.resume_from_checkpoint.*training.ema"):
        run(raw)
    assert json.loads((run_dir / "checkpoint-2" / "eval_state.json").read_text())["last_step"] is None
