"""FSDP2 on 2 CPU processes (gloo), launched as `accelerate launch --config_file
configs/accelerate/fsdp.yaml` would (ACCELERATE_USE_FSDP / FSDP_VERSION): the final weights equal a
1-process run with the same global batch, a resume from the sharded checkpoint continues exactly,
and the consolidated `final/` LoRA loads with diffusers' `load_lora_weights`. DPO (LoRA and full
fine-tuning) and GRPO under FSDP: finite, ranks agree, and the reference after training predicts
exactly what a freshly loaded base model predicts (LoRA: the sharded module with its adapter
disabled; full fine-tuning: the frozen copy, sharded by `BaseTrainer._shard_references`). Several
trained components (SDXL UNet + text encoders) under FSDP: equal to 1 process, resume exact."""

from __future__ import annotations

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

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
LORA = "pytorch_lora_weights.safetensors"


def launch(tmp_path: Path, raw: dict, nproc: int, env: dict | None = None, name: str = "run") -> Path:
    """torchrun on localhost -> the run folder."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train.py"), "--config", str(config)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = Path(raw["logging"]["output_dir"]) / raw["logging"]["project"]
    return sorted(out.glob("v*"), key=lambda p: int(p.name[1:]))[-1]


def assert_close_files(a: Path, b: Path, atol: float) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    changed = 0
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=1e-4, msg=key)
        changed += int(first[key].abs().sum() > 0)
    assert changed


def test_fsdp_lora_sdxl_matches_one_process_resumes_exactly_and_loads_in_diffusers(tmp_path, shapes_data):
    training = {"max_train_steps": 3, "learning_rate": 5e-3, "checkpointing_steps": 2}
    two = sdxl_config(tmp_path / "two", shapes_data, training={**training, "batch_size": 1})
    one = sdxl_config(tmp_path / "one", shapes_data, training={**training, "batch_size": 2})
    run2 = launch(tmp_path, two, 2, FSDP_ENV, "two")
    run1 = launch(tmp_path, one, 1, name="one")
    # Same global batch: FSDP's reduce-scatter averages like DDP's all-reduce (float sums in
    # another order: 1e-5).
    assert_close_files(run2 / "final" / LORA, run1 / "final" / LORA, atol=1e-5)
    sharded = run2 / "checkpoint-2"
    assert (sharded / "pytorch_model_fsdp_0").is_dir() and (sharded / "optimizer_0").is_dir()  # DCP shards
    assert (sharded / LORA).is_file()  # the user-facing file in every checkpoint, gathered

    # Resume from the sharded step-2 checkpoint: the same step-3 weights, exactly.
    unbroken = tmp_path / "unbroken.safetensors"
    shutil.copy(run2 / "final" / LORA, unbroken)
    shutil.rmtree(run2 / "final")
    resumed = {**two, "training": {**two["training"], "resume_from_checkpoint": str(sharded)}}
    assert launch(tmp_path, resumed, 2, FSDP_ENV, "resume") == run2
    first, again = load_file(str(unbroken)), load_file(str(run2 / "final" / LORA))
    for key in first:
        assert torch.equal(first[key], again[key]), key

    from diffusers import StableDiffusionXLPipeline

    from glm_training.models.tiny import ensure_tiny

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny("sdxl"))
    messages = load_lora_messages(pipe, run2 / "final")
    # A UNet-only file: diffusers notes that the text encoders got no keys (harmless).
    assert not [m for m in unmatched_key_messages(messages) if "text_encoder" not in m], messages
    loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_B" in k}
    assert loaded and any(v.abs().sum() > 0 for v in loaded.values())  # the trained (non-zero) B matrices


def test_fsdp_full_fine_tuning_flux_kontext_matches_one_process(tmp_path):
    from glm_training.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", count=4, size=32, seed=0)

    def config(root: Path, batch: int) -> dict:
        return {"model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext"},
                "data": {"path": str(data), "resolution": 32},
                "training": {"max_train_steps": 2, "batch_size": batch, "learning_rate": 1e-4, "seed": 0,
                             "checkpointing_steps": 1000},
                "lora": {"enabled": False},
                "logging": {"output_dir": str(root / "output"), "project": "flux", "report_to": []}}

    run2 = launch(tmp_path, config(tmp_path / "two", 1), 2, FSDP_ENV, "two")
    run1 = launch(tmp_path, config(tmp_path / "one", 2), 1, name="one")
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert_close_files(run2 / "final" / name, run1 / "final" / name, atol=1e-5)
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel.from_pretrained(run2 / "final" / "transformer")  # the consolidated folder loads


# -- DPO and GRPO under FSDP: finite, ranks agree, the reference is the untrained base ------------

FLUX_LORA = {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]}


def flux_rl_config(root: Path, data: Path, method: str, batch: int, resolution: int, lora: bool, **sections) -> dict:
    raw = {"model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext",
                     "max_sequence_length": 32},  # instead of 512 T5 tokens: seconds, not minutes
           "data": {"path": str(data), "resolution": resolution},
           "training": {"method": method, "max_train_steps": 2, "batch_size": batch, "learning_rate": 1e-3, "seed": 0,
                        "checkpointing_steps": 1000},
           "lora": {**FLUX_LORA, "enabled": lora},
           "logging": {"output_dir": str(root / "output"), "project": method, "report_to": []},
           **sections}
    return raw


def launch_worker(tmp_path: Path, raw: dict, nproc: int, env: dict | None, name: str) -> tuple[Path, Path]:
    """tests/ddp_worker.py under torchrun, with the reference check -> (its output folder, the run folder)."""
    config, out = tmp_path / f"{name}.yaml", tmp_path / f"{name}_out"
    config.write_text(yaml.safe_dump(raw))
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "tests" / "ddp_worker.py"), str(config), str(out), "reference"]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = Path(raw["logging"]["output_dir"]) / raw["logging"]["project"]
    return out, sorted(runs.glob("v*"), key=lambda p: int(p.name[1:]))[-1]


def logged_rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_ranks_agree_and_reference_is_base(out: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    """Both ranks hold the same full weights, equal to the consolidated final LoRA; on fixed inputs
    the run's reference (after training) predicts what a freshly loaded base model predicts, while
    the trained policy predicts something else (so the check can fail)."""
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    final = run_dir / "final" / LORA
    if final.is_file():  # the user-facing file: diffusers names (no peft adapter name)
        saved = load_file(str(final))
        assert {k.replace(".default", "") for k in rank0} == set(saved)
        for key, value in rank0.items():
            assert torch.equal(saved[key.replace(".default", "")], value), key
    for rank in (0, 1):
        predictions = load_file(str(out / f"rank{rank}_reference.safetensors"))
        # The same computation on the same weights: the sharded forward gathers them exactly.
        torch.testing.assert_close(predictions["reference"], predictions["base"], atol=1e-6, rtol=0)
        assert (predictions["policy"] - predictions["base"]).abs().max() > 1e-3  # training moved the policy
    return predictions


def test_fsdp_dpo_lora_reference_is_the_base_and_matches_one_process(tmp_path):
    import math

    from glm_training.data.synthetic import make_colour_preference_pairs

    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=4, size=32, seed=0)
    dpo = {"dpo": {"beta": 1000.0}}
    out2, run2 = launch_worker(tmp_path, flux_rl_config(tmp_path / "two", pairs, "dpo", 1, 32, True, **dpo),
                               2, FSDP_ENV, "two")
    rows = logged_rows(run2)
    assert len(rows) == 2 and all(math.isfinite(v) for row in rows for v in row.values())
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    assert rows[0]["implicit_acc"] == 0.5 and rows[1]["loss"] != rows[0]["loss"]
    assert_ranks_agree_and_reference_is_base(out2, run2)
    # One process with the same global batch (2 pairs per step): the same weights, up to float
    # sums in another order (FSDP's reduce-scatter vs one batch): 1e-5.
    out1, _ = launch_worker(tmp_path, flux_rl_config(tmp_path / "one", pairs, "dpo", 2, 32, True, **dpo),
                            1, None, "one")
    single, sharded = load_file(str(out1 / "rank0.safetensors")), load_file(str(out2 / "rank0.safetensors"))
    assert single.keys() == sharded.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=1e-4, msg=key)


def test_fsdp_dpo_full_fine_tuning_reference_is_a_sharded_frozen_copy_of_the_base(tmp_path):
    import math

    from glm_training.data.synthetic import make_colour_preference_pairs

    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=4, size=32, seed=0)
    raw = flux_rl_config(tmp_path, pairs, "dpo", 1, 32, False, dpo={"beta": 1000.0})
    out, run_dir = launch_worker(tmp_path, raw, 2, FSDP_ENV, "full")
    rows = logged_rows(run_dir)
    assert all(math.isfinite(v) for row in rows for v in row.values())
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    predictions = assert_ranks_agree_and_reference_is_base(out, run_dir)
    # BaseTrainer._shard_references: the frozen copy is sharded by the same blocks (1/N per rank).
    assert predictions["sharded_reference_tensors"] > 0


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp_grpo_finite_ranks_agree_and_the_kl_reference_is_the_base(tmp_path, lora):
    import math

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    raw = flux_rl_config(tmp_path, prompts, "grpo", 2, 16, lora,
                         grpo={"num_generations": 2, "sample_steps": 3, "noise_level": 0.9, "eval_steps": 2,
                               "beta": 0.04},
                         reward={"rewards": {"brightness": {"weight": 1.0}}})
    out, run_dir = launch_worker(tmp_path, raw, 2, FSDP_ENV, "grpo")
    rows = logged_rows(run_dir)
    train = [row for row in rows if "loss" in row]
    assert len(train) == 2 and all(math.isfinite(v) for row in rows for v in row.values())
    # On-policy first iteration; at step 1 the policy is the reference: KL exactly 0, then not.
    assert all(row["ratio_mean"] == 1.0 for row in train)
    assert train[0]["kl"] == 0.0 and train[1]["kl"] > 0
    assert any("eval/reward/total_mean" in row for row in rows)  # every rank sampled the sharded model
    predictions = assert_ranks_agree_and_reference_is_base(out, run_dir)
    assert (predictions["sharded_reference_tensors"] > 0) == (not lora)  # full: the frozen copy, sharded


def test_fsdp_trains_several_components_sdxl_unet_and_text_encoders(tmp_path, shapes_data):
    """More than one trained component (UNet + both text encoders, LoRA): each module is sharded by
    its own blocks (`BaseTrainer._prepare`); 2 processes equal 1 with the same global batch, the
    text encoders train (their hidden states survive FSDP's class swap), resume is exact."""
    training = {"max_train_steps": 2, "learning_rate": 5e-3, "checkpointing_steps": 1}
    two = sdxl_config(tmp_path / "two", shapes_data, training={**training, "batch_size": 1},
                      model={"train_text_encoder": True})
    one = sdxl_config(tmp_path / "one", shapes_data, training={**training, "batch_size": 2},
                      model={"train_text_encoder": True})
    run2 = launch(tmp_path, two, 2, FSDP_ENV, "two")
    run1 = launch(tmp_path, one, 1, name="one")
    # Float sums in another order; Adam's first steps divide by the gradient's own size, so an
    # element with a near-zero gradient moves by up to about lr x that noise: 5e-5 (seen: 2.5e-5).
    assert_close_files(run2 / "final" / LORA, run1 / "final" / LORA, atol=5e-5)
    final = load_file(str(run2 / "final" / LORA))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        # B / up matrices start at zero: non-zero ones were trained (diffusers' SDXL file uses up/down names).
        assert any(k.startswith(prefix) and ("lora_B" in k or ".up." in k) and v.abs().sum() > 0
                   for k, v in final.items()), prefix
    assert (run2 / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()  # one sharded model: all three modules

    shutil.rmtree(run2 / "final")
    resumed = {**two, "training": {**two["training"], "resume_from_checkpoint": str(run2 / "checkpoint-1")}}
    assert launch(tmp_path, resumed, 2, FSDP_ENV, "resume") == run2
    again = load_file(str(run2 / "final" / LORA))
    for key in final:
        assert torch.equal(final[key], again[key]), key


@pytest.mark.parametrize("component", ["ar", "both"])
def test_fsdp_glm_image_ar_lora_matches_one_process(tmp_path, component):
    """GLM-Image's AR (alone, and with the DiT): its image tokens come from the vision encoder and VQ
    tokenizer, called outside the AR's forward, which FSDP therefore leaves unsharded
    (`fsdp_unsharded`); the language model's blocks are sharded and the run equals one process with
    the same global batch."""
    import json

    import numpy as np
    from PIL import Image

    rows = []
    for index in range(4):
        array = np.zeros((32, 32, 3), np.uint8)
        array[..., index % 3] = 200
        Image.fromarray(array).save(tmp_path / f"img{index}.png")
        rows.append({"prompt": f"a flat colour {index}", "image": f"img{index}.png"})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def config(name, batch):
        return {"model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image",
                          "component": component},
                "data": {"path": str(tmp_path / "data.jsonl"), "resolution": 32},
                "training": {"max_train_steps": 2, "batch_size": batch, "learning_rate": 5e-3, "seed": 0},
                "lora": {"rank": 4, "alpha": 4},
                "logging": {"output_dir": str(tmp_path / name), "project": "glm", "report_to": []}}

    run2 = launch(tmp_path, config("two", 1), 2, FSDP_ENV, "two")
    run1 = launch(tmp_path, config("one", 2), 1, name="one")
    files = ["ar_adapter/adapter_model.safetensors"] + ([LORA] if component == "both" else [])
    for name in files:
        assert_close_files(run2 / "final" / name, run1 / "final" / name, atol=1e-5)
