"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) as `training.method: nft`: GRPO's recipe with
a forward-process loss instead of log-probs, for every denoising part.

Per micro-batch (everything but steps 1 and 4 is GRPOTrainer's code, inherited):
1. rollout: `grpo.num_generations` images per prompt from the **old** policy (`family.old_policy()`:
   a second LoRA adapter "old", or a frozen copy with full fine-tuning) with the deterministic ODE
   sampler (`grpo.sample_steps`, guidance `grpo.guidance_scale`, 1 = off by default); each
   denoiser keeps only the clean latents, the condition and the inputs another part gave it
   (`Denoiser.nft_record`); chained families (GLM-Image: frozen AR tokens -> DiT) roll out as usual;
2. score and advantages: GRPO's (rewards, `scale_rewards`, zero-std masking, clamp to
   `grpo.adv_clip_max`, `dynamic_sample`), mapped to the optimality weight
   `r = clamp(A / adv_clip_max / 2 + 0.5, 0, 1)` by `nft.adv_mode`;
3. loss: `Denoiser.nft_backward` (implicit positive / negative policies, adaptive weights, divided
   by `nft.beta`, + `grpo.beta` x the squared distance to the reference);
4. after each optimizer step: `old <- decay * old + (1 - decay) * trained` with the decay of
   `nft.decay_schedule` at the new step count (`algorithms.nft.old_policy_decay`).

Checkpoints hold the old policy's tensors (`old_policy.safetensors`, exact fp32) next to GRPO's
rollout buffer (with `grpo.num_iterations` > 1), so a resumed run continues bitwise.
Evaluation, sample grids and reward logging are GRPO's (the trained policy, ODE).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from glm_training.algorithms.nft import OldPolicySchedule, optimality_weight, update_old_policy
from glm_training.config import ConfigError, check_nft_schedule
from glm_training.parts import prefixed
from glm_training.trainers.grpo import GRPOTrainer, Rollout

logger = logging.getLogger(__name__)

OLD_POLICY_FILE = "old_policy.safetensors"


class _NFTRecords:
    """What `Rollout.from_tensors` asks of a part (its name and record class), for NFT records."""

    def __init__(self, part: Any):
        from glm_training.parts.denoiser import NFTRollout

        self.name, self.record_class = part.name, NFTRollout


class NFTTrainer(GRPOTrainer):
    method = "nft"

    @classmethod
    def records_for(cls, cfg: Any, parts: list) -> list:
        """Refuses parts that are not denoisers (before any weight is read), then GRPO's records."""
        tokens = [part.name for part in parts if getattr(part, "kind", None) != "denoiser"]
        if tokens:
            raise ConfigError(
                f"training.method: nft trains denoisers only (it fits velocities on noised images); "
                f"{cfg.model.family} part(s) {tokens} of model.component {cfg.model.component!r} are token "
                "policies. Train those with training.method: grpo, or select the denoiser (GLM-Image: "
                "model.component: dit).")
        return super().records_for(cfg, parts)

    def build_dataset(self, records: list) -> torch.utils.data.Dataset:
        dataset = super().build_dataset(records)  # rewards, reference snapshot, prompts dataset
        grpo = self.cfg.grpo
        # Deterministic ODE rollouts (noise level 0), guidance as configured (1: off).
        self.guidance = grpo.guidance_scale
        self.family.setup_rollouts(grpo.sample_steps, self.guidance, 0.0, None)
        self.schedule = OldPolicySchedule(*check_nft_schedule(self.cfg.nft.decay_schedule))
        with self.family.old_policy():  # created now: before the optimizer collects trainable tensors
            pass
        return dataset

    # -- rollout (old policy, ODE) ---------------------------------------------------------------

    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any]) -> Rollout:
        with self.family.old_policy():
            rollout = super().make_rollout(batch)
        rollout.records = {part.name: part.nft_record(rollout.records[part.name]) for part in self.parts}
        return rollout

    def backward(self, batch: dict[str, Any], scale: float) -> dict[str, float]:
        with torch.no_grad():  # conditions rebuilt after a resume need no graph
            rollout, iteration = self.rollout_for(batch)
        grpo, nft = self.cfg.grpo, self.cfg.nft
        ctx, several = self.context(scale=scale), len(self.parts) > 1
        members = rollout.members
        metrics: dict[str, float] = {}
        loss = 0.0
        for part in self.parts:
            name = part.name
            weights = optimality_weight(rollout.advantages[name], grpo.adv_clip_max, nft.adv_mode)
            part_metrics = part.nft_backward(rollout.records[name], weights, rollout.valid[name], members, ctx)
            loss += part_metrics["loss"]
            metrics.update(prefixed(name, {**rollout.metrics[name], **part_metrics}, several))
        metrics["loss"] = loss
        metrics["iteration"] = float(iteration)
        metrics["old_policy_decay"] = self.schedule(self.global_step + 1)
        return metrics

    # -- the old policy trails the trained one -----------------------------------------------------

    def optimizer_step(self) -> float | None:
        grad_norm = super().optimizer_step()
        # NVlabs' order: the decay of the step count after this step, then the EMA.
        decay = self.schedule(self.global_step + 1)
        with self.family.old_policy() as pairs:
            update_old_policy({k: old for k, (old, _) in pairs.items()},
                              {k: trained for k, (_, trained) in pairs.items()}, decay)
        return grad_norm

    # -- resumable state: the old policy (+ GRPO's rollout buffer) ---------------------------------

    def save_extra_state(self, folder: Path) -> None:
        super().save_extra_state(folder)
        if self.is_main:  # every rank holds the same old policy
            from glm_training.utils import checkpoint as ckpt

            with self.family.old_policy() as pairs:
                tensors = {k: old.detach().cpu().contiguous() for k, (old, _) in pairs.items()}
            ckpt.write_tensors(folder / OLD_POLICY_FILE, tensors)

    def buffer_parts(self) -> list:
        return [_NFTRecords(part) for part in self.parts]

    def load_extra_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        super().load_extra_state(folder)  # EMA / eval state and the rollout buffer
        old_file = folder / OLD_POLICY_FILE
        if not old_file.is_file():
            raise ConfigError(f"training.resume_from_checkpoint: {folder} has no {OLD_POLICY_FILE} (DiffusionNFT's "
                              "old policy); it was not written by training.method: nft. Resume from an nft "
                              "checkpoint, or start a new run.")
        saved = load_file(str(old_file))
        with self.family.old_policy() as pairs:
            if set(saved) != set(pairs):
                raise ConfigError(f"training.resume_from_checkpoint: {old_file} does not match this config's trained "
                                  "weights; resume with the lora and model.component settings it was written with.")
            with torch.no_grad():
                for key, (old, _) in pairs.items():
                    old.copy_(saved[key].to(old.device, old.dtype))
