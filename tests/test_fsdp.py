"""FSDP2 on 2 CPU processes (gloo), launched as `accelerate launch --config_file
configs/accelerate/fsdp.yaml` would (ACCELERATE_USE_FSDP / FSDP_VERSION): the final weights equal a
1-process run with the same global batch, a resume from the sharded checkpoint continues exactly,
and the consolidated `final/` LoRA loads with diffusers' `load_lora_weights`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
