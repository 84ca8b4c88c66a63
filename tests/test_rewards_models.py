"""Rewards backed by models: LPIPS (torchvision trunk cache), CLIP score and aesthetic (tiny
random-weight CLIP), OCR (rapidocr_onnxruntime's bundled models on PIL-rendered text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from glm_training.config import ConfigError
from glm_training.rewards import RewardError, RewardInputs, build_reward, build_reward_calculator
from glm_training.rewards.ocr import extract_quoted_text, levenshtein, text_accuracy
from glm_training.rewards.similarity import lpips_backbone_cache_path


def noisy_copies(levels, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random target repeated len(levels) times, and copies with Gaussian noise of those stds."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(1, 3, size, size, generator=generator).repeat(len(levels), 1, 1, 1)
    noise = torch.randn(target.shape, generator=generator)
    return (target + noise * torch.tensor(levels).view(-1, 1, 1, 1)).clamp(0, 1), target


# --- LPIPS -------------------------------------------------------------------------------------

def test_lpips_without_trunk_weights_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert lpips_backbone_cache_path("alex") == expected
    with pytest.raises(FileNotFoundError) as caught:
        build_reward("lpips")
    message = str(caught.value)
    assert str(expected) in message and "backbone:" in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    with pytest.raises(RewardError, match=r"Reward 'perceptual'.*alexnet-owt-7be5be79.pth"):
        build_reward_calculator({"rewards": {"perceptual": {"type": "lpips"}}})


def test_lpips_with_cached_trunk(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache_file = lpips_backbone_cache_path("alex")
    cache_file.parent.mkdir(parents=True)
    torch.manual_seed(0)
    # torchvision's own cache format: a pickled state dict under the exact file name it downloads
    torch.save(torchvision.models.alexnet().state_dict(), cache_file)

    images, target = noisy_copies([0.0, 0.03, 0.3])
    reward = build_reward("lpips", net="alex")
    scores = reward(RewardInputs(images, ["p"] * 3, target_images=target))
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # identical: distance 0, the best score
    assert scores[0] > scores[1] > scores[2]
    # a target of another size is resized; an explicit backbone file is used instead of the cache
    small_target = torch.nn.functional.interpolate(target, size=(24, 24), mode="bilinear", align_corners=False)
    moved = tmp_path / "alexnet.pth"
    cache_file.rename(moved)
    by_path = build_reward("lpips", backbone=str(moved))
    resized = by_path(RewardInputs(images, ["p"] * 3, target_images=small_target))
    assert torch.isfinite(resized).all() and resized[0] > resized[2]


# --- CLIP score and aesthetic --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from glm_training.models.tiny import ensure_tiny

    return ensure_tiny("clip")


def test_tiny_clip_loads_through_transformers(tiny_clip):
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(tiny_clip)
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)(["a red circle"], return_tensors="pt")
    assert tokens["input_ids"][0, 0] == model.config.text_config.bos_token_id
    pixels = AutoImageProcessor.from_pretrained(tiny_clip)(images=torch.rand(1, 3, 48, 40), do_rescale=False,
                                                           return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert (tiny_clip / "aesthetic_head.safetensors").is_file()


def test_clip_score_depends_on_prompt_and_image(tiny_clip):
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    reward = build_reward("clip_score", model=str(tiny_clip))
    same_prompts = ["a red circle"] * 3
    scores = reward(RewardInputs(images, same_prompts))
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores.abs() <= 1).all()
    assert torch.equal(scores, reward(RewardInputs(images, same_prompts)))  # deterministic
    assert scores.unique().numel() == 3  # depends on the image
    same_image = images[:1].repeat(3, 1, 1, 1)
    by_prompt = reward(RewardInputs(same_image, ["a red circle", "a blue square", "text that says hello"]))
    assert by_prompt.unique().numel() == 3  # depends on the prompt
    scaled = build_reward("clip_score", model="tiny:clip", scale=2.5)(RewardInputs(images, same_prompts))
    assert torch.allclose(scaled, 2.5 * scores, atol=1e-5)


def test_aesthetic_head_formats_and_scores(tiny_clip, tmp_path):
    from safetensors.torch import load_file

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    images[2] = 0.0
    reward = build_reward("aesthetic", model=str(tiny_clip))  # head defaults to the folder's file
    scores = reward(RewardInputs(images, ["x"] * 3))
    assert torch.isfinite(scores).all() and scores.unique().numel() == 3
    assert torch.equal(scores, reward(RewardInputs(images, ["other prompts"] * 3)))  # prompt-independent

    # the official .pth state dict format (loaded with weights_only=True) gives the same head
    state = load_file(str(tiny_clip / "aesthetic_head.safetensors"))
    torch.save(state, tmp_path / "head.pth")
    from_pth = build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "head.pth"))
    assert torch.allclose(from_pth(RewardInputs(images, ["x"] * 3)), scores)

    # a linear head (weight, bias) on the normalised embedding
    torch.save({"weight": torch.ones(1, 32), "bias": torch.zeros(1)}, tmp_path / "linear.pth")
    linear = build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "linear.pth"))
    embeddings = linear.encoder.image_embeddings(images)
    assert torch.allclose(linear(RewardInputs(images, ["x"] * 3)), embeddings.sum(-1), atol=1e-5)

    torch.save({"weight": torch.ones(1, 768), "bias": torch.zeros(1)}, tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match="768-d embeddings but CLIP .* 32-d"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "wide.pth"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys"):
        torch.save({"fc.weight": torch.ones(1, 32)}, tmp_path / "odd.pth")
        build_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "odd.pth"))


def test_clip_from_an_unavailable_model_names_it(tmp_path):
    with pytest.raises(RewardError, match=r"Reward 'semantic'.*Could not load CLIP from .*no_clip_here"):
        build_reward_calculator({"rewards": {"semantic": {"type": "clip_score",
                                                          "model": str(tmp_path / "no_clip_here")}}})


def test_clip_rewards_in_a_per_component_calculator(tiny_clip):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    config = {"device": "cpu", "batch_size": 3,
              "rewards": {"aesthetic": {"model": "tiny:clip"}, "clip_score": {"model": "tiny:clip"},
                          "brightness": {}},
              "weights": {"ar": {"aesthetic": 0.7, "clip_score": 0.3}, "dit": {"brightness": 1.0}}}
    ar = build_reward_calculator(config, component="ar")
    total, per_reward = ar(RewardInputs(images, ["a cat"] * 4))
    assert set(per_reward) == {"aesthetic", "clip_score"}
    assert torch.allclose(total, 0.7 * per_reward["aesthetic"] + 0.3 * per_reward["clip_score"], atol=1e-6)
    whole = build_reward("clip_score", model="tiny:clip")(RewardInputs(images, ["a cat"] * 4))
    assert torch.allclose(per_reward["clip_score"], whole, atol=1e-5)  # chunks of 3 + 1 == one batch


# --- OCR ---------------------------------------------------------------------------------------

def render_text(text: str, width: int = 320, height: int = 80) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    font_file = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    font = ImageFont.truetype(str(font_file), 36) if font_file.is_file() else ImageFont.load_default(size=36)
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((12, 18), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_quoted_text_and_edit_distance():
    assert extract_quoted_text('a sign saying "OPEN" and "24/7"') == "OPEN 24/7"
    assert extract_quoted_text("a poster with “Grand Sale” in red") == "Grand Sale"
    assert extract_quoted_text("a mug that reads ‘hi’, don't") == "hi"
    assert extract_quoted_text("海报上写着「你好」") == "你好"
    assert extract_quoted_text("a cat on a mat") is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert text_accuracy("Hello  World", "hello world") == 1.0  # case and spaces normalised
    assert text_accuracy("helo", "hello") == pytest.approx(0.8)
    assert text_accuracy("completely different and long", "abc") == 0.0  # distance capped at len(target)
    assert text_accuracy("Hello", "hello", case_sensitive=True) == pytest.approx(0.8)


def test_ocr_reward_on_rendered_text():
    images = torch.stack([render_text("HELLO WORLD"), render_text("Open 24 hours")])
    reward = build_reward("ocr")
    same = reward(RewardInputs(images, ['a sign that says "HELLO WORLD"', "a shop sign “Open 24 hours”"]))
    assert (same > 0.8).all(), same
    different = reward(RewardInputs(images, ['a sign that says "quantum jazz"', 'a shop sign "Pizza Mexico"']))
    assert (different < 0.4).all(), different
    no_text = RewardInputs(images, ["a plain sign", "a shop"])
    assert reward(no_text).tolist() == [1.0, 1.0]
    assert build_reward("ocr", no_text_score=0.0)(no_text).tolist() == [0.0, 0.0]
    from_metadata = build_reward("ocr", text_key="text")(
        RewardInputs(images, ["no quotes", 'wrong "zzz"'], metadata=[{"text": "HELLO WORLD"}, {}]))
    assert from_metadata[0] > 0.8 and from_metadata[1] < 0.4
    with pytest.raises(ConfigError, match="engine must be one of"):
        build_reward("ocr", engine="tesseract")


class FakePaddleOCR2:
    """PaddleOCR 2.x result shape: per image a list of [box, (text, score)] lines, or None."""

    def __init__(self, lang="en", **kwargs):
        self.lang = lang

    def ocr(self, image, cls=False):
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        if image.mean() > 250:  # blank image: nothing found
            return [None]
        return [[[[[0, 0], [1, 0], [1, 1], [0, 1]], ("HELLO", 0.99)],
                 [[[0, 2], [1, 2], [1, 3], [0, 3]], ("W0RLD", 0.2)]]]


class FakePaddleOCR3(FakePaddleOCR2):
    """PaddleOCR 3.x: `predict` returns result dicts with rec_texts / rec_scores."""

    def predict(self, image):
        if image.mean() > 250:
            return [{"rec_texts": [], "rec_scores": []}]
        return [{"rec_texts": ["HELLO", "W0RLD"], "rec_scores": [0.99, 0.2]}]


@pytest.mark.parametrize("engine_class", [FakePaddleOCR2, FakePaddleOCR3])
def test_paddleocr_engine_adapter(monkeypatch, engine_class):
    import sys
    import types

    from glm_training.rewards import ocr

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=engine_class))
    ocr._paddleocr_engine.cache_clear()
    try:
        images = torch.stack([torch.full((3, 16, 16), 0.5)] * 2 + [torch.ones(3, 16, 16)])
        inputs = RewardInputs(images, ['"hello world"', '"hello"', '"hello"'])
        scores = build_reward("ocr", engine="paddleocr")(inputs)
        # "hellow0rld" vs "helloworld"; far too long for "hello"; nothing found on the blank image
        assert scores.tolist() == pytest.approx([0.9, 0.0, 0.0])
        confident = build_reward("ocr", engine="paddleocr", min_confidence=0.5)(inputs)
        assert confident.tolist() == pytest.approx([0.5, 1.0, 0.0])  # only "HELLO" is kept
        assert ocr._paddleocr_engine.cache_info().currsize == 1  # one engine, reused
    finally:
        ocr._paddleocr_engine.cache_clear()
