"""SFT: the loss is the formula; training lowers it; resume is exact; cache changes nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file

from glm_training.algorithms.objectives import (EpsilonObjective, FlowMatchingObjective, FlowShift,
                                                per_sample_mse)
from glm_training.config import config_from_dict
from glm_training.data.datasets import collate
from glm_training.parts.denoiser import diffusion_sft_loss
from glm_training.trainers.sft import SFTTrainer

from conftest import sdxl_config, train_sft


def test_epsilon_objective_matches_the_formula():
    alphas = torch.linspace(0.99, 0.01, 1000)
    objective = EpsilonObjective(alphas, "epsilon", snr_gamma=5.0)
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 900])
    a = alphas[t].view(2, 1, 1, 1)
    assert torch.allclose(objective.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert torch.equal(objective.target(x0, noise, t), noise)
    snr = alphas[t] / (1 - alphas[t])
    assert torch.allclose(objective.loss_weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    v = EpsilonObjective(alphas, "v_prediction")
    assert torch.allclose(v.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_flow_objective_matches_the_formula():
    objective = FlowMatchingObjective(FlowShift(shift=3.0), weighting_scheme="logit_normal")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.25, 0.75])
    s = sigmas.view(2, 1, 1, 1)
    assert torch.allclose(objective.add_noise(x0, noise, sigmas), (1 - s) * x0 + s * noise)
    assert torch.equal(objective.target(x0, noise, sigmas), noise - x0)
    drawn = objective.sample_timesteps(10_000, x0, torch.Generator().manual_seed(0))
    assert drawn.min() > 0 and drawn.max() < 1
    assert drawn.median() > 0.5  # shift 3 pushes sigmas towards noise
    u = torch.tensor([0.5])
    assert FlowShift(shift=3.0)(u, 16).item() == pytest.approx(0.75)


def test_sft_loss_is_weighted_mse_of_the_prediction():
    class Family:  # a linear "network" on latents with the epsilon objective
        objective = EpsilonObjective(torch.linspace(0.9, 0.1, 10), "epsilon", snr_gamma=1.0)

        def predict(self, noisy, t, condition):
            return 0.5 * noisy + condition["bias"]

    family = Family()
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([1, 5, 8])
    loss = diffusion_sft_loss(family, x0, {"bias": 0.1}, noise, t)
    a = family.objective.alphas_cumprod[t].view(3, 1, 1, 1)
    pred = 0.5 * (a.sqrt() * x0 + (1 - a).sqrt() * noise) + 0.1
    expected = ((pred - noise) ** 2).mean(dim=(1, 2, 3)) * family.objective.loss_weights(t)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(per_sample_mse(pred, noise), ((pred - noise) ** 2).mean(dim=(1, 2, 3)))


def fixed_loss(trainer: SFTTrainer) -> float:
    """Loss on all samples with fixed noise and timesteps (independent of training randomness)."""
    generator = torch.Generator().manual_seed(123)
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    with torch.no_grad():
        latents, condition = trainer.parts[0].encoder(batch, 0)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(100, 900, (len(latents),), generator=generator)
        return diffusion_sft_loss(trainer.family, latents, condition, noise, timesteps).mean().item()


def test_training_lowers_the_loss(tmp_path, shapes_data):
    raw = sdxl_config(tmp_path, shapes_data, training={"max_train_steps": 30, "batch_size": 4,
                                                       "learning_rate": 3e-3},
                      lora={"rank": 8, "alpha": 8})
    trainer = SFTTrainer(config_from_dict(raw))
    trainer.setup()
    before = fixed_loss(trainer)
    trainer.train()
    after = fixed_loss(trainer)
    assert after < before - 0.01, (before, after)


def run(raw, stop_at=None):
    trainer = train_sft(raw, stop_at)
    return trainer, trainer.run_dir


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def test_resume_is_identical_to_an_unbroken_run(tmp_path, shapes_data):
    common = dict(training={"max_train_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2,
                            "checkpointing_steps": 100},
                  data={"caption_dropout": 0.3, "random_flip": True},
                  lora={"dropout": 0.1}, lr_scheduler={"name": "cosine", "warmup_steps": 2})
    straight = sdxl_config(tmp_path / "a", shapes_data, **common)
    _, straight_dir = run(straight)
    broken = sdxl_config(tmp_path / "b", shapes_data, **common)
    _, first_dir = run(broken, stop_at=3)
    assert (first_dir / "checkpoint-3" / "trainer_state.json").exists()
    assert not (first_dir / "final").exists()  # stopped, not finished
    broken["training"]["resume_from_checkpoint"] = "latest"
    trainer, resumed_dir = run(broken)
    assert resumed_dir == first_dir and trainer.global_step == 6
    a = load_file(straight_dir / "checkpoint-6" / "trainable.safetensors")
    b = load_file(resumed_dir / "checkpoint-6" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert losses(straight_dir) == pytest.approx(losses(resumed_dir), abs=1e-6)
    assert len(losses(straight_dir)) == 6


def test_cached_run_matches_uncached_and_never_loads_text_encoders(tmp_path, shapes_data, monkeypatch):
    from glm_training.cli import fill_cache

    plain = sdxl_config(tmp_path / "plain", shapes_data, training={"max_train_steps": 3})
    _, plain_dir = run(plain)
    cached = sdxl_config(tmp_path / "cached", shapes_data, training={"max_train_steps": 3},
                         cache={"enabled": True, "dir": str(tmp_path / "cache")},
                         logging={"sample_prompts": ["a red circle"], "sample_num_inference_steps": 2})
    fill_cache(config_from_dict(cached))
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was loaded although the cache was filled")

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPTextModelWithProjection, "from_pretrained", refuse)
    trainer, cached_dir = run(cached)
    assert "text_encoder" not in trainer.family.modules
    assert (cached_dir / "samples" / "step-000003.png").exists()
    assert losses(plain_dir) == pytest.approx(losses(cached_dir), rel=1e-5)
