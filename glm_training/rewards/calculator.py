"""Combine named rewards into one weighted score per image, and build that from the YAML.

    reward:
      device: cpu            # where reward models run (default: cuda when available)
      batch_size: 8          # chunk size: each reward sees at most this many images at once
      rewards:               # name -> options; `type` defaults to the name, `weight` to 1.0
        lpips: {weight: 0.4, net: alex}
        mine: {type: "python:my_pkg.rewards:score", weight: 1.0, some_kwarg: 2}
      weights:               # optional per-component weights (GLM-Image: ar / dit)
        ar: {aesthetic: 0.7, clip_score: 0.3}
        dit: {ocr: 0.5, lpips: 0.5}

Each reward may also set its own `device` and `batch_size`. Rewards whose weight is 0 (including
rewards left out of the selected component's `weights`) are neither built nor run.

`on_error` (raise | zero | skip_group) says what a reward that raises, or returns NaN/inf, does
to its samples: `raise` stops with a message naming the reward and the samples; `zero` scores
them 0; `skip_group` gives them a NaN total, and GRPO (`compute_advantages`) then masks every
group holding one. A reward that raises fails its whole chunk (`batch_size` samples). Failures
are logged as warnings and counted in `log_stats` as `reward/failed_samples`.
"""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Mapping

import torch

from glm_training.config import ConfigError
from glm_training.rewards.base import Reward, RewardError, RewardInputs, build_reward, resolve_device
from glm_training.rewards.external import as_scores

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("device", "batch_size", "rewards", "weights", "on_error")
ON_ERROR = ("raise", "zero", "skip_group")
CONTINUE_HINT = ("set reward.on_error: zero (score failed samples 0) or skip_group (drop their GRPO groups) "
                 "to continue past failed samples")
# Options the calculator takes from each reward's entry (the rest go to the reward type).
CALCULATOR_OPTIONS = ("type", "weight", "batch_size")


class RewardCalculator:
    """Weighted sum of named rewards, computed chunk by chunk.

    `rewards` maps a name (used in errors and logs) to `(reward, weight)`, or to
    `(reward, weight, batch_size)` to give that reward its own chunk size. Calling it returns
    `(total, per_reward)`: `total` is the (B,) float32 CPU tensor `sum_k weight_k * reward_k`,
    `per_reward` holds each reward's unweighted (B,) scores. Any failure raises `RewardError`
    naming the reward and the samples, unless `on_error` (module docstring) says to continue.
    """

    def __init__(self, rewards: Mapping[str, tuple], device: str | torch.device | None = None,
                 batch_size: int = 8, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ConfigError(f"reward.on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}.")
        self.on_error = on_error
        # Samples (indices of the last call) that some reward failed on, per reward.
        self.last_failures: dict[str, list[int]] = {}
        if not rewards:
            raise ValueError("RewardCalculator needs at least one reward.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardCalculator batch_size must be a positive integer; got {batch_size!r}.")
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        self.batch_sizes: dict[str, int] = {}
        for name, entry in rewards.items():
            reward, weight, *rest = entry
            if not callable(reward):
                raise TypeError(f"Reward {name!r} is not callable: {reward!r}.")
            weight = float(weight)
            if not math.isfinite(weight):
                raise ValueError(f"Reward {name!r}: weight must be finite; got {weight}.")
            chunk = int(rest[0]) if rest and rest[0] is not None else batch_size
            if chunk < 1:
                raise ValueError(f"Reward {name!r}: batch_size must be >= 1; got {chunk}.")
            self.rewards[name], self.weights[name], self.batch_sizes[name] = reward, weight, chunk
        self.device = resolve_device(device) if device is not None else None
        self.batch_size = batch_size

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def score(self, name: str, inputs: RewardInputs) -> torch.Tensor:
        """Unweighted (B,) float32 CPU scores of one reward, in chunks of its batch size; samples
        it failed on are NaN (on_error zero / skip_group) or raise RewardError (on_error raise)."""
        reward, chunk, batch = self.rewards[name], self.batch_sizes[name], len(inputs)
        parts = []
        for start in range(0, batch, chunk):
            part = inputs.slice(start, min(start + chunk, batch))
            stop = start + len(part) - 1
            try:
                scores = as_scores(reward(part))
                if scores.shape[0] != len(part):
                    raise RewardError(name, f"returned {scores.shape[0]} scores for {len(part)} images.")
            except Exception as error:
                detail = str(error) if isinstance(error, RewardError) else f"{type(error).__name__}: {error}"
                if self.on_error == "raise":
                    if isinstance(error, RewardError):
                        raise RewardError(name, f"on samples {start}..{stop}: {detail.split(': ', 1)[-1]} "
                                                f"To continue, {CONTINUE_HINT}.") from error
                    raise RewardError(name, f"failed on images {start}..{stop}: {detail}. To continue, "
                                            f"{CONTINUE_HINT}.") from error
                logger.warning("Reward %r failed on samples %d..%d (reward.on_error: %s): %s", name, start, stop,
                               self.on_error, detail)
                scores = torch.full((len(part),), float("nan"))
            bad = (~torch.isfinite(scores)).nonzero().flatten()
            if len(bad):
                if self.on_error == "raise":
                    raise RewardError(name, f"returned non-finite scores {scores[bad].tolist()} at images "
                                            f"{(bad + start).tolist()}. To continue, {CONTINUE_HINT}.")
                if not torch.isnan(scores).all():  # not already warned for as a raised chunk
                    logger.warning("Reward %r returned non-finite scores at samples %s (reward.on_error: %s).",
                                   name, (bad + start).tolist(), self.on_error)
                scores = scores.clone()
                scores[bad] = float("nan")
            parts.append(scores)
        return torch.cat(parts) if parts else torch.zeros(0)

    def __call__(self, inputs: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs.validate()
        if self.device is not None:
            inputs = RewardInputs(
                images=inputs.images.to(self.device), prompts=inputs.prompts,
                target_images=None if inputs.target_images is None else inputs.target_images.to(self.device),
                source_images=None if inputs.source_images is None else inputs.source_images.to(self.device),
                metadata=inputs.metadata)
        per_reward = {name: self.score(name, inputs) for name in self.rewards}
        self.last_failures = {name: torch.isnan(scores).nonzero().flatten().tolist()
                              for name, scores in per_reward.items() if torch.isnan(scores).any()}
        if self.on_error == "zero":
            per_reward = {name: torch.nan_to_num(scores, nan=0.0) for name, scores in per_reward.items()}
        total = torch.zeros(len(inputs), dtype=torch.float32)
        for name, scores in per_reward.items():
            total = total + self.weights[name] * scores  # skip_group: NaN stays NaN in the total
        return total, per_reward

    def log_stats(self, total: torch.Tensor, per_reward: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """`reward/<name>_mean`, `reward/<name>_std` per reward and `reward/total_mean`, `_std`
        (population std, so a batch of one gives 0, not NaN), over the samples that did not fail.
        With on_error zero / skip_group also `reward/failed_samples`: how many samples of the
        last call some reward failed on."""
        stats: dict[str, float] = {}
        for name, scores in {**per_reward, "total": total}.items():
            scores = scores.detach().float().cpu()
            scores = scores[~torch.isnan(scores)]
            stats[f"reward/{name}_mean"] = float(scores.mean()) if scores.numel() else float("nan")
            stats[f"reward/{name}_std"] = float(scores.std(unbiased=False)) if scores.numel() else float("nan")
        if self.on_error != "raise":
            failed = {i for indices in self.last_failures.values() for i in indices}
            stats["reward/failed_samples"] = float(len(failed))
        return stats

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={self.weights[name]:g}" for name in self.rewards)
        return (f"RewardCalculator({parts}; batch_size={self.batch_size}, device={self.device}, "
                f"on_error={self.on_error})")


def _closest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{where} must be a finite number; got {value!r}.")
    return float(value)


def resolve_weights(reward_cfg: Mapping[str, Any], component: str | None = None) -> dict[str, float]:
    """The weight of every configured reward for `component` (see the module docstring)."""
    rewards = reward_cfg.get("rewards") or {}
    weights = reward_cfg.get("weights") or {}
    if not isinstance(weights, Mapping):
        raise ConfigError(f"reward.weights must map a component (e.g. ar, dit) to {{reward: weight}}; got {weights!r}.")
    configured = list(rewards)
    for part, table in weights.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"reward.weights.{part} must map reward names to weights; got {table!r}.")
        for key, value in table.items():
            if key not in rewards:
                raise ConfigError(f"reward.weights.{part}.{key}: no reward named {key!r} in reward.rewards."
                                  f"{_closest(key, configured)} Configured rewards: "
                                  f"{', '.join(configured) or '(none)'}.")
            _weight(value, f"reward.weights.{part}.{key}")
    base = {name: _weight((options or {}).get("weight", 1.0), f"reward.rewards.{name}.weight")
            for name, options in rewards.items()}
    if component is not None and component in weights:
        table = weights[component]
        return {name: float(table.get(name, 0.0)) for name in rewards}
    if component is not None and weights:
        logger.info("reward.weights has no entry for component %r (it has %s): using reward.rewards.*.weight.",
                    component, sorted(weights))
    return base


def build_reward_calculator(reward_cfg: Mapping[str, Any], component: str | None = None) -> RewardCalculator:
    """Build the calculator from the `reward:` section (a plain dict; see the module docstring).

    With `component` (e.g. "ar" or "dit") and a matching `reward.weights.<component>` table, the
    weights come from that table and rewards missing from it get weight 0 (not built, not run).
    Without a matching table each reward's own `weight` (default 1.0) is used.
    """
    if not isinstance(reward_cfg, Mapping):
        raise ConfigError(f"The reward section must be a mapping; got {type(reward_cfg).__name__}.")
    for key in reward_cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"reward.{key} is not a reward setting.{_closest(key, TOP_LEVEL_KEYS)} "
                              f"Valid: {', '.join(TOP_LEVEL_KEYS)}.")
    rewards = reward_cfg.get("rewards") or {}
    if not isinstance(rewards, Mapping) or not rewards:
        raise ConfigError("reward.rewards must name at least one reward, e.g. {brightness: {weight: 1.0}}.")
    for name, options in rewards.items():
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"reward.rewards.{name} must be a mapping of options (e.g. {{weight: 1.0}}); "
                              f"got {options!r}.")
    batch_size = reward_cfg.get("batch_size") or 8
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"reward.batch_size must be a positive integer; got {batch_size!r}.")
    device = reward_cfg.get("device")
    weights = resolve_weights(reward_cfg, component)

    built: dict[str, tuple] = {}
    for name, options in rewards.items():
        options = dict(options or {})
        kind = options.pop("type", name)
        options.pop("weight", None)
        chunk = options.pop("batch_size", None)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ConfigError(f"reward.rewards.{name}.batch_size must be a positive integer; got {chunk!r}.")
        if weights[name] == 0.0:
            continue
        if device is not None and "device" not in options and _accepts_device(kind):
            options["device"] = device
        try:
            reward = build_reward(kind, reward_name=name, **options)
        except ConfigError:
            raise
        except Exception as error:
            raise RewardError(name, f"could not be built (type {kind!r}): {type(error).__name__}: {error}") from error
        built[name] = (reward, weights[name], chunk)
    if not built:
        where = f"reward.weights.{component}" if component in (reward_cfg.get("weights") or {}) else "reward.rewards"
        raise ConfigError(f"Every reward has weight 0 (see {where}); give at least one a non-zero weight.")
    on_error = reward_cfg.get("on_error") or "raise"
    if on_error not in ON_ERROR:
        raise ConfigError(f"reward.on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}.")
    calculator = RewardCalculator(built, device=device, batch_size=batch_size, on_error=on_error)
    logger.info("Rewards: %r", calculator)
    return calculator


def _accepts_device(kind: str) -> bool:
    """Whether the reward type takes a `device` option (so reward.device is passed on)."""
    import inspect

    from glm_training.rewards.base import _REGISTRY, _load_builtins

    if kind.startswith("python:"):
        return False
    _load_builtins()
    factory = _REGISTRY.get(kind)
    if factory is None:
        return False
    parameters = inspect.signature(factory).parameters
    return "device" in parameters
