"""DeepSpeed ZeRO through accelerate.

Without the package (CI): the clear error naming the extra, the config key and the CLI flag, and the
launch configs' wiring. With it (`pip install -e '.[deepspeed]'`): DeepSpeed runs on CPU ranks
(its CPU accelerator, gloo; the trainer does not pass accelerate `cpu=True`, which would disable
it), so ZeRO-2 and ZeRO-3 are tested for real with 2 processes on a tiny FLUX Kontext LoRA: the
final weights equal a 1-process run with the same global batch, ZeRO-3 samples during training
and resumes exactly from its per-rank shards, and `final/` loads with `load_lora_weights`.
benchmarks/gpu_distributed.sh is the GPU check (memory and speed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, load_lora_messages, sdxl_config, unmatched_key_messages
from glm_training.config import ConfigError, config_from_dict
from glm_training.trainers.base import distributed_strategy, make_accelerator

ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
LORA = "pytorch_lora_weights.safetensors"


# -- without the package ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "key"])
def test_missing_deepspeed_names_the_extra(tmp_path, shapes_data, monkeypatch, how):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError, as when absent
    raw = sdxl_config(tmp_path, shapes_data)
    if how == "env":  # accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    else:
        raw["distributed"] = {"deepspeed": "zero2"}
    with pytest.raises(ConfigError, match=r"distributed\.deepspeed.*pip install -e '\.\[deepspeed\]'"):
        make_accelerator(config_from_dict(raw))


def test_deepspeed_key_and_flag(tmp_path, shapes_data, monkeypatch):
    from glm_training.cli import build_config, parse_args

    raw = sdxl_config(tmp_path, shapes_data)
    assert config_from_dict(raw).distributed.deepspeed == "none"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    # --deepspeed zero3 (ms-swift style) is the YAML key, resolved the same.
    flagged = build_config(parse_args(["--config", str(path), "--deepspeed", "zero3"], None), None)
    keyed = config_from_dict({**raw, "distributed": {"deepspeed": "zero3"}})
    assert flagged.distributed.deepspeed == "zero3" and flagged.to_dict() == keyed.to_dict()
    with pytest.raises(ConfigError, match="distributed.deepspeed"):
        config_from_dict({**raw, "distributed": {"deepspeed": "zero1"}})
    assert distributed_strategy(keyed) == "deepspeed"
    assert distributed_strategy(config_from_dict(raw)) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="distributed.deepspeed: zero3 but the launch asked for FSDP"):
        distributed_strategy(keyed)


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


# -- with the package ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_plugin_takes_the_launch_config_and_the_training_settings(tmp_path, shapes_data, monkeypatch, stage):
    pytest.importorskip("deepspeed")
    from glm_training.trainers.base import deepspeed_plugin

    # A launched rank: the plugin then leaves the process-group variables alone.
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "ACCELERATE_USE_DEEPSPEED": "false"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    raw = sdxl_config(tmp_path, shapes_data, training={"batch_size": 3, "max_grad_norm": 0.5},
                      distributed={"deepspeed": f"zero{stage}"})
    plugin = deepspeed_plugin(config_from_dict(raw))
    settings = yaml.safe_load((ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml").read_text())["deepspeed_config"]
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == stage and ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == settings["offload_optimizer_device"]
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 1 and plugin.zero3_init_flag is False
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"  # what accelerate reads to enable it

    averaged = sdxl_config(tmp_path, shapes_data, training={"ema": {"decay": 0.9}},
                           distributed={"deepspeed": f"zero{stage}"})
    if stage == 3:
        with pytest.raises(ConfigError, match="training.ema is not supported with ZeRO-3"):
            deepspeed_plugin(config_from_dict(averaged))
    else:
        deepspeed_plugin(config_from_dict(averaged))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(5 - stage))  # the other stage
    with pytest.raises(ConfigError, match=f"distributed.deepspeed: zero{stage} but accelerate launch's config asks"):
        deepspeed_plugin(config_from_dict(raw))
    # accelerate launch --config_file deepspeed_zero<N>.yaml (no key): the stage from its variables.
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    launched = deepspeed_plugin(config_from_dict({**raw, "distributed": {}}))
    assert launched.zero_stage == stage and launched.deepspeed_config["train_micro_batch_size_per_gpu"] == 3


def launch(tmp_path: Path, raw: dict, nproc: int, name: str, *flags: str) -> Path:
    """`torchrun train.py --config <raw> <flags>` on localhost -> the run folder."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train.py"), "--config", str(config), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = Path(raw["logging"]["output_dir"]) / raw["logging"]["project"]
    return sorted(out.glob("v*"), key=lambda p: int(p.name[1:]))[-1]


def flux_config(root: Path, data: Path, batch: int, **logging) -> dict:
    return {"model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext"},
            "data": {"path": str(data), "resolution": 32},
            "training": {"max_train_steps": 3, "batch_size": batch, "learning_rate": 5e-3, "seed": 0,
                         "checkpointing_steps": 2},
            "lora": {"rank": 4, "alpha": 4},
            "logging": {"output_dir": str(root / "output"), "project": "flux", "report_to": [], **logging}}


@pytest.fixture(scope="module")
def flux_reference(tmp_path_factory):
    """A 1-process DDP run with the global batch of the 2-process runs (2) -> (data, final LoRA)."""
    pytest.importorskip("deepspeed")
    from glm_training.data.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("deepspeed")
    data = make_shapes_dataset(root / "shapes", count=4, size=32, seed=0)
    run = launch(root, flux_config(root / "one", data, 2), 1, "one")
    return data, run / "final" / LORA


def assert_matches(path: Path, reference: Path) -> None:
    # Float sums in another order, then Adam: a 2-process DDP run differs from this 1-process one by
    # the same 8e-5 at most (losses and grad norms agree to 1e-7), hence 2e-4 (lr 5e-3).
    got, want = load_file(str(path)), load_file(str(reference))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-4, rtol=1e-4, msg=key)
    assert sum(int(got[key].abs().sum() > 0) for key in got) == len(got)  # A and the trained B


def assert_loads_in_diffusers(final: Path) -> None:
    from diffusers import FluxKontextPipeline

    from glm_training.models.tiny import ensure_tiny

    pipe = FluxKontextPipeline.from_pretrained(ensure_tiny("flux_kontext"))
    messages = load_lora_messages(pipe, final)
    # A transformer-only file: diffusers notes that the text encoder got no keys (harmless).
    assert not [m for m in unmatched_key_messages(messages) if "CLIPTextModel" not in m], messages
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora_B" in k}
    assert loaded and all(v.abs().sum() > 0 for v in loaded.values())


def test_zero2_two_processes_match_one_and_load_in_diffusers(tmp_path, flux_reference):
    data, reference = flux_reference
    run = launch(tmp_path, flux_config(tmp_path, data, 1), 2, "zero2", "--deepspeed", "zero2")
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["distributed_type"] == "DEEPSPEED" and state["num_processes"] == 2
    # ZeRO-2: each rank holds its part of the optimizer state.
    assert {p.name for p in (run / "checkpoint-2" / "pytorch_model").glob("*optim_states.pt")} == {
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
    assert_matches(run / "final" / LORA, reference)
    assert_loads_in_diffusers(run / "final")


def test_zero2_in_one_plain_process_equals_ddp_bitwise(tmp_path, flux_reference):
    """`python train.py --deepspeed zero2` without torchrun: the trainer makes the process rank 0 of
    1 for DeepSpeed; with no other rank the result is the DDP run's, bit for bit."""
    data, reference = flux_reference
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump(flux_config(tmp_path, data, 2)))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--deepspeed", "zero2"],
                          cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    run = sorted((tmp_path / "output" / "flux").glob("v*"))[-1]
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["distributed_type"] == "DEEPSPEED"
    got, want = load_file(str(run / "final" / LORA)), load_file(str(reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_zero2_accumulates_like_a_larger_batch(tmp_path, flux_reference):
    """`training.gradient_accumulation_steps` 2 of batch 1 under ZeRO-2 (one optimizer step per
    window, not per micro-batch) ends where the batch-2 run does."""
    data, reference = flux_reference
    raw = flux_config(tmp_path, data, 1)
    raw["training"]["gradient_accumulation_steps"] = 2
    run = launch(tmp_path, raw, 1, "accumulate", "--deepspeed", "zero2")
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert_matches(run / "final" / LORA, reference)


def test_zero3_matches_one_samples_resumes_exactly_and_loads_in_diffusers(tmp_path, flux_reference):
    data, reference = flux_reference
    raw = flux_config(tmp_path, data, 1, sample_prompts=["a red square"], sample_steps=2,
                      sample_num_inference_steps=2, sample_resolution=32)
    raw["distributed"] = {"deepspeed": "zero3"}
    run = launch(tmp_path, raw, 2, "zero3")
    assert_matches(run / "final" / LORA, reference)
    # Sampling during training ran the partitioned module (every rank gathers its parameters).
    assert (run / "samples" / "step-000002.png").is_file() and (run / "samples" / "step-000003.png").is_file()
    sharded = run / "checkpoint-2"
    assert len(list((sharded / "pytorch_model").glob("zero_pp_rank_*_model_states.pt"))) == 2
    gathered = load_file(str(sharded / LORA))  # the user-facing file, gathered from the shards
    assert gathered and all(v.numel() > 0 for v in gathered.values())

    unbroken = tmp_path / "unbroken.safetensors"
    shutil.copy(run / "final" / LORA, unbroken)
    shutil.rmtree(run / "final")
    resumed = {**raw, "training": {**raw["training"], "resume_from_checkpoint": str(sharded)}}
    assert launch(tmp_path, resumed, 2, "resume") == run
    first, again = load_file(str(unbroken)), load_file(str(run / "final" / LORA))
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert_loads_in_diffusers(run / "final")


def test_gpu_distributed_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """benchmarks/gpu_distributed.sh --tiny: the GPU check's script works (DDP, and ZeRO-2 where
    deepspeed is installed; else it says so and runs the rest)."""
    out = tmp_path / "figures.json"
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_distributed.sh"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    rows = {row["strategy"]: row for row in figures["rows"]}
    with_deepspeed = importlib.util.find_spec("deepspeed") is not None
    assert set(rows) == ({"ddp", "zero2"} if with_deepspeed else {"ddp"})
    if with_deepspeed:
        assert rows["zero2"]["distributed_type"] == "DEEPSPEED"
    else:
        assert any("deepspeed is not installed" in line for line in figures["skipped"]), figures
    for row in rows.values():
        assert row["peak_gb"] > 0 and row["s_per_step"] > 0 and math.isfinite(row["loss"])
        assert 0 < row["trainable"] < row["params_rank0"]  # LoRA only
    assert "mem/DDP" in done.stdout and "time/DDP" in done.stdout
