"""Diffusion-DPO (Wallace et al. 2023; Flow-DPO for flow families) and token DPO, per trained part.

Per pair the winner and the loser share the prompt, the timestep and the noise; each trained part
computes its preference loss against its frozen reference (adapters disabled, or a frozen copy
with full fine-tuning): Diffusion-DPO on denoising errors for a denoiser, TRL's sigmoid DPO on
sequence log-probs for a token policy. Several parts (GLM-Image `both`) sum their losses; their
metrics are prefixed with the part names. `dpo.sft_weight` adds each part's SFT term on the winner.

Where pairs come from is a `PairSource`: by default the fixed records of `data.path`
(`pairs.jsonl`, folders, Pick-a-Pic); with `dpo.online: true` an `OnlinePairSource` that samples
`dpo.num_generations` images per prompt with the current policy (ODE, the shared sampler), scores
them with the `reward:` calculator and pairs the best with the worst (Flow-DPO / online DPO).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from glm_training.config import ConfigError
from glm_training.data.datasets import PreferenceDataset, Record, collate, sample_generator
from glm_training.parts import prefixed
from glm_training.parts.common import SALT_ONLINE
from glm_training.parts.sampler import reward_inputs
from glm_training.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)


class PairSource(ABC):
    """Where DPO gets the preference pairs of a micro-batch.

    `pairs(batch, step)` receives a batch of the trainer's dataset (`index`, `prompt`, and the
    prompt's optional `target_pixel_values` / `control_pixel_values`) and the optimizer step, and
    returns `Record`s whose image files exist (the DPO loss encodes them like offline
    pairs). It may return fewer pairs than prompts (e.g. ties dropped) but at least one.
    After a call, `indices` holds the dataset index of each returned pair's prompt (noise and
    timesteps are drawn per prompt) and `metrics` scalars for the logs (e.g. chosen/rejected reward).
    """

    metrics: dict[str, float] = {}
    indices: list[int] = []

    @abstractmethod
    def pairs(self, batch: dict[str, Any], step: int) -> list[Record]:
        ...


class OnlinePairSource(PairSource):
    """Sample a group per prompt with the current policy, score it, keep the best and the worst.

    Sampling is the deterministic ODE (`DiffusionSampler` with noise level 0) from per-(step,
    prompt, member) seeds, so it is reproducible and independent of batching. The pair images and
    a `pairs.jsonl` with every member's reward are written to `out_dir/step-<step>/`.
    """

    def __init__(self, part: Any, rewards: Any, out_dir: Path, num_generations: int, steps: int,
                 guidance_scale: float, seed: int):
        self.part, self.rewards, self.out_dir, self.group = part, rewards, Path(out_dir), num_generations
        self.steps, self.guidance_scale, self.seed = steps, guidance_scale, seed
        self.metrics, self.indices = {}, []
        self.last_scores: list[tuple[float, float]] = []  # (chosen, rejected) reward of each pair

    @torch.no_grad()
    def pairs(self, batch: dict[str, Any], step: int) -> list[Record]:
        from PIL import Image

        group, part = self.group, self.part
        size = part.cfg.data.resolution
        shape = part.latent_shape(size, size)
        noise = torch.stack([torch.randn(shape, generator=sample_generator(self.seed, step, index * group + m,
                                                                           SALT_ONLINE))
                             for index in batch["index"] for m in range(group)])
        images = part.decode(batch, group, noise, self.steps, self.guidance_scale)
        total, per_reward = self.rewards(reward_inputs(batch, images, group))
        folder = self.out_dir / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        candidates, ties = [], 0
        for i, index in enumerate(batch["index"]):
            scores = total[i * group:(i + 1) * group]
            if torch.isnan(scores).any():  # reward.on_error: skip_group left this group unscored
                continue
            best, worst = int(scores.argmax()), int(scores.argmin())
            if scores[best] == scores[worst]:
                ties += 1
            candidates.append((i, int(index), best, worst, scores))
        if not candidates:
            raise ValueError(f"dpo.online: every prompt of this batch (step {step}) had a failed reward "
                             "(reward.on_error: skip_group); check the reward, or use on_error: zero.")
        # Ties carry no preference (Pick-a-Pic drops them); keep them only if nothing else is left.
        kept = [c for c in candidates if c[4][c[2]] > c[4][c[3]]] or candidates
        pairs, rows, self.last_scores = [], [], []
        self.indices = [index for _, index, *_ in kept]
        for i, index, best, worst, scores in kept:
            paths = {}
            for role, member in (("chosen", best), ("rejected", worst)):
                array = (images[i * group + member].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                paths[role] = folder / f"{index:06d}_{role}.png"
                Image.fromarray(array).save(paths[role])
            controls = list(part.records[index].controls)
            pairs.append(Record(batch["prompt"][i], chosen=paths["chosen"], rejected=paths["rejected"], controls=controls))
            self.last_scores.append((float(scores[best]), float(scores[worst])))
            rows.append({"prompt": batch["prompt"][i], "chosen": paths["chosen"].name,
                         "rejected": paths["rejected"].name, "rewards": [float(s) for s in scores],
                         **{f"reward_{k}": [float(s) for s in v[i * group:(i + 1) * group]]
                            for k, v in per_reward.items()}})
        with (folder / "pairs.jsonl").open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        self.metrics = {
            "online/reward_chosen": sum(c for c, _ in self.last_scores) / len(self.last_scores),
            "online/reward_rejected": sum(r for _, r in self.last_scores) / len(self.last_scores),
            "online/reward_mean": float(total.mean()),
            "online/tie_fraction": ties / len(candidates),
            "online/failed_group_fraction": 1 - len(candidates) / len(batch["index"])}
        return pairs


class DPOTrainer(BaseTrainer):
    method = "dpo"
    needs_attribute = "preference_needs"

    @classmethod
    def record_needs(cls, cfg: Any, parts: list) -> set[str]:
        if not cfg.dpo.online:
            return super().record_needs(cfg, parts)
        needs = set().union(*(part.rollout_needs for part in parts))
        return needs | ({"controls"} if cfg.training.mode == "i2i" else set())

    def build_dataset(self, records: list) -> torch.utils.data.Dataset:
        dpo = self.cfg.dpo
        self.family.snapshot_reference()  # full fine-tuning: frozen copy before any update (LoRA: no-op)
        alone = len(self.parts) == 1
        self.betas = {part.name: part.dpo_beta(dpo, alone) for part in self.parts}
        self.pair_source: PairSource | None = None
        if not dpo.online:
            self.pairs = records
            self.family.prepare(records)
            return self.family.dataset(records, "pairs")
        (part, *others) = self.parts
        if others or not part.online_pairs:
            raise ConfigError(f"dpo.online: online pairs sample with the diffusion sampler; they are not available "
                              f"for {self.cfg.model.family} with model.component {self.cfg.model.component!r} "
                              f"(parts {[p.name for p in self.parts]}). Use offline pairs (dpo.online: false).")
        if not self.cfg.reward.rewards:
            raise ConfigError("dpo.online: true scores its samples with the reward: section; add "
                              "reward.rewards (e.g. {brightness: {weight: 1.0}}).")
        from glm_training.rewards import build_reward_calculator

        # No latent cache: online images are new every step. Prompt embeddings are cheap to redo.
        self.family.prepare(records, use_cache=False)
        rewards = build_reward_calculator(self.cfg.to_dict()["reward"], self.cfg.model.component)
        out_dir = self.run_dir / "online_pairs" / f"rank{self.accelerator.process_index}"
        self.pair_source = OnlinePairSource(part, rewards, out_dir, dpo.num_generations, dpo.sample_steps,
                                            dpo.guidance_scale, self.cfg.training.seed)
        self.pairs = []
        return self.family.dataset(records, "prompts")

    def dpo_loss(self, batch: dict[str, Any], epoch: int, pairs: list[Record] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every trained part's preference loss, summed (metrics prefixed per part when several)."""
        pairs = pairs if pairs is not None else [self.pairs[i] for i in batch["index"]]
        ctx, several = self.context(epoch), len(self.parts) > 1
        loss, metrics = torch.zeros((), device=self.device), {}
        for part in self.parts:
            part_loss, part_metrics = part.preference_loss(batch, ctx, pairs, self.betas[part.name])
            loss = loss + part_loss
            if several:
                part_metrics = {"loss": part_loss.detach(), **part_metrics}
            metrics.update(prefixed(part.name, part_metrics, several))
        return loss, metrics

    def online_batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], list[Record]]:
        """Pairs for this batch of prompts from the pair source, as a preference batch whose
        `index` is the prompt's (noise and timesteps stay per prompt, not per position)."""
        pairs = self.pair_source.pairs(batch, self.global_step)
        data = self.cfg.data
        dataset = PreferenceDataset(pairs, data.resolution, data.center_crop, False, seed=self.cfg.training.seed)
        preference = collate([dataset[i] for i in range(len(dataset))])
        if len(self.pair_source.indices) == len(pairs):
            preference["index"] = list(self.pair_source.indices)
        return preference, pairs

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.pair_source is None:
            loss, metrics = self.dpo_loss(batch, self.epoch)
            return loss, {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
        preference, pairs = self.online_batch(batch)
        # Online pairs are new every step: the step (not the epoch) varies noise and timesteps.
        loss, metrics = self.dpo_loss(preference, self.global_step, pairs)
        return loss, {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}, **self.pair_source.metrics}

    @torch.no_grad()
    def evaluate(self, pairs: list, draws: int = 4) -> dict[str, float]:
        """DPO metrics (implicit accuracy, margins) on held-out pairs, averaged over `draws` fixed
        noise/timestep draws per pair (one draw is a noisy estimate), without caption dropout, with
        the evaluation weights (EMA when on)."""
        from glm_training.evaluation import validation

        pairs = list(pairs)
        with validation.evaluation_mode(self, pairs):
            return validation.preference_validation(self, pairs, draws)

    def validation_losses(self, records: list) -> dict[str, float]:
        """`eval/loss`, `eval/implicit_acc`, margins on the held-out pairs (eval.draws fixed draws).
        Online DPO's eval split holds prompts only: no pairs, no preference loss."""
        from glm_training.evaluation import validation

        if not records or any(r.chosen is None or r.rejected is None for r in records):
            return {}
        return {f"eval/{k}": v for k, v in validation.preference_validation(self, records, self.cfg.eval.draws).items()}
