"""The shared sampler on a real family: DDIM at eta 0 is diffusers' DDIM; log-probs are batch-invariant."""

import torch

from glm_training.config import config_from_dict
from glm_training.models.base import build_family
from glm_training.parts.sampler import DiffusionSampler

from conftest import sdxl_config


def sdxl(tmp_path, shapes_data):
    family = build_family(config_from_dict(sdxl_config(tmp_path, shapes_data)))
    size = torch.tensor([[32, 32]])
    batch = {"original_size": size.repeat(2, 1), "crop_top_left": torch.zeros(2, 2), "target_size": size.repeat(2, 1)}
    condition = family.condition(family.encode_prompt(["a red circle", "a blue square"]), batch)
    return family, condition


def test_deterministic_ddim_matches_the_diffusers_pipeline(tmp_path, shapes_data):
    from diffusers import DDIMScheduler

    family, condition = sdxl(tmp_path, shapes_data)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = DiffusionSampler(family, num_steps=5, noise_level=0.0).rollout(noise, condition).final
    pipe = family.pipeline(with_text_encoders=True)
    # Our DDIM neither clips x0 nor jumps to alpha = 1 at the end (SDXL's own settings).
    pipe.scheduler = DDIMScheduler.from_pretrained(family.model_path, subfolder="scheduler", clip_sample=False,
                                                   set_alpha_to_one=False)
    theirs = pipe(["a red circle", "a blue square"], height=32, width=32, num_inference_steps=5,
                  guidance_scale=1.0, latents=noise, output_type="latent", eta=0.0).images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_stochastic_rollout_log_probs_are_recomputable_and_batch_invariant(tmp_path, shapes_data):
    family, condition = sdxl(tmp_path, shapes_data)
    sampler = DiffusionSampler(family, num_steps=4, noise_level=1.0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    trajectory = sampler.rollout(noise, condition, generators=generators)
    assert all(trajectory.stochastic) and torch.isfinite(trajectory.log_probs).all()
    for k in range(4):  # recomputing a recorded transition gives its log-prob (ratio exactly 1)
        again = sampler.step(k, trajectory.states[k], condition, None, prev_sample=trajectory.states[k + 1])
        torch.testing.assert_close(again.log_prob, trajectory.log_probs[:, k], atol=1e-5, rtol=1e-5)
    single = {key: (value[1:] if torch.is_tensor(value) else {k: v[1:] for k, v in value.items()})
              for key, value in condition.items()}
    alone = sampler.rollout(noise[1:], single, generators=[torch.Generator().manual_seed(2)])
    torch.testing.assert_close(alone.log_probs[0], trajectory.log_probs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.final[0], trajectory.final[1], atol=1e-5, rtol=1e-5)
