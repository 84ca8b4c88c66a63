"""Turning a data batch into what a diffusion family's `predict` needs, through the cache.

Shared by every diffusion trainer (SFT, DPO, GRPO) and by `train.py --cache`. With the cache
enabled, prompt embeddings and latents are read from disk and only misses are computed (and
stored), so a run whose cache was filled never loads the text encoders.

Per-sample randomness (caption dropout, noise, timesteps) is drawn from a generator seeded by
(seed, epoch, dataset index): the same sample gets the same draw whatever the batch size, the
number of processes, or where a run was resumed. Control dropout is drawn once per micro-batch,
seeded by (seed, epoch, index of the batch's first sample): a batch is trained either entirely
with or entirely without its control images, and a resumed run draws the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from glm_training.data.cache import EmbeddingCache
from glm_training.data.datasets import Record, sample_generator
from glm_training.models.base import DiffusionFamily
from glm_training.parts.common import SALT_CONTROL_DROPOUT, SALT_NOISE, drop_captions



class ConditionEncoder:
    def __init__(self, family: DiffusionFamily, samples: list[Record], cache_dir: str | None,
                 resolution: int, caption_dropout: float = 0.0, seed: int = 0,
                 random_flip: bool = False, control_dropout: float = 0.0):
        self.family = family
        self.control_dropout = control_dropout
        self.random_flip = random_flip
        self.samples = samples
        self.resolution = resolution
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.cache = EmbeddingCache(cache_dir, family.cache_identity()) if cache_dir else None

    # -- prompts --------------------------------------------------------------------------------

    def prompts_for(self, batch: dict[str, Any], epoch: int) -> list[str]:
        return drop_captions(batch, epoch, self.seed, self.caption_dropout)

    def drops_controls(self, batch: dict[str, Any], epoch: int) -> bool:
        """Whether this micro-batch is trained without its control images (data.control_dropout)."""
        if self.control_dropout <= 0 or not batch.get("control_pixel_values"):
            return False
        generator = sample_generator(self.seed, epoch, int(batch["index"][0]), SALT_CONTROL_DROPOUT)
        return torch.rand(1, generator=generator).item() < self.control_dropout

    def encode_prompts(self, prompts: list[str], control_paths: list[list[Path]] | None = None,
                       control_pixels: list[list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        uses_images = self.family.prompt_uses_images
        if self.cache is None:
            return self.family.encode_prompt(prompts, control_pixels if uses_images else None)
        keys = [self.cache.prompt_key(p, control_paths[i] if uses_images and control_paths else None)
                for i, p in enumerate(prompts)]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, item in enumerate(found) if item is None]
        if missing:
            controls = None
            if uses_images and control_pixels is not None:
                controls = [[group[i:i + 1] for i in missing] for group in control_pixels]
            with torch.no_grad():
                fresh = self.family.encode_prompt([prompts[i] for i in missing], controls)
            for j, i in enumerate(missing):
                found[i] = {k: v[j:j + 1].cpu() for k, v in fresh.items()}
                self.cache.put(keys[i], found[i])
        return {k: v.to(self.family.device) for k, v in self.family.collate_prompt_embeds(found).items()}

    # -- images --------------------------------------------------------------------------------

    def encode_latents(self, pixels: torch.Tensor, paths: list[Path], flips: list[bool],
                       role: str = "target") -> torch.Tensor:
        if self.cache is None:
            with torch.no_grad():
                return self.family.encode_images(pixels)
        size = tuple(pixels.shape[-2:])  # the bucket's (height, width), or resolution x resolution
        keys = [self.cache.latent_key(p, size, f, role) for p, f in zip(paths, flips)]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, item in enumerate(found) if item is None]
        if missing:
            with torch.no_grad():
                fresh = self.family.encode_images(pixels[missing])
            for j, i in enumerate(missing):
                found[i] = {"latents": fresh[j:j + 1].cpu()}
                self.cache.put(keys[i], found[i])
        return torch.cat([item["latents"] for item in found]).to(self.family.device)

    # -- the whole batch -----------------------------------------------------------------------

    def __call__(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """-> (target latents, condition for `family.predict`)."""
        samples = [self.samples[i] for i in batch["index"]]
        flips = batch.get("flip", [False] * len(samples))
        latents = self.encode_latents(batch["pixel_values"], [s.target for s in samples], flips)
        control_paths = [s.controls for s in samples]
        if self.drops_controls(batch, epoch):  # text-to-image for this micro-batch
            batch = {k: v for k, v in batch.items() if k != "control_pixel_values"}
            control_paths = [[] for _ in samples]
        controls = batch.get("control_pixel_values")
        prompt_embeds = self.encode_prompts(self.prompts_for(batch, epoch), control_paths, controls)
        if controls is not None:
            batch = dict(batch)
            batch["control_latents"] = [
                self.encode_latents(group, [paths[k] for paths in control_paths], flips, role=f"control{k}")
                for k, group in enumerate(controls)]
        return latents, self.family.condition(prompt_embeds, batch)

    def noise_and_timesteps(self, latents: torch.Tensor, indices: list[int], epoch: int,
                            noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        noises, timesteps = [], []
        for i, index in enumerate(indices):
            generator = sample_generator(self.seed, epoch, index, SALT_NOISE)
            noise = torch.randn(latents.shape[1:], generator=generator)
            if noise_offset:
                noise = noise + noise_offset * torch.randn(latents.shape[1], 1, 1, generator=generator)
            noises.append(noise)
            timesteps.append(self.family.objective.sample_timesteps(1, latents[i:i + 1], generator))
        noise = torch.stack(noises).to(latents.device, latents.dtype)
        return noise, torch.cat(timesteps)

    def fill(self, batch: dict[str, Any]) -> None:
        """Compute and store every cache entry of a batch (all of its epochs' variants)."""
        samples = [self.samples[i] for i in batch["index"]]
        paths, flips = [s.target for s in samples], batch["flip"]
        self.encode_latents(batch["pixel_values"], paths, flips)
        if self.random_flip:  # the other orientation is used in other epochs
            self.encode_latents(batch["pixel_values"].flip(-1), paths, [not f for f in flips])
        control_paths = [s.controls for s in samples]
        if self.caption_dropout > 0:
            if self.family.prompt_uses_images:  # the empty prompt is still encoded with each sample's images
                self.encode_prompts([""] * len(samples), control_paths, batch.get("control_pixel_values"))
            else:
                self.encode_prompts([""])
        self.encode_prompts(list(batch["prompt"]), control_paths, batch.get("control_pixel_values"))
        if self.control_dropout > 0 and self.family.prompt_uses_images and batch.get("control_pixel_values"):
            self.encode_prompts(list(batch["prompt"]))  # the prompts of batches whose controls drop
