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


# --- BLEU / ROUGE during BAGEL SFT ----------------------------------------------------------------

def bagel_conversation_data(root: Path) -> tuple[Path, Path]:
    """Train / held-out BAGEL files: the same question about squares of a colour, one word answers;
    the eval file also has a text-to-image record (no text answer: left out of bleu / rouge) and a
    two-turn conversation (two questions, the first answer is context for the second)."""
    import json

    from PIL import Image

    def rows(colours):
        out = []
        for colour in colours:
            Image.new("RGB", (16, 16), colour).save(root / f"{colour}.png")
            out.append({"conversations": [
                {"role": "user", "type": "image", "image_path": f"{colour}.png"},
                {"role": "user", "type": "text", "content": "which colour is this?"},
                {"role": "assistant", "type": "text", "content": f"it is {colour}"}]})
        return out

    train = rows(["red", "blue", "green", "yellow"])
    held_out = rows(["red", "blue"]) + [
        {"text_prompt": "a red square", "image_path": "red.png"},
        {"conversations": [{"role": "user", "type": "image", "image_path": "green.png"},
                           {"role": "user", "type": "text", "content": "which colour is this?"},
                           {"role": "assistant", "type": "text", "content": "it is green"},
                           {"role": "user", "type": "text", "content": "and now?"},
                           {"role": "assistant", "type": "text", "content": "still green"}]}]
    paths = root / "train.jsonl", root / "eval.jsonl"
    for path, data in zip(paths, (train, held_out)):
        path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
    return paths


def bagel_config(tmp_path: Path, train: Path, held_out: Path, **eval_section) -> dict:
    return {"model": {"family": "bagel", "pretrained_model_name_or_path": "tiny:bagel", "component": "und"},
            "data": {"path": str(train), "eval_path": str(held_out), "resolution": 16},
            "training": {"max_train_steps": 2, "batch_size": 2, "learning_rate": 3e-3, "checkpointing_steps": 100},
            "lora": {"rank": 4, "alpha": 8},
            "eval": {"metrics": ["bleu", "rouge"], "metric_options": {"bleu": {"n_gram": 2}}, **eval_section},
            "logging": {"output_dir": str(tmp_path / "out"), "project": "bagel", "report_to": []}}


def test_bagel_sft_logs_bleu_and_rouge_of_its_greedy_answers_on_held_out_conversations(tmp_path):
    import json

    from glm_training.config import config_from_dict
    from glm_training.evaluation.validation import evaluation_mode, text_questions
    from glm_training.trainers.sft import SFTTrainer

    train, held_out = bagel_conversation_data(tmp_path)
    raw = bagel_config(tmp_path, train, held_out, steps=10)
    raw["training"]["max_train_steps"] = 20
    trainer = SFTTrainer(config_from_dict(raw))
    run = trainer.train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row for row in rows if "eval/bleu" in row}
    assert sorted(logged) == [10, 20]
    assert {"eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/loss"} <= set(logged[20])
    # Training on answers of the same form makes the held-out answers closer to the references
    # (measured: rouge1 0.12 -> 0.5, bleu 0.05 -> 0.36 between steps 10 and 20).
    assert logged[20]["eval/rouge1"] > logged[10]["eval/rouge1"] + 0.2
    assert logged[20]["eval/bleu"] > logged[10]["eval/bleu"] + 0.1
    # Against the formulas: the family's greedy answers to the 4 questions of the eval split,
    # scored with torchmetrics directly; and greedy decoding is reproducible (same weights, same text).
    records = trainer.eval_split()
    questions = [q for r in records for q in text_questions(r)]
    assert [reference for _, reference in questions] == ["it is red", "it is blue", "it is green", "still green"]
    assert "it is green" in [item.text for item in questions[3][0] if hasattr(item, "text")]  # earlier turn = context
    with evaluation_mode(trainer, records):
        answers = trainer.family.answer([context for context, _ in questions], max_new_tokens=64)
        again = trainer.family.answer([context for context, _ in questions], max_new_tokens=64)
    assert answers == again
    references = [reference for _, reference in questions]
    assert logged[20]["eval/bleu"] == pytest.approx(bleu(answers, references, n_gram=2), abs=1e-6)
    for key, value in rouge(answers, references).items():
        assert logged[20][f"eval/{key}"] == pytest.approx(value, abs=1e-6)
    # Perfect answers would score 1: the metric is wired to these references, not to the answers.
    assert rouge(references, references)["rouge1"] == pytest.approx(1.0)


def test_text_metrics_are_refused_where_nothing_answers_and_checked_before_weights(tmp_path, monkeypatch):
    from glm_training import cli
    from glm_training.config import config_from_dict
    from glm_training.data.datasets import DataError
    from glm_training.trainers.sft import SFTTrainer

    train, held_out = bagel_conversation_data(tmp_path)
    raw = bagel_config(tmp_path, train, held_out)
    sdxl = {**raw, "model": {"family": "sdxl", "pretrained_model_name_or_path": "tiny:sdxl"}}
    with pytest.raises(ConfigError, match="eval.metrics: bleu scores generated text answers.*model.family: bagel"):
        config_from_dict(sdxl)
    with pytest.raises(ConfigError, match="eval.metrics: bleu.*SFT"):
        config_from_dict({**raw, "training": {**raw["training"], "method": "dpo"}})
    # An eval split with no text answer is found before the model loads (setup and --validate).
    no_answers = tmp_path / "t2i.jsonl"
    no_answers.write_text('{"text_prompt": "a red square", "image_path": "red.png"}\n')

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad eval split was reported")

    monkeypatch.setattr("glm_training.models.bagel.family.BagelFamily.load", refuse)
    cfg = config_from_dict({**raw, "data": {**raw["data"], "eval_path": str(no_answers)}})
    with pytest.raises(DataError, match=f"eval.metrics: bleu, rouge.*data.eval_path {no_answers}.*assistant text"):
        SFTTrainer(cfg).setup()
    with pytest.raises(DataError, match="no conversation with an assistant text answer"):
        cli.validate_data(cfg)
