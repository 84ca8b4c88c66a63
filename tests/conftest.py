"""Shared fixtures: tiny models built once per session, small datasets, config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
