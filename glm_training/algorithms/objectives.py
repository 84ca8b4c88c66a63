"""Training objectives of the diffusion families: noising, targets, timestep sampling, weighting.

Two objectives cover every family:
- `EpsilonObjective` (SDXL): `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps` with the family's DDPM
  `alphas_cumprod`; the target is `eps`, or `v = sqrt(a_t) eps - sqrt(1 - a_t) x0` for
  v-prediction. Timesteps are integers in [0, T).
- `FlowMatchingObjective` (FLUX Kontext, Qwen-Image, GLM-Image DiT, BAGEL): `x_s = (1 - s) x0 + s eps`
  with `s` in [0, 1] (1 = pure noise), target velocity `eps - x0`. `s` is drawn from a density
  (uniform, logit-normal, mode) and then shifted (static or resolution-dependent), as diffusers'
  `compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3` define.

Timesteps are returned in the family's own units (integers for epsilon, sigmas in [0, 1] for
flow); each family's `predict` converts them to what its network expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension, in float32: shape (B,)."""
    diff = prediction.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


class EpsilonObjective:
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 snr_gamma: float | None = None, timestep_spacing: str = "leading", steps_offset: int = 1,
                 set_alpha_to_one: bool = False):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}")
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.num_train_timesteps = len(self.alphas_cumprod)
        # The sampling schedule of the checkpoint's scheduler config (DDIMScheduler.set_timesteps).
        self.timestep_spacing, self.steps_offset, self.set_alpha_to_one = timestep_spacing, steps_offset, set_alpha_to_one

    def sampling_timesteps(self, num_steps: int) -> list[int]:
        """The DDIM timesteps for `num_steps` steps, as diffusers' DDIMScheduler.set_timesteps."""
        import numpy as np

        total = self.num_train_timesteps
        if self.timestep_spacing == "leading":
            ratio = total // num_steps
            steps = (np.arange(0, num_steps) * ratio).round()[::-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            steps = np.round(np.arange(total, 0, -total / num_steps)) - 1
        else:
            steps = np.linspace(0, total - 1, num_steps).round()[::-1]
        return [int(t) for t in steps]

    def alpha_before(self, timestep: int, num_steps: int) -> float:
        """alphas_cumprod of the DDIM step's previous timestep (`final_alpha_cumprod` past 0)."""
        previous = timestep - self.num_train_timesteps // num_steps
        if previous >= 0:
            return float(self.alphas_cumprod[previous])
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def sample_timesteps(self, batch_size: int, latents: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)

    def _alphas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(self.alphas_cumprod[timesteps.cpu().long()], like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self._alphas(timesteps, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a = self._alphas(timesteps, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023) when `snr_gamma` is set, else ones."""
        if self.snr_gamma is None:
            return torch.ones(len(timesteps))
        a = self.alphas_cumprod[timesteps.cpu().long()]
        snr = a / (1 - a)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


@dataclass
class FlowShift:
    """Static shift, or resolution-dependent shift (`mu` linear in the image token count)."""

    shift: float = 1.0
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_image_seq_len)

    def __call__(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        if self.dynamic:
            m = math.exp(self.mu(image_seq_len))
            return m / (m + (1 / sigmas - 1))
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)


class FlowMatchingObjective:
    def __init__(self, shift: FlowShift, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, patch_size: int = 2):
        valid = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
        if weighting_scheme not in valid:
            raise ValueError(f"weighting_scheme must be one of {valid}, got {weighting_scheme!r}")
        self.shift = shift
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.patch_size = patch_size

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)

    def sample_timesteps(self, batch_size: int, latents: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        if self.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(batch_size, generator=generator) * self.logit_std + self.logit_mean)
        else:
            u = torch.rand(batch_size, generator=generator)
            if self.weighting_scheme == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        # Keep sigma away from exactly 0 and 1, where the target or the shift degenerates.
        u = u.clamp(1e-5, 1 - 1e-5)
        return self.shift(u, self.image_seq_len(latents))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = _expand(sigmas, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        if self.weighting_scheme == "sigma_sqrt":
            return (sigmas.float() ** -2.0)
        if self.weighting_scheme == "cosmap":
            bot = 1 - 2 * sigmas + 2 * sigmas**2
            return 2 / (math.pi * bot)
        return torch.ones(len(sigmas))
