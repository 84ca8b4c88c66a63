"""The reward interface, the registry of reward types, and helpers shared by the built-ins.

A reward scores a batch of generated images (float (B, 3, H, W) in [0, 1]) given their prompts and,
when the task has them, target and source images. Larger is always better. Rewards are chosen by
name in YAML; `register_reward` adds a type, `build_reward` builds one from its options and
rejects option keys the type does not take (naming the reward and the key).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from glm_training.config import ConfigError


@dataclass
class RewardInputs:
    """One batch to score.

    images:        float (B, 3, H, W) in [0, 1], the generated images.
    prompts:       B prompts.
    target_images: optional (B, 3, h, w) in [0, 1], the reference output (resized inside rewards).
    source_images: optional (B, 3, h, w) in [0, 1], the input image of an edit (image-to-image).
    metadata:      optional B dicts of per-sample extras (e.g. an explicit OCR text).
    """

    images: torch.Tensor
    prompts: list[str]
    target_images: torch.Tensor | None = None
    source_images: torch.Tensor | None = None
    metadata: list[dict] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def validate(self) -> None:
        """Check shapes, lengths and value range; raise ValueError saying what is wrong."""
        images = self.images
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"RewardInputs.images must be a float tensor (B, 3, H, W); got {shape}.")
        if not images.is_floating_point():
            raise ValueError(f"RewardInputs.images must be floating point in [0, 1]; got {images.dtype}.")
        batch = images.shape[0]
        if len(self.prompts) != batch:
            raise ValueError(f"RewardInputs has {batch} images but {len(self.prompts)} prompts.")
        if batch:
            low, high = float(images.min()), float(images.max())
            if low < -1e-3 or high > 1 + 1e-3:
                raise ValueError(f"RewardInputs.images must be in [0, 1]; got values in [{low:.3f}, {high:.3f}] "
                                 "(images in [-1, 1] need (x + 1) / 2 first).")
        for field_name in ("target_images", "source_images"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[1] != 3 \
                    or value.shape[0] != batch:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"RewardInputs.{field_name} must be (B={batch}, 3, h, w); got {shape}.")
        if self.metadata is not None and len(self.metadata) != batch:
            raise ValueError(f"RewardInputs has {batch} images but {len(self.metadata)} metadata entries.")

    def slice(self, start: int, stop: int) -> "RewardInputs":
        def cut(value):
            return None if value is None else value[start:stop]

        return RewardInputs(images=self.images[start:stop], prompts=list(self.prompts[start:stop]),
                            target_images=cut(self.target_images), source_images=cut(self.source_images),
                            metadata=cut(self.metadata))


@runtime_checkable
class Reward(Protocol):
    """A reward: `reward(inputs)` returns a float32 CPU tensor of B scores, larger is better."""

    name: str

    def __call__(self, inputs: RewardInputs) -> torch.Tensor: ...


class RewardError(RuntimeError):
    """A reward failed or returned something unusable; `reward_name` says which one."""

    def __init__(self, reward_name: str, message: str):
        super().__init__(f"Reward {reward_name!r}: {message}")
        self.reward_name = reward_name


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Reward]] = {}
# Modules whose import registers the built-ins; imported on first use of the registry.
_BUILTIN_MODULES = ("glm_training.rewards.simple", "glm_training.rewards.similarity",
                    "glm_training.rewards.ocr", "glm_training.rewards.clip",
                    "glm_training.rewards.external")


def register_reward(name: str) -> Callable:
    """Class (or factory) decorator: `@register_reward("my_reward")` makes `type: my_reward` valid.

    The constructor's keyword parameters are the reward's options; unknown option keys are
    rejected unless it takes `**kwargs`.
    """

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"A reward named {name!r} is already registered ({_REGISTRY[name]!r}).")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_rewards() -> list[str]:
    """Registered reward types (plus the `python:` form, which is not listed)."""
    _load_builtins()
    return sorted(_REGISTRY)


def check_options(owner: str, factory: Callable, options: dict[str, Any]) -> None:
    """Raise ConfigError naming `owner` and the key when `factory` does not take an option."""
    signature = inspect.signature(factory)
    parameters = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [n for n, p in parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Reward {owner!r} has no option {key!r}.{hint} Its options: "
                              f"{', '.join(sorted(accepted)) or '(none)'}.")
    missing = [n for n, p in parameters.items()
               if p.default is inspect.Parameter.empty and n not in options
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise ConfigError(f"Reward {owner!r} needs option(s) {', '.join(missing)}.")


def build_reward(name: str, *, reward_name: str | None = None, **options: Any) -> Reward:
    """Build the reward of type `name` (a registered name or `python:package.module:function`).

    `reward_name` is the name errors and logs use (the YAML key); it defaults to `name`.
    """
    reward_name = reward_name or name
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Reward {reward_name!r}: `type` must be a non-empty string; got {name!r}.")
    if name.startswith("python:"):
        from glm_training.rewards.external import PythonReward

        reward = PythonReward(name[len("python:"):], reward_name=reward_name, **options)
        return reward
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown reward type {name!r} (reward {reward_name!r}).{hint} Available: "
                          f"{', '.join(sorted(_REGISTRY))}, or 'python:package.module:function'.")
    factory = _REGISTRY[name]
    check_options(reward_name, factory, options)
    reward = factory(**options)
    if not callable(reward):
        raise ConfigError(f"Reward {reward_name!r}: type {name!r} built a non-callable {type(reward).__name__}.")
    return reward


# ---------------------------------------------------------------------------------------------
# Helpers for the built-ins
# ---------------------------------------------------------------------------------------------

def require(module: str, pip_name: str, purpose: str):
    """Import `module` or raise an ImportError that names the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"The {purpose} needs the `{pip_name}` package: pip install {pip_name} "
                          f"({error}).") from error


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resize_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (B, 3, h, w) images to (height, width) (bilinear, antialiased); no-op if already."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def reference_images(inputs: RewardInputs, prefer: str, reward_name: str) -> torch.Tensor:
    """`source_images` or `target_images` (per `prefer`: "source", "target"), resized to the images."""
    order = {"source": ("source_images", "target_images"), "target": ("target_images", "source_images"),
             "source_only": ("source_images",), "target_only": ("target_images",)}[prefer]
    for field_name in order:
        value = getattr(inputs, field_name)
        if value is not None:
            return resize_to(value.to(inputs.images.device), *inputs.images.shape[-2:])
    raise ValueError(f"reward {reward_name!r} compares against {' or '.join(order)}, "
                     "but this batch has none (does the dataset provide target/control images?).")


def to_uint8_hwc(images: torch.Tensor):
    """(B, 3, H, W) float in [0, 1] -> numpy uint8 (B, H, W, 3)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def to_float_hwc(images: torch.Tensor):
    """(B, 3, H, W) float in [0, 1] -> numpy float64 (B, H, W, 3)."""
    return images.detach().double().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
