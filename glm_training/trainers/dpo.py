"""Diffusion-DPO (Wallace et al. 2023; Flow-DPO for flow families) against the family interface.

Per pair: the winner and the loser get the same timestep and the same noise; one forward pass
of the policy over the concatenated [winner, loser] batch, one (no grad) of the reference, which
is the same network with its LoRA adapters disabled. The loss is `algorithms.dpo.diffusion_dpo_loss`
on the per-sample denoising errors, plus an optional SFT term on the winner (`dpo.sft_weight`).
"""

from __future__ import annotations

from typing import Any

import torch

from glm_training.algorithms.dpo import diffusion_dpo_loss
from glm_training.config import ConfigError
from glm_training.data.datasets import PreferenceDataset, load_preference_pairs
from glm_training.trainers.conditioning import ConditionEncoder
from glm_training.trainers.sft import DiffusionTrainer, denoising_errors


class DPOTrainer(DiffusionTrainer):
    method = "dpo"

    def build_dataset(self) -> PreferenceDataset:
        if not self.cfg.lora.enabled:
            raise ConfigError("training.method: dpo uses the base model (LoRA disabled) as its reference; "
                              "set lora.enabled: true.")
        data = self.cfg.data
        self.pairs = load_preference_pairs(data.path, data.on_error)
        self.encoder = ConditionEncoder(self.family, [], self.cfg.cache.dir if self.cfg.cache.enabled else None,
                                        data.resolution, data.caption_dropout, self.cfg.training.seed,
                                        data.random_flip)
        self.beta = self.cfg.dpo.beta or self.family.default_dpo_beta
        return PreferenceDataset(self.pairs, data.resolution, data.center_crop, data.random_flip,
                                 seed=self.cfg.training.seed)

    def pair_inputs(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor,
                                                                       torch.Tensor]:
        """-> latents [winners; losers], their condition, shared noise and timesteps (repeated)."""
        pairs = [self.pairs[i] for i in batch["index"]]
        flips = batch["flip"]
        latents = torch.cat([
            self.encoder.encode_latents(batch["chosen_pixel_values"], [p.chosen for p in pairs], flips, "chosen"),
            self.encoder.encode_latents(batch["rejected_pixel_values"], [p.rejected for p in pairs], flips,
                                        "rejected")])
        control_paths = [p.control_images for p in pairs]
        controls = batch.get("control_pixel_values")
        embeds = self.encoder.encode_prompts(self.encoder.prompts_for(batch, epoch), control_paths, controls)
        both = {k: torch.cat([v, v]) for k, v in embeds.items()}
        merged = {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
                  for key in ("original_size", "crop_top_left")}
        merged["target_size"] = torch.cat([batch["target_size"]] * 2)
        if controls is not None:  # winner and loser share the control images
            merged["control_latents"] = [
                torch.cat([self.encoder.encode_latents(group, [c[k] for c in control_paths], flips,
                                                       f"control{k}")] * 2)
                for k, group in enumerate(controls)]
        noise, timesteps = self.encoder.noise_and_timesteps(latents[: len(pairs)], batch["index"], epoch,
                                                            self.cfg.training.noise_offset)
        return latents, self.family.condition(both, merged), torch.cat([noise, noise]), torch.cat([timesteps] * 2)

    def dpo_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents, condition, noise, timesteps = self.pair_inputs(batch, epoch)
        errors = denoising_errors(self.family, latents, condition, noise, timesteps)
        with torch.no_grad(), self.family.reference():
            ref_errors = denoising_errors(self.family, latents, condition, noise, timesteps)
        half = len(latents) // 2
        dpo = self.cfg.dpo
        loss, metrics = diffusion_dpo_loss(errors[:half], errors[half:], ref_errors[:half], ref_errors[half:],
                                           self.beta, dpo.loss_type, dpo.label_smoothing)
        if dpo.sft_weight:
            loss = loss + dpo.sft_weight * errors[:half].mean()
        return loss, metrics

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.dpo_loss(batch, self.epoch)
        return loss, {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}

    @torch.no_grad()
    def evaluate(self, pairs: list, draws: int = 4) -> dict[str, float]:
        """DPO metrics (implicit accuracy, margins) on held-out pairs, averaged over `draws` fixed
        noise/timestep draws per pair (one draw is a noisy estimate), without caption dropout."""
        from glm_training.data.datasets import collate

        saved_pairs, saved_dropout = self.pairs, self.encoder.caption_dropout
        self.pairs, self.encoder.caption_dropout = pairs, 0.0
        try:
            data = self.cfg.data
            dataset = PreferenceDataset(pairs, data.resolution, data.center_crop, False, seed=self.cfg.training.seed)
            batch = collate([dataset[i] for i in range(len(dataset))])
            results = []
            for draw in range(draws):
                loss, metrics = self.dpo_loss(batch, epoch=draw)
                results.append({"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}})
        finally:
            self.pairs, self.encoder.caption_dropout = saved_pairs, saved_dropout
        return {k: sum(r[k] for r in results) / draws for k in results[0]}
