"""Algorithm details that would silently skew results (issue 12, item 9): the DDIM schedule follows
the checkpoint's scheduler config, token sampling samples the distribution its log-probs describe,
the DPO reference of an SDXL run with text-encoder LoRA is the base model, and GRPO refuses a
text-encoder LoRA it could not train."""

from __future__ import annotations

import pytest
import torch
from conftest import sdxl_config
from diffusers import DDIMScheduler

from glm_training.algorithms.objectives import EpsilonObjective
from glm_training.config import ConfigError, config_from_dict
from glm_training.data.datasets import collate
from glm_training.data.synthetic import make_colour_preference_pairs
from glm_training.models.base import build_family
from glm_training.parts.denoiser import denoising_errors
from glm_training.trainers.dpo import DPOTrainer


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_schedule_is_the_schedulers(spacing, offset, set_alpha_to_one):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, timestep_spacing=spacing, steps_offset=offset,
                              set_alpha_to_one=set_alpha_to_one, rescale_betas_zero_snr=spacing == "trailing")
    objective = EpsilonObjective(scheduler.alphas_cumprod, timestep_spacing=spacing, steps_offset=offset,
                                 set_alpha_to_one=set_alpha_to_one)
    for steps in (4, 10, 30):
        scheduler.set_timesteps(steps)
        assert objective.sampling_timesteps(steps) == scheduler.timesteps.tolist()
        for t in scheduler.timesteps.tolist():
            previous = t - scheduler.config.num_train_timesteps // steps
            expected = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
            assert objective.alpha_before(t, steps) == pytest.approx(float(expected), abs=0)


def test_token_sampling_ignores_a_truncating_generation_config(tmp_path):
    raw = {"model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image", "component": "ar"},
           "data": {"path": str(tmp_path), "resolution": 32},
           "logging": {"output_dir": str(tmp_path / "out"), "report_to": []}}
    family = build_family(config_from_dict(raw))
    ar = family.unwrapped("ar")
    ar.generation_config.top_k, ar.generation_config.top_p = 1, 0.1  # greedy if inherited
    draws = [family.generate_image_tokens(["a red square"], height=32, width=32, seed=seed) for seed in (0, 1, 2)]
    # Sampled from the full softmax: different seeds give different tokens (top_k 1 would not).
    assert len({tuple(d["tokens"][0].tolist()) for d in draws}) > 1
    forced = family.image_token_logprobs_per_token({"prompt": ["a red square"], "image_tokens": draws[0]["tokens"],
                                                    "pixel_values": torch.zeros(1, 3, 32, 32)})
    torch.testing.assert_close(forced, draws[0]["logprobs"], rtol=1e-4, atol=1e-4)


def test_sdxl_dpo_reference_with_text_encoder_lora_is_the_base_model(tmp_path):
    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=4, size=32)
    raw = sdxl_config(tmp_path, pairs, training={"method": "dpo"}, model={"train_text_encoder": True},
                      dpo={"beta": 1000.0})
    cfg = config_from_dict(raw)
    trainer = DPOTrainer(cfg)
    trainer.setup()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every adapter (UNet and both text encoders) moves away from the base
        for name in trainer.family.trained:
            for pname, p in trainer.family.unwrapped(name).named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    _, metrics = trainer.dpo_loss(batch, epoch=0)

    base = build_family(cfg)  # no adapters at all: the base model
    base.prepare(trainer.pairs)
    (part,) = base.parts()
    with torch.no_grad():
        errors = denoising_errors(part, *part.pair_inputs(batch, 0, trainer.pairs))
    half = len(errors) // 2
    expected = (errors[:half] - errors[half:]).mean()
    torch.testing.assert_close(metrics["ref_mse_gap"].float(), expected.float(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(metrics["policy_mse_gap"].float(), expected.float(), atol=1e-6)


def test_grpo_refuses_a_text_encoder_lora_it_cannot_train(tmp_path):
    raw = sdxl_config(tmp_path, tmp_path, training={"method": "grpo", "batch_size": 4},
                      model={"train_text_encoder": True}, grpo={"num_generations": 2},
                      reward={"rewards": {"brightness": {}}})
    with pytest.raises(ConfigError, match="model.train_text_encoder: GRPO"):
        config_from_dict(raw)
