"""DeepSpeed ZeRO through accelerate: the optional extra's clear error, and the launch configs'
wiring (what `accelerate launch --config_file configs/accelerate/deepspeed_zero*.yaml` sets).
The real ZeRO-2 / ZeRO-3 runs need a GPU: benchmarks/gpu_distributed.sh."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from conftest import REPO, sdxl_config
from glm_training.config import ConfigError, config_from_dict
from glm_training.trainers.base import distributed_strategy, make_accelerator

ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_missing_deepspeed_names_the_extra(tmp_path, shapes_data, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = config_from_dict(sdxl_config(tmp_path, shapes_data))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[deepspeed\]'"):
        make_accelerator(cfg)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_launch_configs_set_the_zero_stage(name, stage, monkeypatch):
    raw = yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())
    assert raw["distributed_type"] == "DEEPSPEED" and raw["deepspeed_config"]["zero_stage"] == stage
    # accelerate launch exports ACCELERATE_USE_DEEPSPEED (and the stage) from this file; the trainer reads it.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    assert distributed_strategy() == "deepspeed"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert distributed_strategy() == "ddp"


def test_fsdp_and_multi_node_configs_are_what_the_readme_says():
    fsdp = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    multi = yaml.safe_load((ACCELERATE_CONFIGS / "multi_node.yaml").read_text())
    assert multi["num_machines"] == 2 and multi["num_processes"] == 16
    assert yaml.safe_load((ACCELERATE_CONFIGS / "ddp.yaml").read_text())["distributed_type"] == "MULTI_GPU"


def test_fsdp_refuses_a_family_without_declared_blocks(tmp_path, monkeypatch):
    from glm_training.models.base import family_class

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed_strategy() == "fsdp"
    with pytest.raises(ConfigError, match="declares no transformer blocks"):
        family_class("sdxl").block_classes("text_encoder")
    assert family_class("flux_kontext").block_classes("transformer") == ["FluxTransformerBlock",
                                                                         "FluxSingleTransformerBlock"]
