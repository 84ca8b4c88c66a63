"""Model-free rewards: brightness, closeness to a colour, JPEG (in)compressibility.

Cheap and deterministic: useful for tests, demos and sanity runs (a GRPO run on `brightness`
must visibly brighten its images within a few dozen steps).
"""

from __future__ import annotations

import io

import torch

from glm_training.config import ConfigError
from glm_training.rewards.base import RewardInputs, register_reward, to_uint8_hwc


@register_reward("brightness")
class BrightnessReward:
    """Mean pixel value over all pixels and channels, in [0, 1] (black 0, white 1)."""

    name = "brightness"

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return inputs.images.detach().float().mean(dim=(1, 2, 3)).cpu()


def parse_rgb(value) -> tuple[float, float, float]:
    """`[r, g, b]` in 0..255 or a hex string `#rrggbb` -> floats in [0, 1]."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) != 6:
            raise ConfigError(f"Reward 'color': rgb {value!r} is not a #rrggbb hex colour.")
        try:
            return tuple(int(text[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            raise ConfigError(f"Reward 'color': rgb {value!r} is not a #rrggbb hex colour.") from None
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        if any(v < 0 or v > 255 for v in value):
            raise ConfigError(f"Reward 'color': rgb {list(value)} must be three values in 0..255.")
        return tuple(float(v) / 255 for v in value)  # type: ignore[return-value]
    raise ConfigError(f"Reward 'color': rgb must be [r, g, b] in 0..255 or '#rrggbb'; got {value!r}.")


@register_reward("color")
class ColorReward:
    """Closeness of every pixel to a configured colour: `1 - mean_pixels(||pixel - rgb|| / sqrt(3))`.

    Options: `rgb` ([r, g, b] in 0..255 or "#rrggbb"; default red). 1 when every pixel is exactly
    the colour, 0 when every pixel is at the opposite corner of the RGB cube.
    """

    name = "color"

    def __init__(self, rgb=(255, 0, 0)):
        self.rgb = torch.tensor(parse_rgb(rgb), dtype=torch.float32)

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        images = inputs.images.detach().float()
        distance = (images - self.rgb.to(images.device).view(1, 3, 1, 1)).norm(dim=1) / 3 ** 0.5
        return (1 - distance.mean(dim=(1, 2))).cpu()


def jpeg_kilobytes(images: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    sizes = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def _check_quality(quality) -> int:
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ConfigError(f"JPEG reward: quality must be an integer in 1..100; got {quality!r}.")
    return quality


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward:
    """DDPO's compressibility reward: minus the JPEG size in kilobytes (quality 95 by default).

    Simpler, flatter images score higher. The scale depends on the image size.
    """

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95):
        self.quality = _check_quality(quality)

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return -jpeg_kilobytes(inputs.images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibilityReward:
    """DDPO's incompressibility reward: the JPEG size in kilobytes (more detail scores higher)."""

    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95):
        self.quality = _check_quality(quality)

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        return jpeg_kilobytes(inputs.images, self.quality)
