"""Rewards that compare the generated image with a reference image: `lpips` and `ssim`.

Both resize the reference (target or source image) to the generated image's size first.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from glm_training.config import ConfigError
from glm_training.rewards.base import (
    RewardInputs,
    reference_images,
    register_reward,
    require,
    resolve_device,
    to_float_hwc,
)

COMPARE_CHOICES = ("target", "source")

# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

# lpips' trunk name -> torchvision builder and its ImageNet weights enum (whose URL gives the
# exact file name torchvision caches under $TORCH_HOME/hub/checkpoints).
LPIPS_BACKBONES = {
    "alex": ("alexnet", "AlexNet_Weights"),
    "vgg": ("vgg16", "VGG16_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}


def lpips_backbone_url(net: str) -> str:
    import torchvision.models as tv

    _, weights_enum = LPIPS_BACKBONES[net]
    return getattr(tv, weights_enum).IMAGENET1K_V1.url


def lpips_backbone_cache_path(net: str) -> Path:
    """Where torchvision keeps (and looks for) the ImageNet weights of the LPIPS trunk `net`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(lpips_backbone_url(net))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_lpips_backbone(net: str, backbone: str | None = None, download: bool = False) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of torchvision's `net` model, from `backbone` or torchvision's cache.

    Never downloads unless `download` is true: offline, a missing file raises FileNotFoundError
    saying which file, where to put it and how to get it (rather than hanging on a download).
    """
    if backbone is not None:
        path = Path(backbone).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone file {path} (option `backbone`) does not exist.")
        return _load_state_dict(path)
    path = lpips_backbone_cache_path(net)
    if path.is_file():
        return _load_state_dict(path)
    url = lpips_backbone_url(net)
    if download:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    builder, weights_enum = LPIPS_BACKBONES[net]
    raise FileNotFoundError(
        f"LPIPS (net={net}) needs torchvision's ImageNet {builder} weights, and they are not in the cache: "
        f"missing file {path}. Either copy {path.name} there (the folder is $TORCH_HOME/hub/checkpoints, "
        f"TORCH_HOME defaults to ~/.cache/torch), or set the reward option `backbone: /path/to/{path.name}`. "
        f"To get the file, on a machine with internet run `python -c \"import torchvision; "
        f"torchvision.models.{builder}(weights='IMAGENET1K_V1')\"` (it lands in ~/.cache/torch/hub/checkpoints/) "
        f"or download {url}; or set `download: true` to let this reward download it.")


def _copy_backbone(model, state: dict[str, torch.Tensor], net: str) -> None:
    """Load torchvision `features.<i>.*` weights into lpips' trunk slices (`slice<k>.<i>.*`)."""
    features = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    if not features:
        raise ValueError(f"LPIPS backbone for net={net}: the state dict has no `features.*` keys "
                         f"(got {sorted(state)[:5]}...); it is not a torchvision {LPIPS_BACKBONES[net][0]} file.")
    used: set[str] = set()
    trunk = model.net
    for slice_index in range(1, trunk.N_slices + 1):
        for index, module in getattr(trunk, f"slice{slice_index}").named_children():
            prefix = f"{index}."
            part = {key[len(prefix):]: value for key, value in features.items() if key.startswith(prefix)}
            module.load_state_dict(part, strict=True)
            used.update(prefix + key for key in part)
    unused = sorted(set(features) - used)
    # lpips drops the trunk's last layers (e.g. AlexNet's final max-pool has no weights; VGG keeps
    # conv layers up to relu5_3): any weights it does not use must belong to those dropped layers.
    last_used = max((int(key.split(".")[0]) for key in used), default=-1)
    stray = [key for key in unused if int(key.split(".")[0]) <= last_used]
    if stray:
        raise ValueError(f"LPIPS backbone for net={net}: weights {stray[:5]} were not loaded.")


@register_reward("lpips")
class LpipsReward:
    """Perceptual similarity to the target image: score = `1 - LPIPS distance` (1 = identical).

    Options: `net` (alex | vgg | squeeze), `version` ("0.1"), `compare_to` (target | source; the
    other one is used when the preferred one is missing), `backbone` (path to torchvision's
    ImageNet state dict for the trunk; default: torchvision's cache file), `download` (allow
    downloading the trunk weights; default false), `min_size` (images smaller than this are
    upsampled, because AlexNet/VGG pooling needs about 32+ pixels), `device`.
    The `lpips` package provides the calibrated linear heads; the trunk weights come from
    torchvision's cache (`$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth` for alex).
    """

    name = "lpips"

    def __init__(self, net: str = "alex", version: str = "0.1", compare_to: str = "target",
                 backbone: str | None = None, download: bool = False, min_size: int = 64,
                 device: str | None = None):
        if net not in LPIPS_BACKBONES:
            raise ConfigError(f"Reward 'lpips': net must be one of {sorted(LPIPS_BACKBONES)}; got {net!r}.")
        if compare_to not in COMPARE_CHOICES:
            raise ConfigError(f"Reward 'lpips': compare_to must be one of {COMPARE_CHOICES}; got {compare_to!r}.")
        lpips = require("lpips", "lpips", "lpips reward")
        state = load_lpips_backbone(net, backbone, download)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation, from inside lpips
            # pnet_rand=True: lpips builds an untrained trunk (no download attempt); we load it here.
            model = lpips.LPIPS(pretrained=True, net=net, version=str(version), pnet_rand=True, verbose=False)
        _copy_backbone(model, state, net)
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.compare_to = compare_to
        self.min_size = int(min_size)
        self._lock = threading.Lock()

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        images = inputs.images.to(self.device).float()
        reference = reference_images(inputs, self.compare_to, self.name).to(self.device).float()
        height, width = images.shape[-2:]
        if min(height, width) < self.min_size:
            scale = self.min_size / min(height, width)
            size = (round(height * scale), round(width * scale))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            reference = F.interpolate(reference, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad(), self._lock:
            distance = self.model(images, reference, normalize=True)  # normalize: [0, 1] -> [-1, 1]
        return (1 - distance.flatten().float()).cpu()


# ---------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------

@register_reward("ssim")
class SsimReward:
    """Structural similarity (scikit-image) to the source image (i2i structure preservation) or,
    when the batch has no source images, to the target. In [-1, 1]; 1 = identical.

    Options: `compare_to` (source | target: which reference is preferred), `grayscale` (compare
    luminance only; default false = per channel, averaged), `gaussian_weights` (Wang et al.'s
    11x11 Gaussian window instead of the 7x7 uniform one), `win_size` (odd; default: 7, or the
    largest odd size that fits small images).
    """

    name = "ssim"

    def __init__(self, compare_to: str = "source", grayscale: bool = False, gaussian_weights: bool = False,
                 win_size: int | None = None):
        if compare_to not in COMPARE_CHOICES:
            raise ConfigError(f"Reward 'ssim': compare_to must be one of {COMPARE_CHOICES}; got {compare_to!r}.")
        if win_size is not None and (not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0):
            raise ConfigError(f"Reward 'ssim': win_size must be an odd integer >= 3; got {win_size!r}.")
        self.metrics = require("skimage.metrics", "scikit-image", "ssim reward")
        self.compare_to = compare_to
        self.grayscale = grayscale
        self.gaussian_weights = gaussian_weights
        self.win_size = win_size

    def _window(self, height: int, width: int) -> int | None:
        if self.gaussian_weights and self.win_size is None:
            return None  # scikit-image derives 11 from sigma=1.5
        size = self.win_size or 7
        size = min(size, min(height, width) if min(height, width) % 2 else min(height, width) - 1)
        if size < 3:
            raise ValueError(f"reward 'ssim' needs images of at least 3x3 pixels; got {height}x{width}.")
        return size

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        reference = reference_images(inputs, self.compare_to, self.name)
        images, reference = to_float_hwc(inputs.images), to_float_hwc(reference)
        if self.grayscale:
            luminance = [0.299, 0.587, 0.114]
            images, reference = images @ luminance, reference @ luminance
        height, width = images.shape[1:3]
        window = self._window(height, width)
        scores = []
        for generated, ref in zip(images, reference):
            scores.append(self.metrics.structural_similarity(
                generated, ref, data_range=1.0, channel_axis=None if self.grayscale else -1, win_size=window,
                gaussian_weights=self.gaussian_weights, sigma=1.5, use_sample_covariance=not self.gaussian_weights))
        return torch.tensor(scores, dtype=torch.float32)
