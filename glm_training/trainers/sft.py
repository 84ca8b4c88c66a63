"""Supervised fine-tuning: each trained part's SFT loss, summed (one optimizer step for all).

- a denoiser part: `w(t) * mean((predict(x_t, t) - target)^2)` with the family's objective;
- a token-policy part: next-token CE on the target's tokens (GLM-Image's AR);
- BAGEL's packed part: `text_loss_weight * CE + image_loss_weight * MSE` on its own sequences.
Metrics of a part are prefixed with its name when a run trains several (GLM-Image `both`).
"""

from __future__ import annotations

from typing import Any

import torch

from glm_training.parts import prefixed
from glm_training.trainers.base import BaseTrainer


class SFTTrainer(BaseTrainer):
    method = "sft"
    needs_attribute = "sft_needs"

    def build_dataset(self, records: list) -> torch.utils.data.Dataset:
        self.family.prepare(records)
        return self.family.dataset(records, "images")

    def start_window(self, batches: list[dict[str, Any]], epochs: list[int]) -> None:
        for part in self.parts:
            part.sft_window(batches, epochs)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, several = self.context(), len(self.parts) > 1
        loss, metrics = torch.zeros((), device=self.device), {}
        for part in self.parts:
            part_loss, part_metrics = part.sft_loss(batch, ctx)
            loss = loss + part_loss
            metrics.update(prefixed(part.name, part_metrics, several))
        metrics["loss"] = loss.item()
        return loss, metrics

    def validation_losses(self, records: list) -> dict[str, float]:
        """`eval/loss` (and per part / timestep bucket) on the eval split at fixed draws (eval.draws)."""
        from glm_training.evaluation.validation import sft_validation

        return sft_validation(self, records, self.cfg.eval.draws)


def build_diffusion_data(cfg, family) -> tuple[torch.utils.data.Dataset, Any]:
    """The SFT dataset of a one-denoiser family and the encoder of its batches (cache filling)."""
    records = SFTTrainer.records_for(cfg, family.parts())
    family.prepare(records)
    (part,) = family.parts()
    return family.dataset(records, "images"), part.encoder
