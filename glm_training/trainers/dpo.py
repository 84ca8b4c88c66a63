"""Diffusion-DPO (Wallace et al. 2023; Flow-DPO for flow families) against the family interface.

Per pair: the winner and the loser get the same timestep and the same noise; one forward pass
of the policy over the concatenated [winner, loser] batch, one (no grad) of the reference: the
same network with its LoRA adapters disabled, or with full fine-tuning a frozen copy of the
trained components taken before the first update (`ModelFamily.reference`). The loss is
`algorithms.dpo.diffusion_dpo_loss` on the per-sample denoising errors, plus an optional SFT term
on the winner (`dpo.sft_weight`).

Where pairs come from is a `PairSource`: by default the fixed files of `data.path`
(`pairs.jsonl`, folders, Pick-a-Pic); with `dpo.online: true` an `OnlinePairSource` that samples
`dpo.num_generations` images per prompt with the current policy (ODE, the shared sampler), scores
them with the `reward:` calculator and pairs the best with the worst (Flow-DPO / online DPO).

What is trained on the pairs is what the family reports (`preference_terms`, see below), summed:
- "denoising": Diffusion-DPO on the latents, as above (diffusion families; GLM-Image's DiT);
- "tokens": token DPO (TRL's sigmoid DPO, `algorithms.dpo.token_dpo_loss`) on the summed log-probs
  of the chosen and rejected images' own tokens (`family.image_token_logprobs_per_token`), policy
  vs reference (GLM-Image's AR generator); `dpo.sft_weight` adds the token CE of the winner;
- "errors": the family computes the per-sample flow errors of [chosen; rejected] for policy and
  reference itself (`family.preference_errors(batch, seed)`) on its own dataset
  (`family.build_preference_dataset(pairs)`): families that are not latent diffusion (BAGEL).
With several terms (GLM-Image `component: both`) the metrics are logged per term (`ar/`, `dit/`).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from glm_training.algorithms.dpo import diffusion_dpo_loss, token_dpo_loss
from glm_training.config import ConfigError
from glm_training.data.datasets import PreferenceDataset, PreferencePair, PromptDataset, Sample, collate, \
    load_preference_pairs, load_prompts, sample_generator
from glm_training.models.base import DiffusionFamily
from glm_training.trainers.conditioning import ConditionEncoder
from glm_training.trainers.sampler import DiffusionSampler, generation_conditions, reward_inputs, to_unit_images
from glm_training.trainers.sft import DiffusionTrainer, denoising_errors

logger = logging.getLogger(__name__)

SALT_ONLINE = 7
#: Token-DPO beta when neither dpo.beta nor the family gives one (TRL's default).
TOKEN_DPO_BETA = 0.1
#: Metric prefix of each preference term when several are trained together.
TERM_PREFIX = {"denoising": "dit", "tokens": "ar", "errors": "flow"}


def preference_terms(family: Any) -> tuple[str, ...]:
    """What DPO can train on this family, as the family reports it: its `preference_terms`, else
    the SFT terms of its trained components (`sft_loss_terms`: "denoising" and/or "tokens"), else
    "denoising" for a diffusion family; () when the family has nothing for DPO."""
    terms = family.preference_terms
    if terms is None and isinstance(family, DiffusionFamily):
        terms = family.sft_loss_terms
    return tuple(terms or ())


class PairSource(ABC):
    """Where DPO gets the preference pairs of a micro-batch.

    `pairs(batch, step)` receives a batch of the trainer's dataset (`index`, `prompt`, and the
    prompt's optional `target_images` / `control_pixel_values`) and the optimizer step, and
    returns `PreferencePair`s whose image files exist (the DPO loss encodes them like offline
    pairs). It may return fewer pairs than prompts (e.g. ties dropped) but at least one.
    After a call, `indices` holds the dataset index of each returned pair's prompt (noise and
    timesteps are drawn per prompt) and `metrics` scalars for the logs (e.g. chosen/rejected reward).
    """

    metrics: dict[str, float] = {}
    indices: list[int] = []

    @abstractmethod
    def pairs(self, batch: dict[str, Any], step: int) -> list[PreferencePair]:
        ...


class OnlinePairSource(PairSource):
    """Sample a group per prompt with the current policy, score it, keep the best and the worst.

    Sampling is the deterministic ODE (`DiffusionSampler` with noise level 0) from per-(step,
    prompt, member) seeds, so it is reproducible and independent of batching. The pair images and
    a `pairs.jsonl` with every member's reward are written to `out_dir/step-<step>/`.
    """

    def __init__(self, family: DiffusionFamily, encoder: ConditionEncoder, samples: list[Sample], rewards: Any,
                 sampler: DiffusionSampler, out_dir: Path, num_generations: int, resolution: int, seed: int):
        self.family, self.encoder, self.samples, self.rewards = family, encoder, samples, rewards
        self.sampler, self.out_dir, self.group = sampler, Path(out_dir), num_generations
        self.resolution, self.seed = resolution, seed
        self.metrics, self.indices = {}, []
        self.last_scores: list[tuple[float, float]] = []  # (chosen, rejected) reward of each pair

    @torch.no_grad()
    def pairs(self, batch: dict[str, Any], step: int) -> list[PreferencePair]:
        from PIL import Image

        group, size = self.group, self.resolution
        condition, uncondition = generation_conditions(self.family, self.encoder, self.samples, batch, group, size,
                                                       self.sampler.guidance_scale)
        shape = self.family.latent_shape(size, size)
        noise = torch.stack([torch.randn(shape, generator=sample_generator(self.seed, step, index * group + m,
                                                                           SALT_ONLINE))
                             for index in batch["index"] for m in range(group)])
        images = to_unit_images(self.family, self.sampler.rollout(noise.to(self.family.device), condition,
                                                                  uncondition).final)
        total, per_reward = self.rewards(reward_inputs(batch, images, group))
        folder = self.out_dir / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        candidates, ties = [], 0
        for i, index in enumerate(batch["index"]):
            scores = total[i * group:(i + 1) * group]
            best, worst = int(scores.argmax()), int(scores.argmin())
            if scores[best] == scores[worst]:
                ties += 1
            candidates.append((i, int(index), best, worst, scores))
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
            controls = list(self.samples[index].control_images)
            pairs.append(PreferencePair(batch["prompt"][i], paths["chosen"], paths["rejected"], controls))
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
            "online/tie_fraction": ties / len(candidates)}
        return pairs


class DPOTrainer(DiffusionTrainer):
    method = "dpo"

    def build_dataset(self) -> PreferenceDataset | PromptDataset:
        data, dpo = self.cfg.data, self.cfg.dpo
        self.terms = preference_terms(self.family)
        if not self.terms:
            raise ConfigError(f"training.method: dpo for {self.cfg.model.family} is not available yet.")
        self.family.snapshot_reference()  # full fine-tuning: frozen copy before any update (LoRA: no-op)
        self.beta = dpo.beta or self.family.default_dpo_beta
        # Token log-prob margins are on another scale than denoising errors: dpo.beta sets the token
        # beta only when tokens are the sole term; next to a denoising term (GLM-Image `both`) it is the
        # DiT's and the tokens take dpo.token_beta (default: the family's token default).
        token_default = dpo.token_beta or getattr(self.family, "default_token_dpo_beta", TOKEN_DPO_BETA)
        self.token_beta = dpo.beta if dpo.beta and self.terms == ("tokens",) else token_default
        if dpo.online and self.terms != ("denoising",):
            raise ConfigError(f"dpo.online: online pairs sample with the diffusion sampler; they are not available "
                              f"for {self.cfg.model.family} with model.component {self.cfg.model.component!r} "
                              f"(terms {list(self.terms)}). Use offline pairs (dpo.online: false).")
        if dpo.online:
            return self.build_online(data, dpo)
        self.pair_source: PairSource | None = None
        self.pairs = load_preference_pairs(data.path, data.on_error)
        if "errors" in self.terms:  # the family packs its own batches (BAGEL)
            self.encoder = None
            return self.family.build_preference_dataset(self.pairs)
        self.encoder = ConditionEncoder(self.family, [], self.cfg.cache.dir if self.cfg.cache.enabled else None,
                                        data.resolution, data.caption_dropout, self.cfg.training.seed,
                                        data.random_flip)
        return PreferenceDataset(self.pairs, data.resolution, data.center_crop, data.random_flip,
                                 seed=self.cfg.training.seed)

    def build_online(self, data, dpo) -> PromptDataset:
        from glm_training.rewards import build_reward_calculator

        if not self.cfg.reward.rewards:
            raise ConfigError("dpo.online: true scores its samples with the reward: section; add "
                              "reward.rewards (e.g. {brightness: {weight: 1.0}}).")
        samples = load_prompts(data.path)
        # No latent cache: online images are new every step. Prompt embeddings are cheap to redo.
        self.encoder = ConditionEncoder(self.family, samples, None, data.resolution, data.caption_dropout,
                                        self.cfg.training.seed)
        sampler = DiffusionSampler(self.family, dpo.sample_steps, dpo.guidance_scale, noise_level=0.0)
        rewards = build_reward_calculator(self.cfg.to_dict()["reward"], self.cfg.model.component)
        out_dir = self.run_dir / "online_pairs" / f"rank{self.accelerator.process_index}"
        self.pair_source = OnlinePairSource(self.family, self.encoder, samples, rewards, sampler, out_dir,
                                            dpo.num_generations, data.resolution, self.cfg.training.seed)
        self.pairs = []
        return PromptDataset(samples, data.resolution)

    def pair_inputs(self, batch: dict[str, Any], epoch: int, pairs: list[PreferencePair]
                    ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
        """-> latents [winners; losers], their condition, shared noise and timesteps (repeated)."""
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
        # The pixels too, for families whose condition reads them (GLM-Image: the prior tokens).
        merged["pixel_values"] = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]])
        if controls is not None:
            merged["control_pixel_values"] = [torch.cat([group, group]) for group in controls]
        if controls is not None:  # winner and loser share the control images
            merged["control_latents"] = [
                torch.cat([self.encoder.encode_latents(group, [c[k] for c in control_paths], flips,
                                                       f"control{k}")] * 2)
                for k, group in enumerate(controls)]
        noise, timesteps = self.encoder.noise_and_timesteps(latents[: len(pairs)], batch["index"], epoch,
                                                            self.cfg.training.noise_offset)
        return latents, self.family.condition(both, merged), torch.cat([noise, noise]), torch.cat([timesteps] * 2)

    def dpo_loss(self, batch: dict[str, Any], epoch: int, pairs: list[PreferencePair] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss of the family's terms, summed (metrics prefixed per term when several)."""
        parts = []
        for term in self.terms:
            if term == "denoising":
                parts.append((term, *self.denoising_dpo_loss(batch, epoch, pairs)))
            elif term == "tokens":
                parts.append((term, *self.token_dpo_loss(batch, epoch)))
            elif term == "errors":
                parts.append((term, *self.family_errors_dpo_loss(batch, epoch)))
            else:
                raise ConfigError(f"training.method: dpo: unknown preference term {term!r} of {self.cfg.model.family}.")
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        loss = sum(part_loss for _, part_loss, _ in parts)
        metrics = {}
        for term, part_loss, part_metrics in parts:
            prefix = TERM_PREFIX.get(term, term)
            metrics[f"{prefix}/loss"] = part_loss.detach()
            metrics.update({f"{prefix}/{k}": v for k, v in part_metrics.items()})
        return loss, metrics

    def token_dpo_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token DPO on the summed log-probs of the chosen and rejected images' own tokens, policy vs
        reference, one forward each over [chosen; rejected]; winner and loser share prompt and controls."""
        dpo = self.cfg.dpo
        prompts = self.encoder.prompts_for(batch, epoch)
        count = len(prompts)
        tokens_batch: dict[str, Any] = {
            "prompt": prompts + prompts,
            "pixel_values": torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]])}
        controls = batch.get("control_pixel_values")
        if controls is not None:
            tokens_batch["control_pixel_values"] = [torch.cat([group, group]) for group in controls]
        logprobs = self.family.image_token_logprobs_per_token(tokens_batch)
        with torch.no_grad(), self.family.reference():
            ref_logprobs = self.family.image_token_logprobs_per_token(tokens_batch)
        policy, reference = logprobs.sum(dim=1), ref_logprobs.sum(dim=1)
        loss, metrics = token_dpo_loss(policy[:count], policy[count:], reference[:count], reference[count:],
                                       self.token_beta, dpo.loss_type, dpo.label_smoothing)
        metrics["ref_logp_gap"] = (reference[:count] - reference[count:]).mean()
        metrics["chosen_logp"] = policy[:count].detach().mean()
        metrics["rejected_logp"] = policy[count:].detach().mean()
        if dpo.sft_weight:  # mean next-token CE on the winner's image tokens
            sft = -logprobs[:count].mean()
            loss = loss + dpo.sft_weight * sft
            metrics["sft_loss"] = sft.detach()
        return loss, metrics

    def family_errors_dpo_loss(self, batch: dict[str, Any], epoch: int
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Diffusion-DPO on the per-sample flow errors the family computes itself (BAGEL). The seed
        (prompt dropout, timesteps, noise) depends on the data position only, as in SFT."""
        dpo = self.cfg.dpo
        seed = self.cfg.training.seed * 1_000_003 + epoch * 10_007 + int(batch["index"][0])
        errors, ref_errors = self.family.preference_errors(batch, seed)
        half = len(errors) // 2
        loss, metrics = diffusion_dpo_loss(errors[:half], errors[half:], ref_errors[:half], ref_errors[half:],
                                           self.beta, dpo.loss_type, dpo.label_smoothing)
        if dpo.sft_weight:
            loss = loss + dpo.sft_weight * errors[:half].mean()
        return loss, metrics

    def denoising_dpo_loss(self, batch: dict[str, Any], epoch: int, pairs: list[PreferencePair] | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = pairs if pairs is not None else [self.pairs[i] for i in batch["index"]]
        latents, condition, noise, timesteps = self.pair_inputs(batch, epoch, pairs)
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

    def online_batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], list[PreferencePair]]:
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
        noise/timestep draws per pair (one draw is a noisy estimate), without caption dropout."""
        if self.terms == ("tokens",):
            draws = 1  # token log-probs are exact: nothing is drawn
        encoder = self.encoder
        saved_dropout = encoder.caption_dropout if encoder is not None else 0.0
        if encoder is not None:
            encoder.caption_dropout = 0.0
        try:
            data = self.cfg.data
            if "errors" in self.terms:
                dataset = self.family.build_preference_dataset(list(pairs))
            else:
                dataset = PreferenceDataset(pairs, data.resolution, data.center_crop, False,
                                            seed=self.cfg.training.seed)
            batch = collate([dataset[i] for i in range(len(dataset))])
            results = []
            for draw in range(draws):
                loss, metrics = self.dpo_loss(batch, epoch=draw, pairs=pairs)
                results.append({"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}})
        finally:
            if encoder is not None:
                encoder.caption_dropout = saved_dropout
        return {k: sum(r[k] for r in results) / draws for k in results[0]}
