"""Evaluation metrics on generated images (float (B, 3, H, W) in [0, 1]) and generated text.

Chosen by name (`eval.metrics: [lpips, ssim, clip_score, fid, kid, ocr, bleu, rouge]`); each
takes options (`eval.metric_options.<name>`). Where the project has a reward for the same
measure, the metric calls it (one implementation of LPIPS, SSIM, CLIP score and OCR):

- lpips       mean LPIPS distance to the target (0 = identical; lower is better).
- ssim        mean SSIM to the target (1 = identical).
- clip_score  mean `scale * cos(CLIP image, CLIP text)` (rewards.clip; `scale: 100` and a clamp
              at 0 is torchmetrics' CLIPScore convention, the default 1 is the plain cosine).
- ocr         mean text accuracy (1 - normalised edit distance) over the prompts that quote text;
              prompts without quoted text are left out (the metric is absent if none quotes any).
- fid / kid   Frechet / kernel Inception distance between the targets and the generated images
              (torchmetrics). The Inception weights are torch-fidelity's
              `weights-inception-2015-12-05-6726825d.pth`; offline, point at a local copy with
              `inception_weights: /path/to/that.pth` or put it in `$TORCH_HOME/hub/checkpoints/`.
              `feature_extractor: package.module:factory` (or an nn.Module from Python) replaces
              Inception with any feature network (its output: (B, num_features)).
- bleu, rouge text answers against references (torchmetrics' BLEU and ROUGE-1/2/L, pure Python,
              no downloads; ROUGE-Lsum and stemming would need nltk's data and are not offered).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from glm_training.config import ConfigError

IMAGE_METRICS = ("lpips", "ssim", "clip_score", "ocr", "fid", "kid")
TEXT_METRICS = ("bleu", "rouge")
METRIC_NAMES = IMAGE_METRICS + TEXT_METRICS

#: torch-fidelity's FID Inception weights (the ones torchmetrics' default FID/KID uses).
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


def _check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a float tensor (B, 3, H, W) in [0, 1]; got {shape}.")
    if not images.is_floating_point():
        raise ValueError(f"{what} must be floating point in [0, 1]; got {images.dtype}.")
    return images.float()


def _reward_inputs(images: torch.Tensor, prompts: Sequence[str] | None = None,
                   targets: torch.Tensor | None = None):
    from glm_training.rewards import RewardInputs

    prompts = list(prompts) if prompts is not None else [""] * len(images)
    return RewardInputs(images=images, prompts=prompts, target_images=targets)


# ---------------------------------------------------------------------------------------------
# Per-image metrics (the rewards' implementations)
# ---------------------------------------------------------------------------------------------

class LpipsMetric:
    """LPIPS distance to the target, per image (rewards.similarity.LpipsReward: distance = 1 - score).
    Options as the reward's: net, version, backbone (torchvision trunk file), download, min_size, device."""

    def __init__(self, net: str = "alex", version: str = "0.1", backbone: str | None = None,
                 download: bool = False, min_size: int = 64, device: str | None = None):
        from glm_training.rewards.similarity import LpipsReward

        self.reward = LpipsReward(net=net, version=version, compare_to="target",
                                  backbone=backbone, download=download, min_size=min_size, device=device)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images, targets = _check_images(images, "lpips images"), _check_images(targets, "lpips targets")
        return 1 - self.reward(_reward_inputs(images, targets=targets))


class SsimMetric:
    """SSIM to the target, per image (rewards.similarity.SsimReward, scikit-image)."""

    def __init__(self, grayscale: bool = False, gaussian_weights: bool = False, win_size: int | None = None):
        from glm_training.rewards.similarity import SsimReward

        self.reward = SsimReward(compare_to="target", grayscale=grayscale, gaussian_weights=gaussian_weights,
                                 win_size=win_size)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images, targets = _check_images(images, "ssim images"), _check_images(targets, "ssim targets")
        return self.reward(_reward_inputs(images, targets=targets))


class ClipScoreMetric:
    """`scale * cos(image, prompt)` per image (rewards.clip.ClipScoreReward). Options: model
    (local CLIP folder, hub id or tiny:clip), device, dtype, scale."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 scale: float = 1.0):
        from glm_training.rewards.clip import DEFAULT_CLIP, ClipScoreReward

        self.reward = ClipScoreReward(model=model or DEFAULT_CLIP, device=device, dtype=dtype, scale=scale)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.reward(_reward_inputs(_check_images(images, "clip_score images"), prompts))


class OcrMetric:
    """Text accuracy per image against the quoted text of its prompt (rewards.ocr.OcrReward); NaN
    for prompts that quote no text (they are left out of the mean)."""

    def __init__(self, engine: str = "rapidocr", engine_options: dict | None = None, case_sensitive: bool = False,
                 ignore_spaces: bool = True, min_confidence: float = 0.0):
        from glm_training.rewards.ocr import OcrReward

        self.reward = OcrReward(engine=engine, engine_options=engine_options, no_text_score=math.nan,
                                case_sensitive=case_sensitive, ignore_spaces=ignore_spaces,
                                min_confidence=min_confidence)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.reward(_reward_inputs(_check_images(images, "ocr images"), prompts))


# ---------------------------------------------------------------------------------------------
# FID / KID (torchmetrics)
# ---------------------------------------------------------------------------------------------

def inception_weights_path(inception_weights: str | None = None) -> Path:
    """The local FID Inception weights: `inception_weights`, else torch hub's cache file. Never
    downloads: a missing file raises FileNotFoundError saying where to put it."""
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"fid/kid option inception_weights: {path} does not exist. It must be "
                                    f"torch-fidelity's Inception file ({os.path.basename(INCEPTION_WEIGHTS_URL)}).")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_WEIGHTS_URL)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID/KID need the Inception weights, and {path} is missing (no download is attempted). Download "
            f"{INCEPTION_WEIGHTS_URL} on a machine with internet and either copy it to {path.parent} "
            f"($TORCH_HOME/hub/checkpoints) or set eval.metric_options.fid.inception_weights (and .kid) to "
            f"its path; or set feature_extractor: package.module:factory to use another feature network.")
    return path


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (torch-fidelity's port) from a local weights file, taking
    float images in [0, 1] (it quantises them to uint8 as the reference implementation does)."""

    def __init__(self, weights: Path, num_features: int = 2048):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            import torch_fidelity  # noqa: F401
        except ImportError as error:
            raise ImportError("FID/KID with Inception need torch-fidelity: pip install 'glm_training[eval]' "
                              f"(or pip install torch-fidelity), or set feature_extractor ({error}).") from None
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(num_features)],
                                      feature_extractor_weights_path=str(weights))
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8))


def resolve_feature_extractor(feature_extractor: nn.Module | str | None = None,
                              inception_weights: str | None = None) -> nn.Module:
    """An nn.Module as given, `package.module:factory` called with no arguments, or Inception."""
    if isinstance(feature_extractor, nn.Module):
        return feature_extractor.eval()
    if isinstance(feature_extractor, str):
        module_name, _, attr = feature_extractor.partition(":")
        if not attr:
            raise ConfigError(f"fid/kid option feature_extractor: {feature_extractor!r} must be "
                              "'package.module:factory' (a callable returning an nn.Module).")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"fid/kid option feature_extractor: cannot import {feature_extractor!r} ({error}).") from None
        module = factory()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"fid/kid option feature_extractor: {feature_extractor!r} returned "
                              f"{type(module).__name__}, not an nn.Module.")
        return module.eval()
    if feature_extractor is not None:
        raise ConfigError(f"fid/kid option feature_extractor: expected an nn.Module or 'package.module:factory', "
                          f"got {type(feature_extractor).__name__}.")
    return InceptionFeatures(inception_weights_path(inception_weights))


class FidMetric:
    """Frechet distance between the feature statistics of real (target) and generated images
    (torchmetrics' FrechetInceptionDistance on `feature_extractor`). Needs >= 2 images per side."""

    name = "fid"

    def __init__(self, feature_extractor: nn.Module | str | None = None, inception_weights: str | None = None,
                 device: str | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        module = resolve_feature_extractor(feature_extractor, inception_weights)
        # normalize=True: float images in [0, 1] go to the (custom) network unchanged.
        self.metric = FrechetInceptionDistance(feature=module, normalize=True, reset_real_features=True)
        self.metric.to(device or "cpu")
        self.counts = [0, 0]

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        device = self.metric.device
        with torch.no_grad():
            self.metric.update(_check_images(real, f"{self.name} real images").to(device), real=True)
            self.metric.update(_check_images(fake, f"{self.name} generated images").to(device), real=False)
        self.counts[0] += len(real)
        self.counts[1] += len(fake)

    def _check_counts(self, minimum: int) -> None:
        if min(self.counts) < minimum:
            raise ValueError(f"{self.name} needs at least {minimum} real and {minimum} generated images; got "
                             f"{self.counts[0]} and {self.counts[1]} (add eval prompts).")

    def compute(self) -> dict[str, float]:
        self._check_counts(2)
        return {"fid": float(self.metric.compute())}

    def reset(self) -> None:
        self.metric.reset()
        self.counts = [0, 0]


class KidMetric(FidMetric):
    """Kernel Inception distance (torchmetrics; polynomial kernel, unbiased MMD over `subsets`
    random subsets of `subset_size` images, capped at the number of images)."""

    name = "kid"

    def __init__(self, feature_extractor: nn.Module | str | None = None, inception_weights: str | None = None,
                 subsets: int = 100, subset_size: int = 1000, degree: int = 3, device: str | None = None):
        import warnings

        from torchmetrics.image.kid import KernelInceptionDistance

        self.feature = resolve_feature_extractor(feature_extractor, inception_weights)
        self.subsets, self.subset_size, self.degree = int(subsets), int(subset_size), int(degree)
        self.device = device or "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "saves all features in a buffer": known, eval sets are small
            self.metric = KernelInceptionDistance(feature=self.feature, subsets=self.subsets,
                                                  subset_size=self.subset_size, degree=self.degree,
                                                  normalize=True).to(self.device)
        self.counts = [0, 0]

    def compute(self) -> dict[str, float]:
        self._check_counts(2)
        # torchmetrics needs subset_size <= images; small eval sets use every image per subset.
        self.metric.subset_size = min(self.subset_size, *self.counts)
        mean, std = self.metric.compute()
        return {"kid": float(mean), "kid_std": float(std)}


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature_extractor: nn.Module | str | None = None,
                     inception_weights: str | None = None) -> float:
    metric = FidMetric(feature_extractor, inception_weights)
    metric.update(real, fake)
    return metric.compute()["fid"]


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, feature_extractor: nn.Module | str | None = None,
                    inception_weights: str | None = None, subsets: int = 100, subset_size: int = 1000
                    ) -> tuple[float, float]:
    metric = KidMetric(feature_extractor, inception_weights, subsets=subsets, subset_size=subset_size)
    metric.update(real, fake)
    result = metric.compute()
    return result["kid"], result["kid_std"]


# ---------------------------------------------------------------------------------------------
# Text metrics (BAGEL's answers)
# ---------------------------------------------------------------------------------------------

def _references(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], n_gram: int = 4,
         smooth: bool = False) -> float:
    """Corpus BLEU (torchmetrics BLEUScore) of the predictions against one or more references each."""
    from torchmetrics.text import BLEUScore

    return float(BLEUScore(n_gram=n_gram, smooth=smooth)(list(predictions), _references(predictions, references)))


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          keys: Sequence[str] = ROUGE_KEYS) -> dict[str, float]:
    """Mean ROUGE F-measures (torchmetrics ROUGEScore, no stemming): {rouge1, rouge2, rougeL}."""
    from torchmetrics.text import ROUGEScore

    unknown = sorted(set(keys) - set(ROUGE_KEYS))
    if unknown:
        raise ConfigError(f"rouge option keys: {unknown} are not offered offline; use a subset of {list(ROUGE_KEYS)}.")
    scores = ROUGEScore(rouge_keys=tuple(keys))(list(predictions), _references(predictions, references))
    return {key: float(scores[f"{key}_fmeasure"]) for key in keys}


class BleuMetric:
    def __init__(self, n_gram: int = 4, smooth: bool = False):
        self.n_gram, self.smooth = int(n_gram), bool(smooth)

    def __call__(self, predictions, references) -> dict[str, float]:
        return {"bleu": bleu(predictions, references, self.n_gram, self.smooth)}


class RougeMetric:
    def __init__(self, keys: Sequence[str] = ROUGE_KEYS):
        self.keys = tuple(keys)
        rouge(["a"], ["a"], self.keys)  # reject bad keys when built, not at the first evaluation

    def __call__(self, predictions, references) -> dict[str, float]:
        return rouge(predictions, references, self.keys)


# ---------------------------------------------------------------------------------------------
# The suite chosen in the config
# ---------------------------------------------------------------------------------------------

FACTORIES: dict[str, Callable[..., Any]] = {
    "lpips": LpipsMetric, "ssim": SsimMetric, "clip_score": ClipScoreMetric, "ocr": OcrMetric,
    "fid": FidMetric, "kid": KidMetric, "bleu": BleuMetric, "rouge": RougeMetric,
}
NEEDS_TARGETS = ("lpips", "ssim", "fid", "kid")


def _check_metric_options(name: str, options: dict[str, Any]) -> None:
    parameters = inspect.signature(FACTORIES[name]).parameters
    for key in options:
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"eval.metric_options.{name}: unknown option {key!r}.{hint} "
                              f"Options: {', '.join(parameters) or '(none)'}.")


class EvalMetrics:
    """The metrics of `eval.metrics`, built once. `update(...)` per batch of eval images (and
    `update_texts` for text answers), then `compute()` -> {metric: value}: per-image metrics are
    means over every image seen, FID/KID use every pair seen."""

    def __init__(self, names: Sequence[str], options: dict[str, dict[str, Any]] | None = None):
        options = dict(options or {})
        unknown = [n for n in names if n not in FACTORIES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(FACTORIES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"eval.metrics: unknown metric {unknown[0]!r}.{hint} Available: {', '.join(METRIC_NAMES)}.")
        stray = sorted(set(options) - set(names))
        if stray:
            raise ConfigError(f"eval.metric_options: {stray} are not in eval.metrics {list(names)}.")
        self.names = list(dict.fromkeys(names))
        self.metrics: dict[str, Any] = {}
        for name in self.names:
            chosen = dict(options.get(name) or {})
            _check_metric_options(name, chosen)
            self.metrics[name] = FACTORIES[name](**chosen)
        self.reset()

    @property
    def image_metrics(self) -> list[str]:
        return [n for n in self.names if n in IMAGE_METRICS]

    @property
    def text_metrics(self) -> list[str]:
        return [n for n in self.names if n in TEXT_METRICS]

    def reset(self) -> None:
        self._scores: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self._texts: tuple[list[str], list] = ([], [])
        for name in ("fid", "kid"):
            if name in self.metrics:
                self.metrics[name].reset()

    def update(self, images: torch.Tensor, prompts: Sequence[str], targets: torch.Tensor | None = None) -> None:
        images = _check_images(images, "eval images")
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} eval images but {len(prompts)} prompts.")
        for name in self.image_metrics:
            metric = self.metrics[name]
            if name in NEEDS_TARGETS and targets is None:
                raise ValueError(f"eval metric {name!r} compares with target images, and the eval data has none; "
                                 f"give the eval prompts target images or remove {name} from eval.metrics.")
            if name in ("fid", "kid"):
                metric.update(targets, images)
            elif name in ("lpips", "ssim"):
                self._scores[name].append(metric(images, targets).float().cpu())
            else:
                self._scores[name].append(metric(images, prompts).float().cpu())

    def update_texts(self, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        _references(predictions, references)
        self._texts[0].extend(predictions)
        self._texts[1].extend(references)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for name in self.image_metrics:
            if name in ("fid", "kid"):
                results.update(self.metrics[name].compute())
                continue
            if not self._scores[name]:
                continue
            scores = torch.cat(self._scores[name])
            scores = scores[~torch.isnan(scores)]  # ocr: prompts without quoted text
            if len(scores):
                results[name] = float(scores.mean())
        if self.text_metrics and self._texts[0]:
            for name in self.text_metrics:
                results.update(self.metrics[name](*self._texts))
        return results

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str], targets: torch.Tensor | None = None
                 ) -> dict[str, float]:
        """One-shot: reset, update with these images, compute (image metrics only)."""
        self.reset()
        self.update(images, prompts, targets)
        return self.compute()


def build_metrics(names: Sequence[str], options: dict[str, dict[str, Any]] | None = None) -> EvalMetrics:
    return EvalMetrics(names, options)
