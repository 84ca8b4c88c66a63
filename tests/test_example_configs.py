"""Every shipped config that names a tiny model and bundled data trains as shipped (2 steps, samples
included), and the GLM-Image sequential recipe chains: step 2 starts from step 1's AR adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from glm_training.cli import main

REPO = Path(__file__).resolve().parents[1]


def runnable(path: Path) -> bool:
    raw = yaml.safe_load(path.read_text())
    data = REPO / raw["data"]["path"]
    return raw["model"]["pretrained_model_name_or_path"].startswith("tiny:") and data.exists() \
        and "sequential" not in path.name


CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if runnable(p)]


def train(config: Path, out: Path, *extra: str) -> Path:
    args = ["--config", str(config), "--set", "training.max_train_steps=2", "--set", f"logging.output_dir={out}",
            "--set", "logging.sample_num_inference_steps=2", "--set", "logging.report_to=[]", *extra]
    assert main(args) == 0
    runs = sorted(p for p in out.glob("*/v*") if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_trains_as_shipped(config, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # data paths in configs are relative to the repository
    run = train(config, tmp_path)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # finite, logged per step
    assert (run / "final").is_dir() and any((run / "final").iterdir())
    if yaml.safe_load(config.read_text())["logging"].get("sample_prompts"):
        assert list((run / "samples").glob("*.png")), "no sample grid written"


def test_glm_image_sequential_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    first = train(REPO / "configs/glm_image_sequential_1_ar.yaml", tmp_path / "ar")
    adapter = first / "final" / "ar_adapter"
    assert adapter.is_dir()
    second = train(REPO / "configs/glm_image_sequential_2_dit.yaml", tmp_path / "dit",
                   "--set", f"lora.components.ar.pretrained_weight={adapter}")
    assert list((second / "samples").glob("*.png"))
