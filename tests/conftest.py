"""Shared fixtures: tiny models built once per session, small datasets, config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def tiny_model_dir(tmp_path_factory):
    """Tiny models are built into a per-session folder (unless the caller chose one)."""
    if "GLM_TRAINING_TINY_DIR" not in os.environ:
        os.environ["GLM_TRAINING_TINY_DIR"] = str(tmp_path_factory.mktemp("tiny_models"))
    return Path(os.environ["GLM_TRAINING_TINY_DIR"])


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    from glm_training.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), count=8, size=32, seed=0)


def sdxl_config(tmp_path: Path, data_path: Path, **sections) -> dict:
    """A small SDXL LoRA SFT config as a dict; `sections` update it section by section."""
    raw = {
        "model": {"family": "sdxl", "pretrained_model_name_or_path": "tiny:sdxl"},
        "data": {"path": str(data_path), "resolution": 32},
        "training": {"max_train_steps": 4, "batch_size": 2, "learning_rate": 1e-3,
                     "checkpointing_steps": 100, "seed": 0},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "test", "report_to": ["tensorboard"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


# -- helpers shared by the flow-family tests -----------------------------------------------------


def run_dir_of(raw: dict) -> Path:
    """The newest run folder of a config dict (output_dir/project/vN)."""
    return sorted((Path(raw["logging"]["output_dir"]) / raw["logging"]["project"]).glob("v*"))[-1]


def logged_losses(run_dir: Path) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def fixed_noise_losses(raw: dict, run_dir: Path) -> tuple[float, float]:
    """Loss of the base (adapter disabled) and of the saved LoRA (loaded through
    lora.pretrained_weight) on every sample, with fixed noise and sigmas in [0.1, 0.9]."""
    import torch

    from glm_training.config import config_from_dict
    from glm_training.data.datasets import collate
    from glm_training.models.base import build_family
    from glm_training.parts.denoiser import diffusion_sft_loss
    from glm_training.trainers.sft import build_diffusion_data

    raw = {**raw, "lora": {**raw["lora"], "pretrained_weight": str(run_dir / "final")}}
    cfg = config_from_dict(raw)
    family = build_family(cfg)
    family.setup_training()
    dataset, encoder = build_diffusion_data(cfg, family)
    batch = collate([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(123)
    base = trained = 0.0
    with torch.no_grad():
        latents, condition = encoder(batch, 0)
        for _ in range(4):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = 0.1 + 0.8 * torch.rand(len(latents), generator=generator)
            trained += diffusion_sft_loss(family, latents, condition, noise, sigmas).mean().item() / 4
            with family.reference():
                base += diffusion_sft_loss(family, latents, condition, noise, sigmas).mean().item() / 4
    return base, trained


UNMATCHED_KEY_WORDS = ("unexpected", "missing", "not found", "unmatched", "no lora")


def load_lora_messages(pipe, path: Path) -> list[str]:
    """`pipe.load_lora_weights(path)`; returns every diffusers log message and warning it produced."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    library_logger = diffusers_logging.get_logger("diffusers")
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(path)
    finally:
        library_logger.removeHandler(handler)
        diffusers_logging.set_verbosity(previous)
    return records + [str(w.message) for w in caught]


def unmatched_key_messages(messages: list[str]) -> list[str]:
    return [m for m in messages if any(s in m.lower() for s in UNMATCHED_KEY_WORDS)]


def train_sft(raw: dict, stop_at: int | None = None, trainer_class: type | None = None):
    """An SFT (or `trainer_class`) run of `raw` (-> the trainer); with `stop_at`, stopped at that
    step as SIGTERM does."""
    from glm_training.config import config_from_dict
    from glm_training.trainers.sft import SFTTrainer

    trainer = (trainer_class or SFTTrainer)(config_from_dict(raw))
    trainer.setup()
    if stop_at is not None:
        step = trainer.optimizer_step

        def step_then_stop():
            norm = step()
            if trainer.global_step + 1 == stop_at:
                trainer._stop_requested = True
            return norm

        trainer.optimizer_step = step_then_stop
    trainer.train()
    return trainer


def fit_fixed_draws(family, latents, condition, draws, optimizer, steps: int) -> tuple[float, float]:
    """`steps` optimizer steps of the SFT loss cycling through fixed (noise, timesteps) `draws`
    -> the loss summed over the draws before and after."""
    from glm_training.parts.denoiser import diffusion_sft_loss

    def held_loss():
        with torch.no_grad():
            return sum(diffusion_sft_loss(family, latents, condition, n, t).mean().item() for n, t in draws)

    before = held_loss()
    for step in range(steps):
        noise, t = draws[step % len(draws)]
        diffusion_sft_loss(family, latents, condition, noise, t).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, held_loss()
