"""Sampling on the family interface, with per-step log-probs, for every diffusion family.

- Flow families: Euler ODE (evaluation) or the Flow-GRPO SDE with the same marginals (rollouts),
  on the family's shifted sigma schedule.
- Epsilon families (SDXL): DDIM, deterministic (`eta = 0`) or stochastic (`eta > 0`, DDPO).
- Classifier-free guidance on or off; an SDE window makes only some steps stochastic (and
  trainable) as in Flow-GRPO-Fast / MixGRPO; log-probs in float32 (`algorithms.sde`).

`rollout` records every state, so `step` can recompute the log-prob of a recorded transition
with gradients for the policy update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glm_training.algorithms.objectives import EpsilonObjective
from glm_training.algorithms.sde import SDEStep, ddim_step_with_logprob, flow_sde_step
from glm_training.models.base import DiffusionFamily


@dataclass
class Trajectory:
    states: list[torch.Tensor]  # x at each step, float32: states[0] is the initial noise
    log_probs: torch.Tensor  # (B, steps); 0 for deterministic steps
    stochastic: list[bool]  # which steps are stochastic (trainable)

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


class DiffusionSampler:
    """`family`: anything with the denoiser hooks `objective` and `predict` (a `Denoiser` part)."""

    def __init__(self, family: Any, num_steps: int, guidance_scale: float = 1.0,
                 noise_level: float = 0.7, sde_window: list[int] | None = None):
        self.family = family
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.noise_level = noise_level  # flow: SDE noise level a; epsilon: DDIM eta
        self.sde_window = sde_window
        self.is_epsilon = isinstance(family.objective, EpsilonObjective)

    # -- schedule -----------------------------------------------------------------------------

    def schedule(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, float, float]]:
        """(model timestep, a, a_next) per step: alphas_cumprod (epsilon) or sigmas (flow)."""
        objective = self.family.objective
        if self.is_epsilon:  # the checkpoint's own spacing, offset and final alpha (DDIMScheduler)
            return [(torch.tensor(t), float(objective.alphas_cumprod[t]), objective.alpha_before(t, self.num_steps))
                    for t in objective.sampling_timesteps(self.num_steps)]
        base = torch.linspace(1.0, 0.0, self.num_steps + 1)[:-1]
        sigmas = objective.shift(base, objective.image_seq_len(latents)).tolist() + [0.0]
        return [(torch.tensor(sigmas[k]), sigmas[k], sigmas[k + 1]) for k in range(self.num_steps)]

    def stochastic(self, k: int) -> bool:
        if self.noise_level == 0:
            return False
        if self.sde_window is None:
            return True
        return self.sde_window[0] <= k < self.sde_window[1]

    # -- one step ------------------------------------------------------------------------------

    def model_output(self, x: torch.Tensor, t: torch.Tensor, condition: dict[str, Any],
                     uncondition: dict[str, Any] | None) -> torch.Tensor:
        timesteps = t.expand(len(x))
        output = self.family.predict(x, timesteps, condition).float()
        if uncondition is not None and self.guidance_scale != 1.0:
            unguided = self.family.predict(x, timesteps, uncondition).float()
            output = unguided + self.guidance_scale * (output - unguided)
        return output

    def step(self, k: int | list[int], x: torch.Tensor, condition: dict[str, Any], uncondition: dict[str, Any] | None,
             prev_sample: torch.Tensor | None = None, generators: list[torch.Generator] | None = None,
             schedule: list | None = None) -> SDEStep:
        """Step `k` for the whole batch, or, with one stochastic step index per sample (`k` a list),
        each sample at its own step in one forward (Flow-GRPO trains each sample on its own steps)."""
        schedule = schedule or self.schedule(x)
        if isinstance(k, int) or len(set(k)) == 1:
            k = k if isinstance(k, int) else k[0]
            (t, a, a_next), level = schedule[k], self.noise_level if self.stochastic(k) else 0.0
        else:
            if not all(self.stochastic(j) for j in k):
                raise ValueError(f"per-sample steps {k} include deterministic ones (sde_window)")
            t = torch.stack([schedule[j][0] for j in k])
            a, a_next = (torch.tensor([schedule[j][i] for j in k], dtype=torch.float64) for i in (1, 2))
            level = self.noise_level
        output = self.model_output(x, t, condition, uncondition)
        if self.is_epsilon:
            return ddim_step_with_logprob(output, x, a, a_next, eta=level,
                                          prediction_type=self.family.objective.prediction_type,
                                          generator=generators, prev_sample=prev_sample)
        return flow_sde_step(x, output, a, a_next, level, generator=generators, prev_sample=prev_sample)

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, condition: dict[str, Any], uncondition: dict[str, Any] | None = None,
                generators: list[torch.Generator] | None = None) -> Trajectory:
        x = noise.float()
        schedule = self.schedule(x)
        states, log_probs = [x], []
        for k in range(self.num_steps):
            result = self.step(k, x, condition, uncondition, generators=generators, schedule=schedule)
            x = result.prev_sample
            states.append(x)
            log_probs.append(result.log_prob)
        return Trajectory(states, torch.stack(log_probs, dim=1), [self.stochastic(k) for k in range(self.num_steps)])


# -- what the online trainers (GRPO, online DPO) share around the sampler ----------------------


def generation_conditions(family: DiffusionFamily, encoder: Any, samples: list, batch: dict[str, Any],
                          repeats: int, resolution: int, guidance_scale: float
                          ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Condition (and the empty-prompt uncondition when CFG is on) for every prompt of a
    PromptDataset batch repeated `repeats` times in a row (one group per prompt)."""
    prompts = [p for p in batch["prompt"] for _ in range(repeats)]
    count = len(prompts)
    generation = {"original_size": torch.tensor([[resolution, resolution]] * count),
                  "crop_top_left": torch.zeros(count, 2, dtype=torch.long),
                  "target_size": torch.tensor([[resolution, resolution]] * count)}
    controls = batch.get("control_pixel_values")
    control_paths = [samples[i].controls for i in batch["index"] for _ in range(repeats)]
    if controls is not None:
        controls = [group.repeat_interleave(repeats, dim=0) for group in controls]
        generation["control_latents"] = [
            encoder.encode_latents(group, [c[k] for c in control_paths], [False] * count, f"control{k}")
            for k, group in enumerate(controls)]
    condition = family.condition(encoder.encode_prompts(prompts, control_paths, controls), generation)
    uncondition = None
    if guidance_scale != 1.0:
        uncondition = family.condition(encoder.encode_prompts([""] * count, control_paths, controls), generation)
    return condition, uncondition


def to_unit_images(family: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decoded images in [0, 1], float32 on the CPU (what rewards take)."""
    with torch.no_grad():
        return ((family.decode_latents(latents).float() + 1) / 2).clamp(0, 1).cpu()


def reward_inputs(batch: dict[str, Any], images: torch.Tensor, repeats: int) -> Any:
    """RewardInputs for `images` (prompt-major, `repeats` per prompt) with the batch's target and
    source images repeated alongside."""
    from glm_training.rewards import RewardInputs

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(repeats, dim=0)

    return RewardInputs(
        images=images, prompts=[p for p in batch["prompt"] for _ in range(repeats)],
        target_images=(repeat((batch["target_pixel_values"] + 1) / 2)  # datasets emit [-1, 1]; rewards take [0, 1]
                       if "target_pixel_values" in batch else None),
        source_images=(repeat((batch["control_pixel_values"][0] + 1) / 2)
                       if "control_pixel_values" in batch else None))


def reward_notes(total: torch.Tensor, per_reward: dict[str, torch.Tensor]) -> list[str]:
    """One line per image: `R=<total> name=<score> ...` (written under images in sample grids)."""
    notes = []
    for i in range(len(total)):
        parts = [f"R={float(total[i]):.3f}"] + [f"{name}={float(scores[i]):.3f}" for name, scores in per_reward.items()]
        notes.append(" ".join(parts))
    return notes
