"""Evaluation metrics on constructed inputs: identical images, known shifts, formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from glm_training.config import ConfigError
from glm_training.evaluation.metrics import (
    EvalMetrics,
    FidMetric,
    KidMetric,
    bleu,
    frechet_distance,
    inception_weights_path,
    kernel_distance,
    rouge,
)


def noisy_copies(levels, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 3, size, size, generator=generator).repeat(len(levels), 1, 1, 1)
    noise = torch.randn(target.shape, generator=generator)
    return (target + noise * torch.tensor(levels).view(-1, 1, 1, 1)).clamp(0, 1), target


class SmallFeatures(nn.Module):
    """A locally built random-weight feature network (no Inception weights offline)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 16

    def forward(self, x):
        return self.net(x.float())


def image_set(count: int, seed: int, brightness: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 3, 24, 24, generator=generator) * 0.7 + brightness).clamp(0, 1)


# --- LPIPS / SSIM ------------------------------------------------------------------------------

def test_lpips_identical_is_zero_and_grows_with_noise(tmp_path):
    import torchvision

    torch.manual_seed(0)
    trunk = tmp_path / "alexnet.pth"  # a local random trunk file, passed as the backbone option
    torch.save(torchvision.models.alexnet().state_dict(), trunk)
    images, target = noisy_copies([0.0, 0.05, 0.4])
    metrics = EvalMetrics(["lpips"], {"lpips": {"backbone": str(trunk)}})
    distances = metrics.metrics["lpips"](images, target)
    assert distances[0] == pytest.approx(0.0, abs=1e-5)
    assert distances[0] < distances[1] < distances[2]
    assert metrics.evaluate(images, ["p"] * 3, target)["lpips"] == pytest.approx(float(distances.mean()), abs=1e-6)


def test_ssim_identical_is_one_and_falls_with_noise():
    images, target = noisy_copies([0.0, 0.05, 0.4])
    metrics = EvalMetrics(["ssim"])
    scores = metrics.metrics["ssim"](images, target)
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[0] > scores[1] > scores[2]
    assert metrics.evaluate(images, ["p"] * 3, target)["ssim"] == pytest.approx(float(scores.mean()), abs=1e-6)


# --- CLIP score ----------------------------------------------------------------------------------

def test_clip_score_is_the_scaled_cosine_of_clip_embeddings():
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    from glm_training.models.tiny import ensure_tiny

    folder = ensure_tiny("clip")
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a blue square on grass"]
    metrics = EvalMetrics(["clip_score"], {"clip_score": {"model": "tiny:clip", "scale": 100.0}})
    got = metrics.evaluate(images, prompts)["clip_score"]

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, do_rescale=False, return_tensors="pt")
    tokens = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    expected = 100 * torch.nn.functional.cosine_similarity(image, text).mean()
    assert got == pytest.approx(float(expected), abs=1e-4)


# --- OCR -----------------------------------------------------------------------------------------

def render_text(text: str, width: int = 320, height: int = 80) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    font_file = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    font = ImageFont.truetype(str(font_file), 36) if font_file.is_file() else ImageFont.load_default(size=36)
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((12, 18), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_ocr_accuracy_counts_only_prompts_with_quoted_text():
    images = torch.stack([render_text("HELLO WORLD"), render_text("HELLO WORLD"), render_text("")])
    metrics = EvalMetrics(["ocr"])
    right = metrics.evaluate(images[:1], ['a sign that says "HELLO WORLD"'])["ocr"]
    wrong = metrics.evaluate(images[:1], ['a sign that says "quantum jazz"'])["ocr"]
    assert right > 0.8 and wrong < 0.4
    # the second prompt quotes nothing: left out of the mean, not counted as 1 or 0
    mixed = metrics.evaluate(images[:2], ['a sign that says "HELLO WORLD"', "a plain sign"])["ocr"]
    assert mixed == pytest.approx(right, abs=1e-6)
    blank = metrics.evaluate(images[2:], ['a sign that says "HELLO WORLD"'])["ocr"]
    assert blank == pytest.approx(0.0, abs=1e-6)
    assert "ocr" not in metrics.evaluate(images[:1], ["no quotes at all"])


# --- FID / KID -----------------------------------------------------------------------------------

def test_fid_matches_the_formula_and_separates_distributions():
    from scipy import linalg

    features = SmallFeatures()
    real, same, shifted = image_set(64, 0), image_set(64, 1), image_set(64, 2, brightness=0.3)
    fid_same = frechet_distance(real, same, features)
    fid_shifted = frechet_distance(real, shifted, features)
    assert fid_same < fid_shifted / 5, (fid_same, fid_shifted)
    assert frechet_distance(real, real, features) == pytest.approx(0.0, abs=1e-3)

    with torch.no_grad():
        a, b = features(real).double().numpy(), features(shifted).double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    assert fid_shifted == pytest.approx(expected, rel=1e-3)


def test_kid_separates_distributions_and_caps_the_subset_size():
    features = SmallFeatures()
    real, same, shifted = image_set(40, 0), image_set(40, 1), image_set(40, 2, brightness=0.3)
    kid_same, _ = kernel_distance(real, same, features, subsets=10)
    kid_shifted, std = kernel_distance(real, shifted, features, subsets=10)  # subset_size 1000 > 40 images
    assert abs(kid_same) < kid_shifted / 5 and std >= 0, (kid_same, kid_shifted)

    metrics = EvalMetrics(["fid", "kid"], {"fid": {"feature_extractor": features},
                                           "kid": {"feature_extractor": features, "subsets": 10}})
    metrics.update(shifted[:20], ["p"] * 20, real[:20])  # batches accumulate
    metrics.update(shifted[20:], ["p"] * 20, real[20:])
    result = metrics.compute()
    assert result["fid"] == pytest.approx(frechet_distance(real, shifted, features), rel=1e-4)
    assert result["kid"] > 0 and "kid_std" in result


def test_fid_feature_extractor_by_import_path_and_too_few_images():
    metric = FidMetric("tests.test_eval_metrics:SmallFeatures")
    metric.update(image_set(1, 0), image_set(1, 1))
    with pytest.raises(ValueError, match="at least 2 real and 2 generated"):
        metric.compute()
    with pytest.raises(ConfigError, match="package.module:factory"):
        FidMetric("not_a_path")


def test_inception_weights_missing_offline_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError) as caught:
        KidMetric()
    message = str(caught.value)
    assert str(expected) in message and "inception_weights" in message and "feature_extractor" in message
    with pytest.raises(FileNotFoundError, match="inception_weights: .*nowhere.pth does not exist"):
        inception_weights_path(str(tmp_path / "nowhere.pth"))
    # a local copy (here in the cache folder) is found without any download
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"")
    assert inception_weights_path() == expected


# --- BLEU / ROUGE ----------------------------------------------------------------------------------

def test_bleu_and_rouge_against_hand_computed_values():
    prediction, reference = "the cat sat on the mat", "the cat sat on a mat"
    assert bleu([reference], [reference]) == pytest.approx(1.0)
    # BLEU-2, same length (brevity penalty 1): p1 = 5/6, p2 = 3/5 -> sqrt(p1 * p2)
    assert bleu([prediction], [reference], n_gram=2) == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-5)
    scores = rouge([prediction], [reference])
    assert scores["rouge1"] == pytest.approx(5 / 6, abs=1e-4)
    assert scores["rouge2"] == pytest.approx(3 / 5, abs=1e-4)
    assert scores["rougeL"] == pytest.approx(5 / 6, abs=1e-4)  # LCS: the cat sat on mat
    assert rouge(["completely unrelated words"], [reference])["rouge1"] == 0.0

    metrics = EvalMetrics(["bleu", "rouge"], {"bleu": {"n_gram": 2}})
    metrics.update_texts([prediction], [[reference, "a cat sat on the mat"]])  # several references
    result = metrics.compute()
    assert set(result) == {"bleu", "rouge1", "rouge2", "rougeL"} and result["bleu"] > 0.7


# --- the suite -------------------------------------------------------------------------------------

def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"eval.metrics: unknown metric 'lpip'.*Did you mean 'lpips'"):
        EvalMetrics(["lpip"])
    with pytest.raises(ConfigError, match=r"eval.metric_options.ssim: unknown option 'window'"):
        EvalMetrics(["ssim"], {"ssim": {"window": 3}})
    with pytest.raises(ConfigError, match=r"eval.metric_options: \['fid'\] are not in eval.metrics"):
        EvalMetrics(["ssim"], {"fid": {}})
    with pytest.raises(ConfigError, match="rougeLsum"):
        EvalMetrics(["rouge"], {"rouge": {"keys": ["rougeLsum"]}})
    with pytest.raises(ValueError, match="eval metric 'ssim' compares with target images"):
        EvalMetrics(["ssim"]).update(image_set(2, 0), ["a", "b"])
