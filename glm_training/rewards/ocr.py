"""Text-rendering accuracy: OCR the image and compare with the quoted text of the prompt.

    reward = 1 - min(levenshtein(ocr_text, target), len(target)) / len(target)

(Flow-GRPO's OCR reward.) Both strings are normalised first: Unicode NFKC, case-folded (unless
`case_sensitive`), and all whitespace removed (unless `ignore_spaces: false`), because OCR engines
split and join words unpredictably. So 1.0 = the exact text is in the image, 0.0 = nothing of it.

The target text is every quoted span of the prompt, joined by a space: straight double quotes
"...", curly double quotes “...”, curly single quotes ‘...’, and CJK corner brackets 「...」 『...』.
Straight single quotes are not used (they are apostrophes in "don't"). With `text_key`, a
per-sample `metadata[text_key]` overrides the prompt. Prompts without any quoted text get
`no_text_score` (default 1.0: nothing to get wrong; the OCR engine is not run for them).

Engines: `rapidocr` (default; `rapidocr_onnxruntime` ships its PP-OCRv4 ONNX models, works
offline) and `paddleocr` (PaddleOCR 2.x `.ocr` or 3.x `.predict`; it downloads its models on
first use). An engine is created once per process and reused.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import unicodedata

import torch

from glm_training.config import ConfigError
from glm_training.rewards.base import RewardInputs, register_reward, require, to_uint8_hwc

QUOTED_TEXT = re.compile(r'"([^"]*)"|“([^”]*)”|‘([^’]*)’|「([^」]*)」|『([^』]*)』')


def extract_quoted_text(prompt: str) -> str | None:
    """The quoted spans of `prompt` joined by a space, or None when there are none."""
    spans = [next(group for group in match.groups() if group is not None) for match in QUOTED_TEXT.finditer(prompt)]
    spans = [span.strip() for span in spans if span.strip()]
    return " ".join(spans) if spans else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalise_text(text: str, case_sensitive: bool = False, ignore_spaces: bool = True) -> str:
    text = unicodedata.normalize("NFKC", text)
    if not case_sensitive:
        text = text.casefold()
    if ignore_spaces:
        text = "".join(text.split())
    else:
        text = " ".join(text.split())
    return text


def text_accuracy(recognised: str, target: str, case_sensitive: bool = False, ignore_spaces: bool = True) -> float:
    """`1 - min(levenshtein(recognised, target), len(target)) / len(target)` on normalised text."""
    recognised = normalise_text(recognised, case_sensitive, ignore_spaces)
    target = normalise_text(target, case_sensitive, ignore_spaces)
    if not target:
        return 1.0 if not recognised else 0.0
    return 1.0 - min(levenshtein(recognised, target), len(target)) / len(target)


@functools.lru_cache(maxsize=None)
def _rapidocr_engine(options_json: str):
    module = require("rapidocr_onnxruntime", "rapidocr_onnxruntime", "ocr reward (engine: rapidocr)")
    return module.RapidOCR(**json.loads(options_json))


@functools.lru_cache(maxsize=None)
def _paddleocr_engine(options_json: str):
    module = require("paddleocr", "paddleocr", "ocr reward (engine: paddleocr)")
    options = json.loads(options_json)
    return module.PaddleOCR(**options)


def _paddle_texts(engine, image_bgr, min_confidence: float) -> list[str]:
    if hasattr(engine, "predict"):  # PaddleOCR >= 3: a list of result dicts with rec_texts / rec_scores
        texts = []
        for result in engine.predict(image_bgr):
            scores = result.get("rec_scores") or [1.0] * len(result.get("rec_texts", []))
            texts += [text for text, score in zip(result.get("rec_texts", []), scores) if score >= min_confidence]
        return texts
    result = engine.ocr(image_bgr, cls=False)  # PaddleOCR 2.x: [[ [box, (text, score)], ... ]] or [None]
    lines = (result or [None])[0] or []
    return [line[1][0] for line in lines if line[1][1] >= min_confidence]


ENGINES = ("rapidocr", "paddleocr")
_ENGINE_LOCK = threading.Lock()


@register_reward("ocr")
class OcrReward:
    """Text accuracy of the image against the quoted text of the prompt (see the module docstring).

    Options: `engine` (rapidocr | paddleocr), `engine_options` (keyword arguments for the engine's
    constructor, e.g. {intra_op_num_threads: 2} for RapidOCR, {lang: en} for PaddleOCR),
    `no_text_score` (score of prompts without quoted text; default 1.0), `case_sensitive` (false),
    `ignore_spaces` (true), `min_confidence` (drop recognised lines below this score; 0.0),
    `text_key` (metadata key whose value overrides the prompt's quoted text).
    """

    name = "ocr"

    def __init__(self, engine: str = "rapidocr", engine_options: dict | None = None, no_text_score: float = 1.0,
                 case_sensitive: bool = False, ignore_spaces: bool = True, min_confidence: float = 0.0,
                 text_key: str | None = None):
        if engine not in ENGINES:
            raise ConfigError(f"Reward 'ocr': engine must be one of {ENGINES}; got {engine!r}.")
        if engine_options is not None and not isinstance(engine_options, dict):
            raise ConfigError(f"Reward 'ocr': engine_options must be a mapping; got {engine_options!r}.")
        self.engine_name = engine
        self.engine_options = dict(engine_options or {})
        if engine == "paddleocr":
            self.engine_options.setdefault("lang", "en")
        self.no_text_score = float(no_text_score)
        self.case_sensitive = case_sensitive
        self.ignore_spaces = ignore_spaces
        self.min_confidence = float(min_confidence)
        self.text_key = text_key
        # Fail at build time, not at the first rollout, when the package is missing.
        require("rapidocr_onnxruntime" if engine == "rapidocr" else "paddleocr",
                "rapidocr_onnxruntime" if engine == "rapidocr" else "paddleocr", f"ocr reward (engine: {engine})")

    @property
    def engine(self):
        options = json.dumps(self.engine_options, sort_keys=True)
        with _ENGINE_LOCK:
            return (_rapidocr_engine if self.engine_name == "rapidocr" else _paddleocr_engine)(options)

    def recognise(self, image_bgr) -> str:
        """All text the engine finds in one uint8 BGR (H, W, 3) image, lines joined by spaces."""
        engine = self.engine
        if self.engine_name == "rapidocr":
            result, _ = engine(image_bgr)
            texts = [line[1] for line in (result or []) if float(line[2]) >= self.min_confidence]
        else:
            texts = _paddle_texts(engine, image_bgr, self.min_confidence)
        return " ".join(texts)

    def target_text(self, inputs: RewardInputs, index: int) -> str | None:
        if self.text_key and inputs.metadata is not None:
            value = (inputs.metadata[index] or {}).get(self.text_key)
            if value is not None:
                return str(value)
        return extract_quoted_text(inputs.prompts[index])

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        arrays = to_uint8_hwc(inputs.images)
        scores = []
        for index, array in enumerate(arrays):
            target = self.target_text(inputs, index)
            if target is None:
                scores.append(self.no_text_score)
                continue
            recognised = self.recognise(array[..., ::-1].copy())  # engines take OpenCV's BGR order
            scores.append(text_accuracy(recognised, target, self.case_sensitive, self.ignore_spaces))
        return torch.tensor(scores, dtype=torch.float32)
