"""What every part kind shares: the step context the trainer hands in, seeded draws, metric names."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from glm_training.data.datasets import sample_generator

# Salts of the seeded draws (one generator per (seed, step or epoch, index, salt)): distinct per use,
# so that e.g. rollout noise and timestep subsets never share a stream. The values are part of the
# resume contract: changing one changes every run's draws.
SALT_NOISE, SALT_CAPTION_DROPOUT, SALT_ROLLOUT, SALT_TIMESTEPS = 3, 4, 5, 6
SALT_ONLINE, SALT_CONTROL_DROPOUT, SALT_DECODE = 7, 8, 9


class Part:
    """What every part kind has: its family, its name (metric prefix, `reward.weights` key) and the
    run's records."""

    #: Whether its rollout predictions call the unwrapped network (not the DDP wrapper's forward),
    #: so that DDP never averages their gradients: the GRPO trainer then averages them itself.
    rollout_bypasses_wrapper = False

    def __init__(self, family: Any, name: str):
        self.family, self.name = family, name
        self.records: list = []

    @property
    def cfg(self) -> Any:
        return self.family.cfg

    @property
    def device(self) -> torch.device:
        return self.family.device

    def sft_window(self, batches: list[dict[str, Any]], epochs: list[int]) -> None:
        """An SFT accumulation window (one optimizer step) starts with these micro-batches (of these
        data epochs): a part whose loss is normalised over the whole step counts it here."""

    @contextlib.contextmanager
    def evaluating(self, records: list) -> Iterator[None]:
        """Inside the block the part reads `records` (the eval split: batch indices point into them),
        without caption or control dropout and without the cache; its training state is restored after."""
        saved = dict(vars(self))
        try:
            self.prepare(records, caption_dropout=0.0, use_cache=False)
            encoder = getattr(self, "encoder", None)
            if encoder is not None and hasattr(encoder, "control_dropout"):
                encoder.control_dropout = 0.0
            yield
        finally:
            vars(self).clear()
            vars(self).update(saved)


@dataclass
class StepContext:
    """What a part needs from the trainer for one micro-batch."""

    seed: int  # training.seed
    epoch: int  # the data epoch: per-sample noise / timestep / dropout draws
    step: int  # the optimizer step: rollout noise, timestep subsets
    backward: Callable[[torch.Tensor], None]  # accelerator.backward (scaled by the caller)
    scale: float = 1.0  # 1 / gradient accumulation


def prefixed(name: str, metrics: dict[str, Any], several: bool) -> dict[str, Any]:
    """`<part>/<key>` when a run trains several parts (GLM-Image `both`: `ar/`, `dit/`), else as is."""
    return {f"{name}/{key}": value for key, value in metrics.items()} if several else dict(metrics)


def member_generators(seed: int, step: int, indices: list[int], group: int, salt: int) -> list[torch.Generator]:
    """One generator per (prompt, member) of a rollout: independent of batching, ranks and resume."""
    return [sample_generator(seed, step, int(index) * group + member, salt)
            for index in indices for member in range(group)]


def seeded_int(seed: int, step: int, index: int, salt: int) -> int:
    """A seed drawn from (seed, step, index, salt), for APIs that take an int seed."""
    draw = sample_generator(seed, step, int(index), salt)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=draw))


def drop_captions(batch: dict[str, Any], epoch: int, seed: int, probability: float) -> list[str]:
    """`data.caption_dropout`: each sample's prompt emptied with this probability, drawn from
    (seed, epoch, index): the same draw for every part, batch size, rank count and resume."""
    prompts = list(batch["prompt"])
    if probability > 0:
        for i, index in enumerate(batch["index"]):
            draw = torch.rand(1, generator=sample_generator(seed, epoch, index, SALT_CAPTION_DROPOUT))
            if draw.item() < probability:
                prompts[i] = ""
    return prompts
