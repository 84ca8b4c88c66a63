"""GRPO for diffusion families: Flow-GRPO (flow families, SDE rollouts) and DDPO-style (SDXL, DDIM
with eta > 0), written once on the family interface and `trainers.sampler`.

Per micro-batch: each prompt is sampled `grpo.num_generations` times with the current policy (no
grad), the images are scored by the reward calculator, advantages are normalised within each
group (`algorithms.grpo.compute_advantages`, zero-std groups masked), then for a random
`timestep_fraction` of the stochastic steps the log-prob of the recorded transition is recomputed
with gradients and the clipped objective (+ `beta` x KL to the reference) is back-propagated, one
step at a time to bound memory. Groups never cross processes: a rank gets whole prompts
(`dataset_items_per_batch`) and samples all G members of each itself.

`grpo.num_iterations` > 1 (TRL's inner epochs): the rollouts of one optimizer step's micro-batches
are kept and trained on for `num_iterations` consecutive optimizer steps. The old log-probs stay
the rollout's, so the ratio is exactly 1 on the first iteration and departs from 1 (and the clip
acts) on later ones. `IterationBatchSampler` serves each block of `gradient_accumulation_steps`
batches `num_iterations` times; a checkpoint taken inside a block stores the rollout buffer, so
resume is exact.

Evaluation (every `logging.sample_steps` and at the end): the eval prompts are sampled with the
ODE (noise level 0) in `grpo.eval_steps` steps, scored, logged as `eval/reward/*`, and saved as a
grid with each image's rewards under it, next to a grid of the latest rollout.

Token GRPO (families whose trained component is a token generator feeding a diffusion decoder:
GLM-Image `model.component: ar`): per prompt, `num_generations` image-token sequences are sampled
with the current policy (`family.generate_image_tokens`, at `grpo.temperature`), decoded by the
frozen decoder (`family.condition_from_prior_tokens` + the shared ODE sampler, `grpo.sample_steps`
steps; the decoder noise is shared within a group so that rewards differ by the tokens only), and
scored by the reward calculator built for the component (`reward.weights.ar`). The loss is TRL's
(`algorithms.grpo.token_grpo_loss`, `grpo.loss_type`) on per-token log-probs recomputed with
gradients (`family.image_token_logprobs_per_token`), zero-std groups masked, plus `beta` x k3 KL
to the reference. First iteration: old log-probs = the recomputed ones, detached (ratio exactly
1, as TRL); they are kept for the later `num_iterations`. `gen_logprob_abs_diff` logs how far
the recomputed log-probs are from the sampling ones (numerics only: it should be ~1e-5).

Both (GLM-Image `model.component: both`, `JointRollout`): per member, the AR samples tokens (as
above), the trained DiT decodes them with the SDE sampler (`sde_rollout`, own noise per member,
no CFG), the images are scored once by a calculator of every reward either component uses, and
each component's total (`reward.weights.ar` / `.dit`) gives its own group advantages. The AR's
part goes through `token_backward`, the DiT's through `flow_backward` (the same code as the
single-component runs), both into one optimizer step; metrics under `ar/` and `dit/`, `loss` their
sum. The rollout buffer stores both parts and the DiT's prior tokens (its condition is rebuilt
from them after a resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from glm_training.algorithms.grpo import clipped_policy_loss, compute_advantages, flow_kl, token_grpo_loss
from glm_training.config import ConfigError
from glm_training.data.datasets import PromptDataset, Sample, ShardedBatchSampler, collate, load_prompts, \
    sample_generator
from glm_training.trainers.base import BaseTrainer
from glm_training.trainers.conditioning import ConditionEncoder
from glm_training.trainers.optim import lr_lambda
from glm_training.trainers.sampler import DiffusionSampler, Trajectory, generation_conditions, reward_inputs, \
    reward_notes, samples_latents, to_unit_images

logger = logging.getLogger(__name__)

SALT_ROLLOUT, SALT_TIMESTEPS = 5, 6
SALT_DECODE = 9  # decoder noise of token rollouts
BUFFER_FILE = "rollout_buffer_rank{rank}.safetensors"
COMPONENTS = ("ar", "dit")  # GLM-Image component: both, as the metric prefixes name them
EVAL_PROMPTS_FALLBACK = 4  # eval on the first training prompts when logging.sample_prompts is empty


@dataclass
class Rollout:
    """One micro-batch of rollouts: everything the policy update needs, reusable across iterations."""

    indices: list[int]  # dataset index of each prompt (each sampled G times, prompt-major)
    trajectory: Trajectory
    advantages: torch.Tensor  # (B*G,)
    valid: torch.Tensor  # (B*G,) bool, False in zero-std groups
    metrics: dict[str, float]  # reward statistics of the rollout
    condition: dict[str, Any] | None = None  # rebuilt from the batch after a resume
    uncondition: dict[str, Any] | None = None

    def to_tensors(self, micro: int | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{micro}.states": torch.stack(self.trajectory.states).cpu().contiguous(),
                   f"{micro}.log_probs": self.trajectory.log_probs.cpu().contiguous(),
                   f"{micro}.advantages": self.advantages.cpu().contiguous(),
                   f"{micro}.valid": self.valid.cpu().to(torch.uint8)}
        meta = {"indices": self.indices, "metrics": self.metrics, "stochastic": self.trajectory.stochastic}
        return tensors, meta

    @classmethod
    def from_tensors(cls, handle: Any, micro: str, meta: dict[str, Any], device: torch.device) -> "Rollout":
        states = handle.get_tensor(f"{micro}.states")
        trajectory = Trajectory(list(states.to(device).unbind(0)), handle.get_tensor(f"{micro}.log_probs"),
                                meta["stochastic"])
        return cls(meta["indices"], trajectory, handle.get_tensor(f"{micro}.advantages").to(device),
                   handle.get_tensor(f"{micro}.valid").bool().to(device), meta["metrics"])


@dataclass
class TokenRollout:
    """One micro-batch of token rollouts (token GRPO), reusable across iterations."""

    indices: list[int]  # dataset index of each prompt (each sampled G times, prompt-major)
    prompts: list[str]  # (B*G,)
    tokens: torch.Tensor  # (B*G, N) sampled image tokens
    gen_logprobs: torch.Tensor  # (B*G, N) per-token log-probs at sampling time
    advantages: torch.Tensor  # (B*G,)
    valid: torch.Tensor  # (B*G,) bool, False in zero-std groups
    metrics: dict[str, float]
    controls: list[torch.Tensor] | None = None  # control pixels repeated per member (image-to-image)
    old_logprobs: torch.Tensor | None = None  # recomputed on the first iteration, kept for the next ones

    TENSORS = ("tokens", "gen_logprobs", "advantages", "valid", "old_logprobs")

    def to_tensors(self, micro: int | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{micro}.{name}": getattr(self, name).detach().cpu().contiguous()
                   for name in self.TENSORS if getattr(self, name) is not None}
        tensors[f"{micro}.valid"] = self.valid.cpu().to(torch.uint8)
        for k, group in enumerate(self.controls or []):
            tensors[f"{micro}.control{k}"] = group.detach().cpu().contiguous()
        meta = {"kind": "tokens", "indices": self.indices, "prompts": self.prompts, "metrics": self.metrics,
                "controls": len(self.controls or [])}
        return tensors, meta

    @classmethod
    def from_tensors(cls, handle: Any, micro: str, meta: dict[str, Any], device: torch.device) -> "TokenRollout":
        keys = set(handle.keys())

        def get(name):
            key = f"{micro}.{name}"
            return handle.get_tensor(key).to(device) if key in keys else None

        controls = [get(f"control{k}") for k in range(meta["controls"])] or None
        return cls(meta["indices"], meta["prompts"], get("tokens"), get("gen_logprobs"), get("advantages"),
                   get("valid").bool(), meta["metrics"], controls, get("old_logprobs"))


@dataclass
class JointRollout:
    """One micro-batch of joint rollouts (GLM-Image `component: both`): the AR's sampled tokens
    (token GRPO, advantages from `reward.weights.ar`) and the DiT's SDE decoding of them
    (Flow-GRPO, advantages from `reward.weights.dit`), scored on the same images."""

    tokens: TokenRollout
    flow: Rollout
    prior_token_ids: torch.Tensor  # (B*G, L) the DiT's prior tokens (rebuilds its condition after a resume)

    @property
    def indices(self) -> list[int]:
        return self.tokens.indices

    def to_tensors(self, micro: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        token_tensors, token_meta = self.tokens.to_tensors(f"{micro}.ar")
        flow_tensors, flow_meta = self.flow.to_tensors(f"{micro}.dit")
        tensors = {**token_tensors, **flow_tensors,
                   f"{micro}.prior_token_ids": self.prior_token_ids.detach().cpu().contiguous()}
        return tensors, {"kind": "both", "ar": token_meta, "dit": flow_meta}

    @classmethod
    def from_tensors(cls, handle: Any, micro: str, meta: dict[str, Any], device: torch.device) -> "JointRollout":
        return cls(TokenRollout.from_tensors(handle, f"{micro}.ar", meta["ar"], device),
                   Rollout.from_tensors(handle, f"{micro}.dit", meta["dit"], device),
                   handle.get_tensor(f"{micro}.prior_token_ids").to(device))


class IterationBatchSampler:
    """Each block of `accumulation` consecutive batches of `base`, served `iterations` times in a
    row (one rollout, `iterations` optimizer steps). The ragged end of an epoch (fewer than
    `accumulation` batches) is dropped so blocks never cross epochs. Positions (`start_batch`)
    count served batches, as the trainer's `batch_in_epoch` does."""

    def __init__(self, base: ShardedBatchSampler, accumulation: int, iterations: int):
        self.base, self.accumulation, self.iterations = base, accumulation, iterations
        self.blocks = (base.num_samples // base.global_batch_size) // accumulation
        if self.blocks == 0:
            raise ConfigError(
                f"grpo.num_iterations > 1 needs at least training.gradient_accumulation_steps "
                f"({accumulation}) batches of prompts per epoch; the data has "
                f"{base.num_samples // base.global_batch_size}. Add prompts or lower the accumulation.")
        self.start_batch = 0

    @property
    def served_per_epoch(self) -> int:
        return self.blocks * self.accumulation * self.iterations

    def position(self, served: int) -> tuple[int, int]:
        """(iteration, micro-batch within the block) of the served batch number `served`."""
        within = served % (self.accumulation * self.iterations)
        return within // self.accumulation, within % self.accumulation

    def __len__(self) -> int:
        return self.served_per_epoch - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.base.set_epoch(epoch, 0)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.base)
        for served in range(self.start_batch, self.served_per_epoch):
            block = served // (self.accumulation * self.iterations)
            yield batches[block * self.accumulation + self.position(served)[1]]


class GRPOTrainer(BaseTrainer):
    method = "grpo"

    def dataset_items_per_batch(self) -> int:
        return self.cfg.training.batch_size // self.cfg.grpo.num_generations

    def build_dataset(self) -> PromptDataset:
        from glm_training.rewards import build_reward_calculator, resolve_weights

        grpo = self.cfg.grpo
        if not samples_latents(self.family):
            raise ConfigError(f"training.method: grpo for {self.cfg.model.family} is not available yet.")
        # What the trained components are, as the family reports it (GLM-Image: "tokens" for the AR);
        # a family that only presents the sampling interface trains its denoiser.
        terms = tuple(getattr(self.family, "sft_loss_terms", ("denoising",)))
        self.token_policy = terms == ("tokens",)
        # Both (GLM-Image `component: both`): token GRPO on the AR and Flow-GRPO on the DiT, one rollout.
        self.joint = "tokens" in terms and not self.token_policy
        if self.joint and set(terms) != {"tokens", "denoising"}:
            raise ConfigError(f"training.method: grpo: model.component {self.cfg.model.component!r} trains "
                              f"{list(terms)}; GRPO trains a token generator, a diffusion decoder, or both.")
        if grpo.beta > 0:
            self.family.snapshot_reference()  # full fine-tuning: frozen copy before any update
        self.samples = load_prompts(self.cfg.data.path)
        missing = [s.prompt for s in self.samples if not s.control_images]
        if self.cfg.training.mode == "i2i" and missing:  # as SFT: i2i needs a source image per prompt
            raise ConfigError(f"training.mode: i2i needs a source image for every prompt; {len(missing)} have none "
                              f"(e.g. {missing[0]!r}). Prompts .jsonl: a 'source_image' per line; folder: "
                              "source_images/.")
        self.encoder = ConditionEncoder(self.family, self.samples,
                                        self.cfg.cache.dir if self.cfg.cache.enabled else None,
                                        self.cfg.data.resolution, 0.0, self.cfg.training.seed)
        self.guidance = grpo.guidance_scale if grpo.train_cfg or grpo.guidance_scale == 1.0 else 1.0
        self.sampler_ = DiffusionSampler(self.family, grpo.sample_steps, self.guidance, grpo.noise_level,
                                         grpo.sde_window)
        if self.joint and self.guidance != 1.0:
            raise ConfigError("grpo.guidance_scale with grpo.train_cfg: GLM-Image component: both decodes the AR's "
                              "tokens without classifier-free guidance; set grpo.guidance_scale: 1.0 (or "
                              "train_cfg: false).")
        reward_cfg = self.cfg.to_dict()["reward"]
        self.reward_weights: dict[str, dict[str, float]] = {}
        if self.joint:
            # One calculator runs every reward either component uses, once per image; each
            # component's total is its own weighted sum (`reward.weights.ar` / `reward.weights.dit`).
            for component in COMPONENTS:
                table = {n: w for n, w in resolve_weights(reward_cfg, component).items() if w != 0.0}
                if not table:
                    raise ConfigError(f"reward.weights.{component}: every reward has weight 0 for the "
                                      f"{component}; give it at least one reward.")
                self.reward_weights[component] = table
            used = [n for n in reward_cfg["rewards"] if any(n in t for t in self.reward_weights.values())]
            reward_cfg = {**reward_cfg, "weights": {"joint": {n: 1.0 for n in used}}}
            self.rewards = build_reward_calculator(reward_cfg, "joint")
            logger.info("Reward weights: ar %s, dit %s", self.reward_weights["ar"], self.reward_weights["dit"])
        else:
            self.rewards = build_reward_calculator(reward_cfg, self.cfg.model.component)
        self.buffer: dict[int, Rollout] = {}
        self.last_rollout: tuple[list[str], torch.Tensor, list[str]] | None = None  # prompts, images, notes
        return PromptDataset(self.samples, self.cfg.data.resolution)

    def setup(self) -> None:
        super().setup()
        iterations = self.cfg.grpo.num_iterations
        if iterations > 1:
            accumulation = self.cfg.training.gradient_accumulation_steps
            self.sampler = IterationBatchSampler(self.sampler, accumulation, iterations)
            self.batches_per_epoch = self.sampler.served_per_epoch
            if not self.cfg.training.max_train_steps:
                # num_epochs counts passes over the prompts; each pass now takes `iterations`
                # times more optimizer steps, and the LR schedule spans all of them.
                self.max_steps = self.sampler.blocks * iterations * self.cfg.training.num_epochs
                sched = self.cfg.lr_scheduler
                self.scheduler.lr_lambdas = [lr_lambda(sched.name, sched.warmup_steps, self.max_steps,
                                                       sched.min_lr_ratio) for _ in self.scheduler.lr_lambdas]

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Not used: the GRPO loss is back-propagated per trained timestep in `backward`."""
        raise TypeError("GRPOTrainer computes its loss per timestep in backward().")

    # -- rollouts ------------------------------------------------------------------------------

    def conditions(self, batch: dict[str, Any], repeats: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if hasattr(self.family, "rollout_conditions"):  # families that build their own sampling conditions
            return self.family.rollout_conditions(batch, repeats, self.cfg.data.resolution,
                                                  self.sampler_.guidance_scale)
        return generation_conditions(self.family, self.encoder, self.samples, batch, repeats,
                                     self.cfg.data.resolution, self.sampler_.guidance_scale)

    def make_rollout(self, batch: dict[str, Any]) -> Rollout | TokenRollout | JointRollout:
        """Sample G images per prompt with the current policy, score them, normalise advantages."""
        if self.token_policy:
            return self.make_token_rollout(batch)
        if self.joint:
            return self.make_joint_rollout(batch)
        group = self.cfg.grpo.num_generations
        condition, uncondition = self.conditions(batch, group)
        trajectory = self.sde_rollout(self.member_generators(batch, SALT_ROLLOUT), condition, uncondition)
        images = to_unit_images(self.family, trajectory.final)
        inputs, totals, per_reward = self.score(batch, images, group)
        advantages, valid, metrics = self.group_advantages(batch, totals, per_reward)
        self.last_rollout = (inputs.prompts, images, self.notes(totals, per_reward))
        return Rollout(list(batch["index"]), trajectory, advantages, valid, metrics, condition, uncondition)

    # -- what every rollout kind shares ----------------------------------------------------------

    def member_generators(self, batch: dict[str, Any], salt: int) -> list[torch.Generator]:
        """Rollout randomness per (prompt, member), independent of batching and resume."""
        group, seed = self.cfg.grpo.num_generations, self.cfg.training.seed
        return [sample_generator(seed, self.global_step, int(index) * group + member, salt)
                for index in batch["index"] for member in range(group)]

    def sde_rollout(self, generators: list[torch.Generator], condition: dict[str, Any],
                    uncondition: dict[str, Any] | None = None) -> Trajectory:
        """The policy's SDE trajectory (per-step log-probs) from noise drawn with `generators`."""
        size = self.cfg.data.resolution
        shape = self.family.latent_shape(size, size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        return self.sampler_.rollout(noise, condition, uncondition, generators=generators)

    def score(self, batch: dict[str, Any], images: torch.Tensor, group: int, tokens: torch.Tensor | None = None
              ) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(reward inputs, totals, each reward's scores). `totals`: {"": the calculator's total}, or
        for component: both {"ar": ..., "dit": ...}, each weighted by its `reward.weights` table.
        With `tokens` (the AR's sampled image tokens), each sample's metadata carries them as
        `image_tokens` (a list of ints), for token-level rewards."""
        inputs = reward_inputs(batch, images, group)
        if tokens is not None:
            inputs.metadata = [{"image_tokens": row.tolist()} for row in tokens.cpu()]
        total, per_reward = self.rewards(inputs)
        if not self.joint:
            return inputs, {"": total}, per_reward
        totals = {component: sum((weight * per_reward[name] for name, weight in table.items()),
                                 torch.zeros(len(total), dtype=torch.float32))
                  for component, table in self.reward_weights.items()}
        return inputs, totals, per_reward

    def reward_stats(self, totals: dict[str, torch.Tensor], per_reward: dict[str, torch.Tensor],
                     component: str = "") -> dict[str, float]:
        """`reward/*` statistics of one total (and of the rewards that make it)."""
        if component:
            per_reward = {name: per_reward[name] for name in self.reward_weights[component]}
        return self.rewards.log_stats(totals[component], per_reward)

    def group_advantages(self, batch: dict[str, Any], totals: dict[str, torch.Tensor],
                         per_reward: dict[str, torch.Tensor], component: str = ""
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Group-normalised advantages of one total, its valid mask and its reward metrics.
        Group = one prompt of this rank's batch: all G members were sampled here."""
        grpo = self.cfg.grpo
        group_ids = torch.arange(len(batch["index"])).repeat_interleave(grpo.num_generations)
        advantages, valid, adv_stats = compute_advantages(totals[component].float(), group_ids, grpo.scale_rewards,
                                                          grpo.adv_clip_max)
        metrics = {**self.reward_stats(totals, per_reward, component),
                   "zero_std_fraction": float(adv_stats["zero_std_fraction"]),
                   "advantage_abs_mean": float(advantages.abs().mean())}
        return advantages.to(self.device), valid.to(self.device), metrics

    def notes(self, totals: dict[str, torch.Tensor], per_reward: dict[str, torch.Tensor]) -> list[str]:
        """Grid captions: `R=<total> name=<score> ...` (component: both: `R_ar=... R_dit=...`)."""
        if not self.joint:
            return reward_notes(totals[""], per_reward)
        lines = reward_notes(totals["ar"], {"R_dit": totals["dit"], **per_reward})
        return [line.replace("R=", "R_ar=", 1) for line in lines]

    def position(self) -> tuple[int, int]:
        """(iteration, micro-batch) of the batch being trained: (0, 0) without num_iterations."""
        if isinstance(self.sampler, IterationBatchSampler):
            return self.sampler.position(self.batch_in_epoch)
        return 0, 0

    def rollout_for(self, batch: dict[str, Any]) -> tuple[Rollout, int]:
        iteration, micro = self.position()
        if iteration == 0:
            rollout = self.make_rollout(batch)
            if self.cfg.grpo.num_iterations > 1:
                self.buffer[micro] = rollout
            return rollout, iteration
        rollout = self.buffer.get(micro)
        if rollout is None or rollout.indices != list(batch["index"]):
            raise RuntimeError(
                f"GRPO num_iterations: no stored rollout for iteration {iteration}, micro-batch {micro} at step "
                f"{self.global_step}. The checkpoint resumed from lacks {BUFFER_FILE.format(rank='<r>')} "
                "(its save was interrupted?): resume from an earlier checkpoint.")
        if isinstance(rollout, JointRollout):
            if rollout.flow.condition is None:  # restored: recomputed from the stored tokens
                rollout.flow.condition = self.decoder_condition(batch, rollout.tokens.prompts,
                                                                rollout.prior_token_ids, rollout.tokens.controls)
        elif not isinstance(rollout, TokenRollout) and rollout.condition is None:  # restored: recomputed
            rollout.condition, rollout.uncondition = self.conditions(batch, self.cfg.grpo.num_generations)
        return rollout, iteration

    # -- the policy update ---------------------------------------------------------------------

    def backward(self, batch: dict[str, Any], scale: float) -> dict[str, float]:
        rollout, iteration = self.rollout_for(batch)
        if isinstance(rollout, JointRollout):
            # Both losses into the same gradients: one optimizer step updates the AR and the DiT.
            parts = {"ar": self.token_backward(rollout.tokens, iteration, scale),
                     "dit": self.flow_backward(rollout.flow, iteration, scale)}
            metrics = {f"{name}/{key}": value for name, part in parts.items() for key, value in part.items()
                       if key != "iteration"}
            return {**metrics, "loss": parts["ar"]["loss"] + parts["dit"]["loss"], "iteration": float(iteration)}
        if isinstance(rollout, TokenRollout):
            return self.token_backward(rollout, iteration, scale)
        return self.flow_backward(rollout, iteration, scale)

    def flow_backward(self, rollout: Rollout, iteration: int, scale: float) -> dict[str, float]:
        """Flow-GRPO / DDPO: the clipped objective on the recorded transitions of a random
        `timestep_fraction` of the stochastic steps, back-propagated one step at a time."""
        grpo, seed = self.cfg.grpo, self.cfg.training.seed
        trajectory, condition, uncondition = rollout.trajectory, rollout.condition, rollout.uncondition
        steps = [k for k, stochastic in enumerate(trajectory.stochastic) if stochastic]
        if grpo.timestep_fraction < 1.0:
            order = torch.randperm(len(steps), generator=sample_generator(seed, self.global_step, 0, SALT_TIMESTEPS))
            steps = [steps[i] for i in order[:max(1, round(grpo.timestep_fraction * len(steps)))].tolist()]
        if not steps:
            raise ConfigError("No stochastic sampling step to train: raise grpo.noise_level or widen grpo.sde_window.")
        sums: dict[str, float] = {}
        ratio_min, ratio_max = float("inf"), float("-inf")
        epsilons = (grpo.epsilon, grpo.epsilon_high) if grpo.flow_epsilon is None else (grpo.flow_epsilon, None)
        schedule = self.sampler_.schedule(trajectory.states[0])
        for k in steps:
            state, target = trajectory.states[k].to(self.device), trajectory.states[k + 1].to(self.device)
            step = self.sampler_.step(k, state, condition, uncondition, prev_sample=target, schedule=schedule)
            loss, stats = clipped_policy_loss(step.log_prob, trajectory.log_probs[:, k].to(self.device),
                                              rollout.advantages, *epsilons, mask=rollout.valid)
            if grpo.beta > 0:
                with torch.no_grad(), self.family.reference():
                    reference = self.sampler_.step(k, state, condition, uncondition, prev_sample=target,
                                                   schedule=schedule)
                kl = flow_kl(step.mean, reference.mean, step.std).mean()
                loss = loss + grpo.beta * kl
                stats["kl"] = kl.detach()
            self.accelerator.backward(loss * scale / len(steps))
            ratio_min, ratio_max = min(ratio_min, float(stats.pop("ratio_min"))), max(ratio_max,
                                                                                     float(stats.pop("ratio_max")))
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        # Sum, then divide: an on-policy ratio of exactly 1 stays exactly 1 in the logs.
        means = {key: value / len(steps) for key, value in sums.items()}
        return {**rollout.metrics, **means, "ratio_min": ratio_min, "ratio_max": ratio_max,
                "iteration": float(iteration)}

    # -- token GRPO (a token generator feeding a frozen diffusion decoder) ----------------------

    def sample_token_images(self, batch: dict[str, Any], group: int, seed: int, steps: int
                            ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sample `group` token sequences per prompt of `batch` with the current policy (one seeded
        call; the global RNG is left as it was) and decode them with the frozen decoder (ODE, `steps`
        steps, decoder noise shared within each group). Returns images in [0, 1] and the generation."""
        size, family = self.cfg.data.resolution, self.family
        prompts, generation = self.generate_tokens(batch, group, seed)
        condition = self.decoder_condition(batch, prompts, generation["prior_token_ids"], generation["controls"])
        shape = family.latent_shape(size, size)
        noise = torch.stack([torch.randn(shape, generator=sample_generator(self.cfg.training.seed, seed, int(index),
                                                                           SALT_DECODE))
                             for index in batch["index"]]).repeat_interleave(group, dim=0)
        decoder = DiffusionSampler(family, steps, 1.0, noise_level=0.0)
        images = to_unit_images(family, decoder.rollout(noise.to(self.device), condition).final)
        return images, generation

    def generate_tokens(self, batch: dict[str, Any], group: int, seed: int) -> tuple[list[str], dict[str, Any]]:
        """`group` token sequences per prompt with the current AR (one seeded call; the global RNG is
        left as it was): prompts repeated, and the generation (tokens, logprobs, prior_token_ids,
        controls: the control pixels repeated per member, or None)."""
        size = self.cfg.data.resolution
        prompts = [p for p in batch["prompt"] for _ in range(group)]
        controls = batch.get("control_pixel_values")
        if controls is not None:
            controls = [g.repeat_interleave(group, dim=0).to(self.device) for g in controls]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # generate_image_tokens seeds the global RNG
            generation = self.family.generate_image_tokens(prompts, height=size, width=size, seed=seed,
                                                           control_pixels=controls,
                                                           temperature=self.cfg.grpo.temperature)
        generation["controls"] = controls
        return prompts, generation

    def decoder_condition(self, batch: dict[str, Any], prompts: list[str], prior_token_ids: torch.Tensor,
                          controls: list[torch.Tensor] | None) -> dict[str, Any]:
        """The DiT condition for decoding generated tokens (`prompts`: the batch's, each repeated G times)."""
        size, group = self.cfg.data.resolution, len(prompts) // len(batch["index"])
        control_paths = [self.samples[i].control_images for i in batch["index"] for _ in range(group)]
        embeds = self.encoder.encode_prompts(prompts, control_paths, controls)
        return self.family.condition_from_prior_tokens(embeds, prior_token_ids, size, size, controls)

    def token_rollout_seed(self, batch: dict[str, Any]) -> int:
        """One token-sampling seed per (step, micro-batch): from its first prompt's index."""
        draw = sample_generator(self.cfg.training.seed, self.global_step, int(batch["index"][0]), SALT_ROLLOUT)
        return int(torch.randint(0, 2**31 - 1, (1,), generator=draw))

    @torch.no_grad()
    def make_token_rollout(self, batch: dict[str, Any]) -> TokenRollout:
        grpo = self.cfg.grpo
        group = grpo.num_generations
        images, generation = self.sample_token_images(batch, group, self.token_rollout_seed(batch), grpo.sample_steps)
        inputs, totals, per_reward = self.score(batch, images, group, generation["tokens"])
        advantages, valid, metrics = self.group_advantages(batch, totals, per_reward)
        self.last_rollout = (inputs.prompts, images, self.notes(totals, per_reward))
        return TokenRollout(list(batch["index"]), inputs.prompts, generation["tokens"], generation["logprobs"].float(),
                            advantages, valid, metrics, generation["controls"])

    @torch.no_grad()
    def make_joint_rollout(self, batch: dict[str, Any]) -> JointRollout:
        """component: both: the AR samples each member's tokens (per-token log-probs), the DiT decodes
        them with the SDE (per-step log-probs, own noise per member), the images are scored once and
        each component gets advantages from its own total (`reward.weights.ar` / `.dit`)."""
        group = self.cfg.grpo.num_generations
        indices = list(batch["index"])
        prompts, generation = self.generate_tokens(batch, group, self.token_rollout_seed(batch))
        condition = self.decoder_condition(batch, prompts, generation["prior_token_ids"], generation["controls"])
        trajectory = self.sde_rollout(self.member_generators(batch, SALT_DECODE), condition)
        images = to_unit_images(self.family, trajectory.final)
        inputs, totals, per_reward = self.score(batch, images, group, generation["tokens"])
        parts = {component: self.group_advantages(batch, totals, per_reward, component) for component in COMPONENTS}
        self.last_rollout = (inputs.prompts, images, self.notes(totals, per_reward))
        tokens = TokenRollout(indices, inputs.prompts, generation["tokens"], generation["logprobs"].float(),
                              *parts["ar"], generation["controls"])
        flow = Rollout(indices, trajectory, *parts["dit"], condition, None)
        return JointRollout(tokens, flow, generation["prior_token_ids"])

    def token_backward(self, rollout: TokenRollout, iteration: int, scale: float) -> dict[str, float]:
        grpo, size = self.cfg.grpo, self.cfg.data.resolution
        count = len(rollout.prompts)
        batch: dict[str, Any] = {"prompt": rollout.prompts, "image_tokens": rollout.tokens,
                                 "pixel_values": torch.zeros(count, 3, size, size)}  # sets the size only
        if rollout.controls is not None:
            batch["control_pixel_values"] = rollout.controls
        logprobs = self.family.image_token_logprobs_per_token(batch, temperature=grpo.temperature)
        reference = None
        if grpo.beta > 0:
            with torch.no_grad(), self.family.reference():
                reference = self.family.image_token_logprobs_per_token(batch, temperature=grpo.temperature)
        if iteration == 0:
            old = None  # on-policy: ratio exactly 1 (TRL); the recomputed values serve later iterations
            rollout.old_logprobs = logprobs.detach()
        elif rollout.old_logprobs is None:
            raise RuntimeError("token GRPO: a later iteration without the first iteration's log-probs.")
        else:
            old = rollout.old_logprobs
        # Zero-std groups (advantage 0) are masked out of the loss, as in Flow-GRPO here.
        mask = rollout.valid[:, None].expand_as(logprobs)
        loss, stats = token_grpo_loss(logprobs, old, rollout.advantages, mask, grpo.epsilon, grpo.epsilon_high,
                                      grpo.beta, reference, grpo.loss_type)
        self.accelerator.backward(loss * scale)
        with torch.no_grad():
            gap = (logprobs.detach() - rollout.gen_logprobs.to(logprobs.device)).abs().mean()
        return {**rollout.metrics, "loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()},
                "gen_logprob_abs_diff": float(gap), "iteration": float(iteration)}

    # -- resumable rollout buffer (num_iterations > 1) ------------------------------------------

    def save_checkpoint(self) -> Path | None:
        path = super().save_checkpoint()
        if self.position()[0] != 0 and self.buffer:  # the next steps still train on this buffer
            from safetensors.torch import save_file

            folder = self.run_dir / f"checkpoint-{self.global_step}"
            tensors, meta = {}, {}
            for micro, rollout in self.buffer.items():
                part_tensors, meta[str(micro)] = rollout.to_tensors(micro)
                tensors.update(part_tensors)
            tmp = folder / (BUFFER_FILE.format(rank=self.accelerator.process_index) + ".tmp")
            save_file(tensors, str(tmp), metadata={"rollouts": json.dumps(meta)})
            tmp.rename(tmp.with_suffix(""))
            self.accelerator.wait_for_everyone()
        return path

    def _restore(self, path: Path) -> None:
        super()._restore(path)
        file = path / BUFFER_FILE.format(rank=self.accelerator.process_index)
        if not file.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            meta = json.loads(handle.metadata()["rollouts"])
            kinds = {"tokens": TokenRollout, "both": JointRollout}
            for micro, info in meta.items():
                kind = kinds.get(info.get("kind"), Rollout)
                self.buffer[int(micro)] = kind.from_tensors(handle, micro, info, self.device)

    # -- evaluation with the ODE sampler ---------------------------------------------------------

    def eval_samples(self) -> list[Sample]:
        """`logging.sample_prompts` (+ `sample_control_images`), else the first training prompts."""
        log = self.cfg.logging
        if log.sample_prompts:
            controls = log.sample_control_images or [None] * len(log.sample_prompts)
            return [Sample(p, None, [Path(c)] if c else []) for p, c in zip(log.sample_prompts, controls)]
        return self.samples[:EVAL_PROMPTS_FALLBACK]

    @contextlib.contextmanager
    def _unwrapped_modules(self) -> Iterator[None]:
        """Eval runs on the main process only: bypass DDP wrappers (their forward may communicate)."""
        saved = {name: self.family.modules[name] for name in self.family.trained}
        self.family.modules.update({name: self.family.unwrapped(name) for name in saved})
        try:
            yield
        finally:
            self.family.modules.update(saved)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """ODE samples of the eval prompts, scored; returns (and logs) `eval/reward/*`."""
        grpo, size = self.cfg.grpo, self.cfg.data.resolution
        samples = self.eval_samples()
        dataset = PromptDataset(samples, size)
        batch = collate([dataset[i] for i in range(len(dataset))])
        if self.token_policy or self.joint:  # tokens sampled at a fixed seed, decoded with eval_steps ODE steps
            saved_samples, self.samples = self.samples, samples  # batch indices refer to the eval samples
            try:
                with self._unwrapped_modules():
                    images, generation = self.sample_token_images(batch, 1, self.cfg.logging.sample_seed,
                                                                  grpo.eval_steps)
            finally:
                self.samples = saved_samples
            return self.log_eval(batch, images, step, generation["tokens"])
        sampler = DiffusionSampler(self.family, grpo.eval_steps, self.sampler_.guidance_scale, noise_level=0.0)
        saved_samples, self.samples = self.samples, samples  # generation_conditions reads control paths
        try:
            with self._unwrapped_modules():
                condition, uncondition = self.conditions(batch, 1)
                shape = self.family.latent_shape(size, size)
                noise = torch.stack([torch.randn(shape, generator=sample_generator(
                    self.cfg.logging.sample_seed, 0, i, SALT_ROLLOUT)) for i in range(len(samples))])
                latents = sampler.rollout(noise.to(self.device), condition, uncondition).final
                images = to_unit_images(self.family, latents)
        finally:
            self.samples = saved_samples
        return self.log_eval(batch, images, step)

    def log_eval(self, batch: dict[str, Any], images: torch.Tensor, step: int,
                 tokens: torch.Tensor | None = None) -> dict[str, float]:
        """Score the eval images, log `eval/reward/*` (component: both: `eval/ar/reward/*`,
        `eval/dit/reward/*`), save the grid."""
        _, totals, per_reward = self.score(batch, images, 1, tokens)
        if self.joint:
            metrics = {f"eval/{component}/{k}": v for component in COMPONENTS
                       for k, v in self.reward_stats(totals, per_reward, component).items()}
        else:
            metrics = {f"eval/{k}": v for k, v in self.reward_stats(totals, per_reward).items()}
        self.trackers.log(metrics, step)
        self.save_samples(_pil(images), list(batch["prompt"]), step, notes=self.notes(totals, per_reward))
        return metrics

    def sample_images(self, step: int) -> None:
        metrics = self.evaluate(step)
        reward = ", ".join(f"{k[len('eval/'):-len('/reward/total_mean')] or 'total'} {v:.4f}"
                           for k, v in metrics.items() if k.endswith("reward/total_mean"))
        logger.info("Step %d: eval reward %s (ODE, %d steps)", step, reward, self.cfg.grpo.eval_steps)
        if self.last_rollout is not None:
            prompts, images, notes = self.last_rollout
            self.save_samples(_pil(images), prompts, step, notes=notes, name="rollout")

    def _sample(self, step: int) -> None:
        # Unlike the base class, GRPO evaluates even without logging.sample_prompts.
        if self.is_main:
            self.sample_images(step)
        self.accelerator.wait_for_everyone()


def _pil(images: torch.Tensor) -> list:
    from PIL import Image

    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in array]
