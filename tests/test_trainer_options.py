"""Options of the trainer and the SDXL family, each exercised by a short real run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from glm_training.config import ConfigError, config_from_dict
from glm_training.trainers.sft import SFTTrainer

from conftest import sdxl_config


def train(tmp_path, data, **sections):
    trainer = SFTTrainer(config_from_dict(sdxl_config(tmp_path, data, **sections)))
    return trainer, trainer.train()


def test_bf16_gradient_checkpointing_and_text_encoder_lora(tmp_path, shapes_data):
    trainer, run = train(tmp_path, shapes_data, training={"max_train_steps": 2, "mixed_precision": "bf16"},
                         model={"gradient_checkpointing": True, "train_text_encoder": True})
    assert trainer.family.unwrapped("unet").dtype == torch.bfloat16  # frozen base in bf16
    state = load_file(run / "checkpoint-2" / "trainable.safetensors")
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(v.dtype == torch.float32 for v in state.values())  # LoRA weights train in fp32
    saved = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder_2.") for k in saved) and any(k.startswith("unet.") for k in saved)


def test_full_fine_tuning_v_prediction_and_component_lr(tmp_path, shapes_data):
    trainer, run = train(tmp_path, shapes_data, lora={"enabled": False},
                         model={"prediction_type": "v_prediction"},
                         optimizer={"name": "sgd", "component_lr": {"unet": 0.01}},
                         training={"max_train_steps": 2, "learning_rate": 0.5})
    assert trainer.family.objective.prediction_type == "v_prediction"
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(run / "final" / "unet")


def test_optimizer_errors_say_what_to_do(tmp_path, shapes_data):
    with pytest.raises(ConfigError, match="cannot import nowhere_pkg"):
        train(tmp_path, shapes_data, optimizer={"class_path": "nowhere_pkg.Optim"})
    with pytest.raises(ConfigError, match=r"component_lr: \['dit'\] not trained"):
        train(tmp_path, shapes_data, optimizer={"component_lr": {"dit": 1e-4}})
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        train(tmp_path, shapes_data, training={"mixed_precision": "fp16"})


def test_class_path_optimizer_schedule_and_wandb_offline(tmp_path, shapes_data, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B must go offline, not hang
    _, run = train(tmp_path, shapes_data,
                   optimizer={"class_path": "torch.optim.RMSprop", "kwargs": {"alpha": 0.9}},
                   lr_scheduler={"name": "linear", "warmup_steps": 1},
                   training={"max_train_steps": 3, "learning_rate": 1e-3},
                   logging={"report_to": ["tensorboard", "wandb"]})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr/unet"] for row in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0)  # warm-up then linear decay
    assert list((run / "wandb").glob("offline-run-*"))
