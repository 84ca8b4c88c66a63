"""Supervised fine-tuning of diffusion families: the denoising loss of the family's objective.

loss = mean_b( w(t_b) * mean_{c,h,w} (predict(x_t, t) - target(x0, eps, t))^2 )
with x_t, target and w from the family's objective (epsilon / v-prediction or flow matching).
"""

from __future__ import annotations

from typing import Any

import torch

from glm_training.algorithms.objectives import per_sample_mse
from glm_training.config import ConfigError
from glm_training.data.datasets import DataError, ImageDataset, load_samples, make_buckets
from glm_training.models.base import DiffusionFamily
from glm_training.trainers.base import BaseTrainer
from glm_training.trainers.conditioning import ConditionEncoder


def denoising_errors(family: DiffusionFamily, latents: torch.Tensor, condition: dict[str, Any],
                     noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the family's prediction against its objective's target, shape (B,)."""
    objective = family.objective
    prediction = family.predict(objective.add_noise(latents, noise, timesteps), timesteps, condition)
    return per_sample_mse(prediction, objective.target(latents, noise, timesteps))


def diffusion_sft_loss(family: DiffusionFamily, latents: torch.Tensor, condition: dict[str, Any],
                       noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted denoising loss, shape (B,)."""
    errors = denoising_errors(family, latents, condition, noise, timesteps)
    return errors * family.objective.loss_weights(timesteps).to(errors.device)


def load_training_samples(cfg) -> list:
    """The SFT samples of `data.path`, validated for this config (i2i controls, batching)."""
    data = cfg.data
    return load_samples(data.path, data.format, on_error=data.on_error,
                        require_prompt=data.caption_dropout < 1,
                        require_controls=cfg.training.mode == "i2i",
                        same_control_count=cfg.training.batch_size > 1)


def build_diffusion_data(cfg, family: DiffusionFamily) -> tuple[ImageDataset, ConditionEncoder]:
    """The validated dataset and the encoder that turns its batches into model inputs."""
    data = cfg.data
    if cfg.cache.enabled and not data.center_crop:
        raise ConfigError("cache.enabled needs data.center_crop: true (random crops change the latents).")
    samples = load_training_samples(cfg)
    encoder = ConditionEncoder(family, samples, cfg.cache.dir if cfg.cache.enabled else None,
                               data.resolution, data.caption_dropout, cfg.training.seed, data.random_flip,
                               control_dropout=data.control_dropout)
    buckets = None
    if data.buckets:
        try:
            buckets = make_buckets(data.resolution, family.resolution_multiple,
                                   tuple(data.bucket_aspect_range), data.bucket_step)
        except DataError as error:
            raise ConfigError(str(error)) from None
    dataset = ImageDataset(samples, data.resolution, data.center_crop, data.random_flip, seed=cfg.training.seed,
                           buckets=buckets)
    return dataset, encoder


class DiffusionTrainer(BaseTrainer):
    """Dataset, conditioning and sampling shared by the diffusion trainers."""

    def build_dataset(self) -> ImageDataset:
        dataset, self.encoder = build_diffusion_data(self.cfg, self.family)
        return dataset

    def sample_images(self, step: int) -> None:
        log = self.cfg.logging
        prompts = list(log.sample_prompts)
        resolution = log.sample_resolution or self.cfg.data.resolution
        controls = None
        if log.sample_control_images:
            from PIL import Image

            controls = [Image.open(p).convert("RGB") for p in log.sample_control_images]
        kwargs = {}
        encoder = getattr(self, "encoder", None)
        if encoder is not None and encoder.cache is not None and not self.family.prompt_uses_images:
            kwargs["prompt_embeds"] = self.encoder.encode_prompts(prompts)
            kwargs["negative_prompt_embeds"] = self.encoder.encode_prompts([""] * len(prompts))
        images = self.family.sample(prompts, height=resolution, width=resolution,
                                    num_inference_steps=log.sample_num_inference_steps,
                                    guidance_scale=log.sample_guidance_scale, seed=log.sample_seed,
                                    control_images=controls, **kwargs)
        self.save_samples(images, prompts, step)


class SFTTrainer(DiffusionTrainer):
    """Diffusion families: the denoising loss above. Token / unified families (BAGEL) bring their
    own dataset and loss through `build_sft_dataset()` and `sft_loss(batch, seed)`."""

    method = "sft"

    def build_dataset(self):
        if isinstance(self.family, DiffusionFamily):
            return super().build_dataset()
        return self.family.build_sft_dataset()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(self.family, DiffusionFamily):
            # Seed of this micro-batch: depends on the data position, not on how we got there.
            seed = self.cfg.training.seed * 1_000_003 + self.epoch * 10_007 + int(batch["index"][0])
            return self.family.sft_loss(batch, seed)
        # Families with a token side too (GLM-Image: AR generator + DiT decoder) name the SFT terms
        # that apply to the trained components; plain diffusion families only have "denoising".
        terms = self.family.sft_loss_terms
        loss, metrics = torch.zeros((), device=self.family.device), {}
        if "denoising" in terms:
            latents, condition = self.encoder(batch, self.epoch)
            noise, timesteps = self.encoder.noise_and_timesteps(
                latents, batch["index"], self.epoch, self.cfg.training.noise_offset)
            denoising = diffusion_sft_loss(self.family, latents, condition, noise, timesteps).mean()
            loss = loss + denoising
            metrics["denoising_loss"] = denoising.item()
        if "tokens" in terms:  # next-token CE of the family's token side, same (dropped) prompts
            token_batch = {**batch, "prompt": self.encoder.prompts_for(batch, self.epoch)}
            tokens = self.family.token_sft_loss(token_batch).mean()
            loss = loss + tokens
            metrics["token_loss"] = tokens.item()
        metrics["loss"] = loss.item()
        return loss, metrics
