"""GRPO guardrails: warn early about reward hacking and policy collapse.

- Reward hacking: the trained reward rose since the first evaluation while a reward that is not
  trained on (`eval.rewards`, scored on the same eval images) fell by more than
  `eval.hacking_threshold` (in that reward's own units).
- Policy collapse: the mean within-group std of the trained reward (`grpo.num_generations`
  samples per eval prompt at fixed seeds) fell below `eval.collapse_std` (0: off): the group
  members are (nearly) the same image, so advantages carry no signal.

`RewardGuard.check` returns the warnings as (`flag`, message) pairs; the trainer logs them, writes
the flags as `eval/guardrail/*` scalars and puts a short tag under every image of the eval grid.
The baseline (first evaluation) is part of the resumable state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class GuardWarning:
    flag: str  # "reward_hacking" or "policy_collapse"
    tag: str  # short, no spaces: written under the grid images
    message: str


@dataclass
class RewardGuard:
    hacking_threshold: float
    collapse_std: float = 0.0
    baseline: dict[str, float] | None = None  # trained and independent means of the first evaluation
    baseline_step: int | None = None
    history: list[dict] = field(default_factory=list)  # (step, flags) of every check, for the logs

    def check(self, step: int, trained: dict[str, float], independent: dict[str, float],
              group_std: dict[str, float] | None = None) -> list[GuardWarning]:
        """`trained`: each trained total's eval mean (key: part name or "total"); `independent`:
        each eval.rewards reward's eval mean; `group_std`: each trained total's mean within-group std."""
        warnings: list[GuardWarning] = []
        current = {**{f"trained/{k}": v for k, v in trained.items()},
                   **{f"independent/{k}": v for k, v in independent.items()}}
        if self.baseline is None:
            self.baseline, self.baseline_step = dict(current), step
        else:
            risen = [(k, self.baseline[f"trained/{k}"], v) for k, v in trained.items()
                     if f"trained/{k}" in self.baseline and v > self.baseline[f"trained/{k}"]]
            for name, value in independent.items():
                before = self.baseline.get(f"independent/{name}")
                if before is None or not math.isfinite(value) or before - value <= self.hacking_threshold:
                    continue
                for trained_name, start, now in risen:
                    warnings.append(GuardWarning(
                        "reward_hacking", f"!HACKING:{name}{value - before:+.3f}",
                        f"possible reward hacking at step {step}: the trained reward {trained_name!r} rose "
                        f"{start:.4f} -> {now:.4f} since step {self.baseline_step} while the independent reward "
                        f"{name!r} fell {before:.4f} -> {value:.4f} (more than eval.hacking_threshold "
                        f"{self.hacking_threshold}). Inspect the eval grid; lower the learning rate, add a KL "
                        "(grpo.beta) or add the independent reward to reward.rewards."))
        if self.collapse_std > 0:
            for name, std in (group_std or {}).items():
                if std < self.collapse_std:
                    warnings.append(GuardWarning(
                        "policy_collapse", f"!COLLAPSE:{name}_std={std:.2g}",
                        f"possible policy collapse at step {step}: the within-group std of the trained reward "
                        f"{name!r} is {std:.3g} (below eval.collapse_std {self.collapse_std}): the samples of a "
                        "prompt are nearly identical, so the advantages carry no signal. Raise grpo.noise_level "
                        "or grpo.temperature, add a KL (grpo.beta) or lower the learning rate."))
        self.history.append({"step": step, "flags": sorted({w.flag for w in warnings})})
        return warnings

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "baseline_step": self.baseline_step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.baseline_step = state.get("baseline"), state.get("baseline_step")
        self.history = list(state.get("history", []))


def guard_scalars(warnings: list[GuardWarning]) -> dict[str, float]:
    """`eval/guardrail/<flag>`: 1.0 when the flag fired at this evaluation, else 0.0."""
    flags = {w.flag for w in warnings}
    return {f"eval/guardrail/{flag}": float(flag in flags) for flag in ("reward_hacking", "policy_collapse")}
