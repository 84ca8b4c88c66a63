"""GRPO for diffusion families: Flow-GRPO (flow families, SDE rollouts) and DDPO-style (SDXL, DDIM
with eta > 0), written once on the family interface and `trainers.sampler`.

Per micro-batch: each prompt is sampled `grpo.num_generations` times with the current policy (no
grad), the images are scored by the reward calculator, advantages are normalised within each
group (`algorithms.grpo.compute_advantages`, zero-std groups masked), then for a random
`timestep_fraction` of the stochastic steps the log-prob of the recorded transition is recomputed
with gradients and the clipped objective (+ `beta` x KL to the adapter-disabled reference) is
back-propagated, one step at a time to bound memory. Groups never cross processes.
"""

from __future__ import annotations

from typing import Any

import torch

from glm_training.algorithms.grpo import clipped_policy_loss, compute_advantages, flow_kl
from glm_training.config import ConfigError
from glm_training.data.datasets import PromptDataset, load_prompts, sample_generator
from glm_training.models.base import DiffusionFamily
from glm_training.trainers.base import BaseTrainer
from glm_training.trainers.conditioning import ConditionEncoder
from glm_training.trainers.sampler import DiffusionSampler

SALT_ROLLOUT, SALT_TIMESTEPS = 5, 6


class GRPOTrainer(BaseTrainer):
    method = "grpo"

    def dataset_items_per_batch(self) -> int:
        return self.cfg.training.batch_size // self.cfg.grpo.num_generations

    def build_dataset(self) -> PromptDataset:
        from glm_training.rewards import build_reward_calculator

        grpo = self.cfg.grpo
        if not isinstance(self.family, DiffusionFamily):
            raise ConfigError(f"training.method: grpo for {self.cfg.model.family} is not available yet.")
        if grpo.num_iterations != 1:
            raise ConfigError("grpo.num_iterations > 1 is not supported for diffusion GRPO yet; use 1.")
        if grpo.beta > 0 and not self.cfg.lora.enabled:
            raise ConfigError("grpo.beta > 0 needs the LoRA-disabled reference: set lora.enabled: true.")
        self.samples = load_prompts(self.cfg.data.path)
        self.encoder = ConditionEncoder(self.family, self.samples,
                                        self.cfg.cache.dir if self.cfg.cache.enabled else None,
                                        self.cfg.data.resolution, 0.0, self.cfg.training.seed)
        guidance = grpo.guidance_scale if grpo.train_cfg or grpo.guidance_scale == 1.0 else 1.0
        self.sampler_ = DiffusionSampler(self.family, grpo.sample_steps, guidance, grpo.noise_level, grpo.sde_window)
        self.rewards = build_reward_calculator(self.cfg.to_dict()["reward"], self.cfg.model.component)
        return PromptDataset(self.samples, self.cfg.data.resolution)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Not used: the GRPO loss is back-propagated per trained timestep in `backward`."""
        raise TypeError("GRPOTrainer computes its loss per timestep in backward().")

    # -- rollouts ------------------------------------------------------------------------------

    def conditions(self, batch: dict[str, Any], repeats: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        prompts = [p for p in batch["prompt"] for _ in range(repeats)]
        count, size = len(prompts), self.cfg.data.resolution
        generation = {"original_size": torch.tensor([[size, size]] * count),
                      "crop_top_left": torch.zeros(count, 2, dtype=torch.long),
                      "target_size": torch.tensor([[size, size]] * count)}
        controls = batch.get("control_pixel_values")
        control_paths = [self.samples[i].control_images for i in batch["index"] for _ in range(repeats)]
        if controls is not None:
            controls = [group.repeat_interleave(repeats, dim=0) for group in controls]
            generation["control_latents"] = [
                self.encoder.encode_latents(group, [c[k] for c in control_paths], [False] * count, f"control{k}")
                for k, group in enumerate(controls)]
        condition = self.family.condition(self.encoder.encode_prompts(prompts, control_paths, controls), generation)
        uncondition = None
        if self.sampler_.guidance_scale != 1.0:
            uncondition = self.family.condition(
                self.encoder.encode_prompts([""] * count, control_paths, controls), generation)
        return condition, uncondition

    def backward(self, batch: dict[str, Any], scale: float) -> dict[str, float]:
        from glm_training.rewards import RewardInputs

        grpo, seed = self.cfg.grpo, self.cfg.training.seed
        group = grpo.num_generations
        size = self.cfg.data.resolution
        condition, uncondition = self.conditions(batch, group)
        # Rollout randomness per (prompt, member), independent of batching and resume.
        generators = [sample_generator(seed, self.global_step, index * group + member, SALT_ROLLOUT)
                      for index in batch["index"] for member in range(group)]
        shape = self.family.latent_shape(size, size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        trajectory = self.sampler_.rollout(noise, condition, uncondition, generators=generators)
        with torch.no_grad():
            images = ((self.family.decode_latents(trajectory.final).float() + 1) / 2).clamp(0, 1).cpu()
        prompts = [p for p in batch["prompt"] for _ in range(group)]

        def repeat(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat_interleave(group, dim=0)

        inputs = RewardInputs(
            images=images, prompts=prompts,
            target_images=repeat(batch["target_images"]) if "target_images" in batch else None,
            source_images=(repeat((batch["control_pixel_values"][0] + 1) / 2)
                           if "control_pixel_values" in batch else None))
        total, per_reward = self.rewards(inputs)
        group_ids = torch.arange(len(batch["index"])).repeat_interleave(group)
        advantages, valid, adv_stats = compute_advantages(total.float(), group_ids, grpo.scale_rewards,
                                                          grpo.adv_clip_max)
        advantages, valid = advantages.to(self.device), valid.to(self.device)
        metrics = {**self.rewards.log_stats(total, per_reward),
                   "zero_std_fraction": float(adv_stats["zero_std_fraction"])}

        steps = [k for k, stochastic in enumerate(trajectory.stochastic) if stochastic]
        if grpo.timestep_fraction < 1.0:
            order = torch.randperm(len(steps), generator=sample_generator(seed, self.global_step, 0, SALT_TIMESTEPS))
            steps = [steps[i] for i in order[:max(1, round(grpo.timestep_fraction * len(steps)))].tolist()]
        if not steps:
            raise ConfigError("No stochastic sampling step to train: raise grpo.noise_level or widen grpo.sde_window.")
        sums: dict[str, float] = {}
        schedule = self.sampler_.schedule(trajectory.states[0])
        for k in steps:
            state, target = trajectory.states[k], trajectory.states[k + 1]
            step = self.sampler_.step(k, state, condition, uncondition, prev_sample=target, schedule=schedule)
            loss, stats = clipped_policy_loss(step.log_prob, trajectory.log_probs[:, k].to(self.device),
                                              advantages, grpo.epsilon, grpo.epsilon_high, mask=valid)
            if grpo.beta > 0:
                with torch.no_grad(), self.family.reference():
                    reference = self.sampler_.step(k, state, condition, uncondition, prev_sample=target,
                                                   schedule=schedule)
                kl = flow_kl(step.mean, reference.mean, step.std).mean()
                loss = loss + grpo.beta * kl
                stats["kl"] = kl.detach()
            self.accelerator.backward(loss * scale / len(steps))
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(steps)
        return {**metrics, **sums}
