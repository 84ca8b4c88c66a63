"""The denoiser kind: SFT, Diffusion-DPO and Flow-GRPO / DDPO, written once on the family's
diffusion hooks (`models.base.DenoiserHooks`: `objective`, `latent_shape`, `encode_images`,
`decode_latents`, `encode_prompt`, `condition`, `predict`).

- SFT: `w(t) * mean((predict(x_t, t) - target)^2)` with x_t, target and w from the objective.
- DPO: winner and loser share the timestep and the noise; the reference is the family's
  `reference()` (adapter disabled, or a frozen copy with full fine-tuning).
- GRPO: SDE (flow) / DDIM with eta > 0 (epsilon) rollouts with per-step log-probs
  (`parts.sampler.DiffusionSampler`), and the clipped objective on a random subset of the
  stochastic steps (`grpo.timestep_fraction`), one backward per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from glm_training.algorithms.dpo import diffusion_dpo_loss
from glm_training.algorithms.grpo import clipped_policy_loss, flow_kl
from glm_training.algorithms.objectives import per_sample_mse
from glm_training.config import ConfigError
from glm_training.data.datasets import Record, sample_generator
from glm_training.parts.common import SALT_ROLLOUT, SALT_TIMESTEPS, Part, StepContext
from glm_training.parts.conditioning import ConditionEncoder
from glm_training.parts.sampler import DiffusionSampler, Trajectory, generation_conditions, to_unit_images


def denoising_errors(part: Any, latents: torch.Tensor, condition: dict[str, Any], noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the prediction against the objective's target, shape (B,)."""
    objective = part.objective
    prediction = part.predict(objective.add_noise(latents, noise, timesteps), timesteps, condition)
    return per_sample_mse(prediction, objective.target(latents, noise, timesteps))


def diffusion_sft_loss(part: Any, latents: torch.Tensor, condition: dict[str, Any], noise: torch.Tensor,
                       timesteps: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted denoising loss, shape (B,)."""
    errors = denoising_errors(part, latents, condition, noise, timesteps)
    return errors * part.objective.loss_weights(timesteps).to(errors.device)


@dataclass
class DenoiserRollout:
    """A micro-batch of denoiser rollouts, reusable across `grpo.num_iterations`. Only tensors are
    stored (`to_tensors`); the condition is rebuilt from the batch (and `inputs`, e.g. the prior
    tokens another part sampled) after a resume."""

    trajectory: Trajectory
    condition: dict[str, Any] | None = None
    uncondition: dict[str, Any] | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{prefix}.states": torch.stack(self.trajectory.states).cpu().contiguous(),
                   f"{prefix}.log_probs": self.trajectory.log_probs.cpu().contiguous()}
        # Cloned: an input may be another part's output (one storage, which safetensors refuses twice).
        tensors.update({f"{prefix}.inputs.{k}": v.detach().cpu().clone() for k, v in self.inputs.items()})
        return tensors, {"stochastic": self.trajectory.stochastic, "inputs": sorted(self.inputs)}

    def replace_members(self, members: list[int], other: "DenoiserRollout") -> None:
        """Members `members` taken from `other` (a rollout of just those, in order); the condition
        is rebuilt on next use (`Denoiser.restore`)."""
        index = torch.tensor(members)
        for state, fresh in zip(self.trajectory.states, other.trajectory.states):
            state[index.to(state.device)] = fresh.to(state.device)
        self.trajectory.log_probs[index] = other.trajectory.log_probs.to(self.trajectory.log_probs.device)
        for key, value in self.inputs.items():
            value[index.to(value.device)] = other.inputs[key].to(value.device)
        self.condition = self.uncondition = None

    @classmethod
    def from_tensors(cls, handle: Any, prefix: str, meta: dict[str, Any], device: torch.device) -> "DenoiserRollout":
        states = handle.get_tensor(f"{prefix}.states").to(device)
        trajectory = Trajectory(list(states.unbind(0)), handle.get_tensor(f"{prefix}.log_probs"), meta["stochastic"])
        inputs = {k: handle.get_tensor(f"{prefix}.inputs.{k}").to(device) for k in meta["inputs"]}
        return cls(trajectory, inputs=inputs)


class Denoiser(Part):
    """A denoising network of a family. The hooks default to the family's own methods; a family
    whose denoiser needs more (BAGEL's packed sequences, GLM-Image's prior tokens) subclasses this."""

    kind = "denoiser"
    #: Record fields each training needs (the trainer adds "controls" for image-to-image).
    sft_needs = frozenset({"prompt", "target"})
    preference_needs = frozenset({"prompt", "chosen", "rejected"})
    rollout_needs = frozenset({"prompt"})
    #: Whether the part can sample for online DPO pairs with the shared sampler.
    online_pairs = True
    #: Whether its preference loss is exact (token log-probs) or drawn (noise, timesteps).
    exact_preference = False

    def __init__(self, family: Any, name: str):
        super().__init__(family, name)
        self.encoder: ConditionEncoder | None = None
        self.sampler: DiffusionSampler | None = None

    # -- the hooks the shared code calls -----------------------------------------------------

    @property
    def objective(self) -> Any:
        return self.family.objective

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: dict[str, Any]) -> torch.Tensor:
        return self.family.predict(noisy_latents, timesteps, condition)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self.family.latent_shape(height, width)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.decode_latents(latents)

    # -- data ------------------------------------------------------------------------------------

    def prepare(self, records: list[Record], caption_dropout: float | None = None, use_cache: bool = True) -> None:
        """Bind the run's records and the encoder that turns batches into model inputs (cached
        prompt embeddings and latents when `cache.enabled` and `use_cache`)."""
        cfg, data = self.cfg, self.cfg.data
        if cfg.cache.enabled and not data.center_crop:
            raise ConfigError("cache.enabled needs data.center_crop: true (random crops change the latents).")
        self.records = records
        dropout = data.caption_dropout if caption_dropout is None else caption_dropout
        cache_dir = cfg.cache.dir if cfg.cache.enabled and use_cache else None
        self.encoder = ConditionEncoder(self.family, records, cache_dir,
                                        data.resolution, dropout, cfg.training.seed, data.random_flip,
                                        control_dropout=data.control_dropout)

    def prompts_for(self, batch: dict[str, Any], epoch: int) -> list[str]:
        """The batch's prompts after caption dropout (the same draw for every part)."""
        return self.encoder.prompts_for(batch, epoch)

    @property
    def caption_dropout(self) -> float:
        return self.encoder.caption_dropout

    @caption_dropout.setter
    def caption_dropout(self, value: float) -> None:
        self.encoder.caption_dropout = value

    def cached_prompt_embeds(self, prompts: list[str]) -> dict[str, Any]:
        """With the cache on, sample prompts' embeddings (and the empty prompt's) from it."""
        if self.encoder is None or self.encoder.cache is None or self.family.prompt_uses_images:
            return {}
        return {"prompt_embeds": self.encoder.encode_prompts(prompts),
                "negative_prompt_embeds": self.encoder.encode_prompts([""] * len(prompts))}

    # -- SFT -------------------------------------------------------------------------------------

    def sft_loss(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        latents, condition = self.encoder(batch, ctx.epoch)
        noise, timesteps = self.encoder.noise_and_timesteps(latents, batch["index"], ctx.epoch,
                                                            self.cfg.training.noise_offset)
        loss = diffusion_sft_loss(self, latents, condition, noise, timesteps).mean()
        return loss, {"loss": loss.item()}

    def sft_eval_losses(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validation: the SFT loss per sample (B,) and each sample's timestep on [0, 1] (1 = pure
        noise), at the noise and timestep drawn from (seed, ctx.epoch, index), as `sft_loss`."""
        latents, condition = self.encoder(batch, ctx.epoch)
        noise, timesteps = self.encoder.noise_and_timesteps(latents, batch["index"], ctx.epoch,
                                                            self.cfg.training.noise_offset)
        losses = diffusion_sft_loss(self, latents, condition, noise, timesteps)
        total = getattr(self.objective, "num_train_timesteps", None)  # epsilon: integer steps; flow: sigmas
        unit = timesteps.float().cpu() / total if total else timesteps.float().cpu()
        return losses.detach().float().cpu(), unit

    # -- Diffusion-DPO ---------------------------------------------------------------------------

    def dpo_beta(self, dpo: Any, alone: bool) -> float:
        return dpo.beta or self.family.default_dpo_beta

    def pair_inputs(self, batch: dict[str, Any], epoch: int, pairs: list[Record]
                    ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
        """-> latents [winners; losers], their condition, shared noise and timesteps (repeated)."""
        encoder, flips = self.encoder, batch["flip"]
        latents = torch.cat([
            encoder.encode_latents(batch["chosen_pixel_values"], [p.chosen for p in pairs], flips, "chosen"),
            encoder.encode_latents(batch["rejected_pixel_values"], [p.rejected for p in pairs], flips, "rejected")])
        control_paths = [p.controls for p in pairs]
        controls = batch.get("control_pixel_values")
        embeds = encoder.encode_prompts(encoder.prompts_for(batch, epoch), control_paths, controls)
        both = {k: torch.cat([v, v]) for k, v in embeds.items()}
        merged = {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
                  for key in ("original_size", "crop_top_left")}
        merged["target_size"] = torch.cat([batch["target_size"]] * 2)
        # The pixels too, for families whose condition reads them (GLM-Image: the prior tokens).
        merged["pixel_values"] = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]])
        if controls is not None:  # winner and loser share the control images
            merged["control_pixel_values"] = [torch.cat([group, group]) for group in controls]
            merged["control_latents"] = [
                torch.cat([encoder.encode_latents(group, [c[k] for c in control_paths], flips, f"control{k}")] * 2)
                for k, group in enumerate(controls)]
        noise, timesteps = encoder.noise_and_timesteps(latents[: len(pairs)], batch["index"], epoch,
                                                       self.cfg.training.noise_offset)
        return latents, self.family.condition(both, merged), torch.cat([noise, noise]), torch.cat([timesteps] * 2)

    def preference_loss(self, batch: dict[str, Any], ctx: StepContext, pairs: list[Record],
                        beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents, condition, noise, timesteps = self.pair_inputs(batch, ctx.epoch, pairs)
        errors = denoising_errors(self, latents, condition, noise, timesteps)
        with torch.no_grad(), self.family.reference():
            if self.cfg.model.train_text_encoder:  # the reference conditions with the base text encoders
                condition = self.pair_inputs(batch, ctx.epoch, pairs)[1]
            ref_errors = denoising_errors(self, latents, condition, noise, timesteps)
        return preference_from_errors(errors, ref_errors, beta, self.cfg.dpo)

    # -- sampling --------------------------------------------------------------------------------

    def setup_rollouts(self, steps: int, guidance_scale: float, noise_level: float,
                       sde_window: list[int] | None = None) -> DiffusionSampler:
        self.sampler = DiffusionSampler(self, steps, guidance_scale, noise_level, sde_window)
        return self.sampler

    def generation_conditions(self, batch: dict[str, Any], repeats: int, guidance_scale: float,
                              records: list[Record] | None = None, inputs: dict[str, torch.Tensor] | None = None
                              ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Condition (and uncondition with CFG) of each prompt of a prompts batch, repeated `repeats`
        times in a row. `records`: the records the batch indexes (default: the run's); `inputs`:
        what another part produced for this rollout (unused here)."""
        return generation_conditions(self.family, self.encoder, self.records if records is None else records,
                                     batch, repeats, self.cfg.data.resolution, guidance_scale)

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        size = self.cfg.data.resolution
        shape = self.latent_shape(size, size)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], group: int, generators: list[torch.Generator],
                inputs: dict[str, torch.Tensor] | None = None) -> tuple[DenoiserRollout, torch.Tensor]:
        """The policy's trajectory (per-step log-probs) for every member; -> (record, images in [0, 1])."""
        condition, uncondition = self.generation_conditions(batch, group, self.sampler.guidance_scale, inputs=inputs)
        trajectory = self.sampler.rollout(self.noise(generators), condition, uncondition, generators=generators)
        record = DenoiserRollout(trajectory, condition, uncondition, dict(inputs or {}))
        return record, to_unit_images(self, trajectory.final)

    @torch.no_grad()
    def decode(self, batch: dict[str, Any], group: int, noise: torch.Tensor, steps: int, guidance_scale: float,
               records: list[Record] | None = None, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Deterministic ODE samples from `noise` (evaluation, frozen decoders, online pairs): images in [0, 1]."""
        sampler = DiffusionSampler(self, steps, guidance_scale, noise_level=0.0)
        condition, uncondition = self.generation_conditions(batch, group, guidance_scale, records, inputs)
        return to_unit_images(self, sampler.rollout(noise.to(self.device), condition, uncondition).final)

    def eval_noise(self, count: int, seed: int) -> torch.Tensor:
        size = self.cfg.data.resolution
        shape = self.latent_shape(size, size)
        return torch.stack([torch.randn(shape, generator=sample_generator(seed, 0, i, SALT_ROLLOUT))
                            for i in range(count)])

    # -- the policy update -----------------------------------------------------------------------

    def restore(self, record: DenoiserRollout, batch: dict[str, Any], group: int) -> None:
        """After a resume: the condition, rebuilt from the batch and the record's inputs."""
        if record.condition is None:
            record.condition, record.uncondition = self.generation_conditions(
                batch, group, self.sampler.guidance_scale, inputs=record.inputs)

    def trained_steps(self, trajectory: Trajectory, members: list[int], ctx: StepContext) -> list[list[int]]:
        """The stochastic steps trained this optimizer step, as `[j][i]` = the j-th step of member i:
        each member its own `grpo.timestep_fraction` subset, drawn from (seed, step, member) as
        Flow-GRPO permutes per sample (the same on any rank count or batch split)."""
        steps = [k for k, stochastic in enumerate(trajectory.stochastic) if stochastic]
        if not steps:
            raise ConfigError("No stochastic sampling step to train: raise grpo.noise_level or widen grpo.sde_window.")
        fraction = self.cfg.grpo.timestep_fraction
        if fraction >= 1.0:
            return [[k] * len(members) for k in steps]
        count = max(1, round(fraction * len(steps)))
        orders = [torch.randperm(len(steps), generator=sample_generator(ctx.seed, ctx.step, member, SALT_TIMESTEPS))
                  for member in members]
        return [[steps[int(order[j])] for order in orders] for j in range(count)]

    def policy_backward(self, record: DenoiserRollout, advantages: torch.Tensor, valid: torch.Tensor,
                        iteration: int, members: list[int], ctx: StepContext) -> dict[str, float]:
        """Flow-GRPO / DDPO: the clipped objective on the recorded transitions of the trained steps
        (+ `grpo.beta` x KL to the reference), back-propagated one step at a time to bound memory.
        `members`: the rollout's member ids (prompt index x group + member), for the step draws."""
        grpo = self.cfg.grpo
        trajectory, condition, uncondition = record.trajectory, record.condition, record.uncondition
        steps = self.trained_steps(trajectory, members, ctx)
        epsilons = (grpo.epsilon, grpo.epsilon_high) if grpo.flow_epsilon is None else (grpo.flow_epsilon, None)
        schedule = self.sampler.schedule(trajectory.states[0])
        sums: dict[str, float] = {}
        ratio_min, ratio_max = float("inf"), float("-inf")
        rows = torch.arange(len(members))
        for k in steps:  # k: each member's step
            state = torch.stack([trajectory.states[j][i] for i, j in enumerate(k)]).to(self.device)
            target = torch.stack([trajectory.states[j + 1][i] for i, j in enumerate(k)]).to(self.device)
            step = self.sampler.step(k, state, condition, uncondition, prev_sample=target, schedule=schedule)
            old_log_probs = trajectory.log_probs[rows, torch.tensor(k)].to(self.device)
            loss, stats = clipped_policy_loss(step.log_prob, old_log_probs, advantages, *epsilons, mask=valid)
            if grpo.beta > 0:
                with torch.no_grad(), self.family.reference():
                    reference = self.sampler.step(k, state, condition, uncondition, prev_sample=target,
                                                  schedule=schedule)
                kl = flow_kl(step.mean, reference.mean, step.std).mean()
                loss = loss + grpo.beta * kl
                stats["kl"] = kl.detach()
            ctx.backward(loss * ctx.scale / len(steps))
            ratio_min = min(ratio_min, float(stats.pop("ratio_min")))
            ratio_max = max(ratio_max, float(stats.pop("ratio_max")))
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        # Sum, then divide: an on-policy ratio of exactly 1 stays exactly 1 in the logs.
        means = {key: value / len(steps) for key, value in sums.items()}
        return {**means, "ratio_min": ratio_min, "ratio_max": ratio_max}

    # -- buffer serialisation (num_iterations > 1) ------------------------------------------------

    record_class = DenoiserRollout

    # -- DiffusionNFT (training.method: nft) ------------------------------------------------------

    #: Seeded draws of the NFT timesteps and noise (distinct from every salt in parts.common).
    nft_salt = 10

    def nft_record(self, record: DenoiserRollout) -> "NFTRollout":
        """What NFT keeps of an (old-policy, ODE) rollout: the clean latents, the condition and the
        inputs another part gave it; the trajectory is dropped."""
        return NFTRollout(record.trajectory.final.detach(), record.condition, record.uncondition, dict(record.inputs))

    def nft_backward(self, record: "NFTRollout", weights: torch.Tensor, valid: torch.Tensor, members: list[int],
                     ctx: StepContext) -> dict[str, float]:
        """DiffusionNFT on the rollout's clean latents: per trained timestep (`nft.timesteps_per_sample`,
        from the family's training density, with noise, drawn per member from (seed, step, member)),
        the trained, old (`family.old_policy()`) and, with `grpo.beta` > 0, reference predictions
        at the same noised latents -> `algorithms.nft.nft_loss` (flow) or, for epsilon / v models,
        `nft_loss_x0` on the x0 each output implies; one backward per timestep. `weights`: the
        optimality weights r in [0, 1]; `valid`: False in zero-std groups (left out)."""
        from glm_training.algorithms.nft import nft_loss, nft_loss_x0, x0_from_prediction
        from glm_training.algorithms.objectives import EpsilonObjective

        nft, grpo, objective = self.cfg.nft, self.cfg.grpo, self.objective
        latents, condition = record.latents.to(self.device).float(), record.condition
        count = nft.timesteps_per_sample
        sums: dict[str, float] = {}
        for j in range(count):
            generators = [sample_generator(ctx.seed, ctx.step, member * count + j, self.nft_salt) for member in members]
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
            timesteps = torch.cat([objective.sample_timesteps(1, latents[i:i + 1], g) for i, g in enumerate(generators)])
            noisy = objective.add_noise(latents, noise, timesteps)
            output = self.predict(noisy, timesteps, condition)
            with torch.no_grad(), self.family.old_policy():
                old = self.predict(noisy, timesteps, condition)
            reference = None
            if grpo.beta > 0:
                with torch.no_grad(), self.family.reference():
                    reference = self.predict(noisy, timesteps, condition)
            if isinstance(objective, EpsilonObjective):
                alphas = objective.alphas_cumprod[timesteps.cpu().long()].to(self.device)
                kind = objective.prediction_type
                loss, stats = nft_loss_x0(
                    x0_from_prediction(output, noisy, alphas, kind), x0_from_prediction(old, noisy, alphas, kind),
                    latents, weights, nft.beta, grpo.adv_clip_max, grpo.beta,
                    pred_theta=output if reference is not None else None, pred_ref=reference, mask=valid)
            else:
                loss, stats = nft_loss(output, old, latents, noisy, timesteps.to(self.device), weights, nft.beta,
                                       grpo.adv_clip_max, grpo.beta, v_ref=reference, mask=valid)
            ctx.backward(loss * ctx.scale / count)
            stats["timestep_mean"] = timesteps.float().mean()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return {key: value / count for key, value in sums.items()}


def preference_from_errors(errors: torch.Tensor, ref_errors: torch.Tensor, beta: float, dpo: Any
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO from per-sample errors of [winners; losers] (policy, reference), plus
    `dpo.sft_weight` x the winners' error."""
    half = len(errors) // 2
    loss, metrics = diffusion_dpo_loss(errors[:half], errors[half:], ref_errors[:half], ref_errors[half:],
                                       beta, dpo.loss_type, dpo.label_smoothing)
    if dpo.sft_weight:
        loss = loss + dpo.sft_weight * errors[:half].mean()
    return loss, metrics


@dataclass
class NFTRollout:
    """A micro-batch of DiffusionNFT rollouts: the old policy's clean latents (B*G, ...) only, no
    trajectory. Serialised like `DenoiserRollout` (tensors; the condition is rebuilt after a resume)."""

    latents: torch.Tensor
    condition: dict[str, Any] | None = None
    uncondition: dict[str, Any] | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{prefix}.latents": self.latents.detach().cpu().contiguous()}
        tensors.update({f"{prefix}.inputs.{k}": v.detach().cpu().clone() for k, v in self.inputs.items()})
        return tensors, {"inputs": sorted(self.inputs)}

    def replace_members(self, members: list[int], other: "NFTRollout") -> None:
        index = torch.tensor(members)
        self.latents[index.to(self.latents.device)] = other.latents.to(self.latents.device)
        for key, value in self.inputs.items():
            value[index.to(value.device)] = other.inputs[key].to(value.device)
        self.condition = self.uncondition = None

    @classmethod
    def from_tensors(cls, handle: Any, prefix: str, meta: dict[str, Any], device: torch.device) -> "NFTRollout":
        inputs = {k: handle.get_tensor(f"{prefix}.inputs.{k}").to(device) for k in meta["inputs"]}
        return cls(handle.get_tensor(f"{prefix}.latents").to(device), inputs=inputs)
