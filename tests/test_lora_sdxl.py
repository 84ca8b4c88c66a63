"""A LoRA produced by training loads where users load it, and changes the pictures."""

import logging

import pytest
import torch

from glm_training.config import config_from_dict
from glm_training.models.base import build_family
from glm_training.trainers.sft import SFTTrainer

from conftest import sdxl_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes_data):
    tmp = tmp_path_factory.mktemp("lora")
    raw = sdxl_config(tmp, shapes_data, training={"max_train_steps": 6, "learning_rate": 5e-3},
                      lora={"rank": 4, "alpha": 8, "save_format": "both"},
                      logging={"sample_prompts": ["a red circle", "a blue square"],
                               "sample_num_inference_steps": 3})
    trainer = SFTTrainer(config_from_dict(raw))
    return trainer, trainer.train()


def generate(pipe, seed=0):
    return pipe("a red circle on a white background", height=32, width=32, num_inference_steps=4,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def test_run_leaves_weights_samples_events_and_config(trained_run):
    _, run_dir = trained_run
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "final" / "comfyui" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "samples" / "step-000006.png").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    resolved = config_from_dict(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    assert resolved.lora.alpha == 8 and resolved.training.max_train_steps == 6


def test_lora_loads_into_a_fresh_pipeline_changes_output_and_unloads(trained_run, caplog):
    from diffusers import StableDiffusionXLPipeline

    trainer, run_dir = trained_run
    pipe = StableDiffusionXLPipeline.from_pretrained(trainer.family.model_path)
    base = generate(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(run_dir / "final")
    # Warnings about the untrained text encoders are expected; none may concern the UNet.
    unet_warnings = [r.message for r in caplog.records
                     if "unet" in r.message.lower() or "unexpected keys" in r.message.lower()]
    assert not unet_warnings, unet_warnings
    with_lora = generate(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    pipe.unload_lora_weights()
    torch.testing.assert_close(generate(pipe), base)
    pipe.load_lora_weights(run_dir / "final" / "comfyui")  # kohya keys with alpha
    torch.testing.assert_close(generate(pipe), with_lora, atol=1e-5, rtol=1e-5)


def test_pretrained_weight_round_trip(trained_run, tmp_path, shapes_data):
    trainer, run_dir = trained_run
    raw = sdxl_config(tmp_path, shapes_data, lora={"rank": 4, "alpha": 8,
                                                   "pretrained_weight": str(run_dir / "final")})
    family = build_family(config_from_dict(raw))
    family.setup_training()
    loaded, trained = family.trainable_state_dict(), trainer.family.trainable_state_dict()
    assert loaded.keys() == trained.keys()
    for key in loaded:
        torch.testing.assert_close(loaded[key], trained[key])
    raw["lora"]["rank"] = 8
    family = build_family(config_from_dict(raw))
    with pytest.raises(ValueError, match="check lora.rank"):
        family.setup_training()
