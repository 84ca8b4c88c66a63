"""One data record for every layout, and `load_records`, the one way trainers read data.

A trainer declares the fields it needs (`needs`, a subset of FIELDS):
- SFT: {"prompt", "target"} ({"target"} when data.caption_dropout == 1), + "controls" for i2i;
- offline DPO: {"prompt", "chosen", "rejected"}; GRPO / online DPO: {"prompt"};
- BAGEL SFT: {"conversation"} (the record's `metadata["conversation"]`, a BAGEL sequence plan;
  records with a prompt and a target image get the text-to-image / edit plan).

`load_records` picks the reader by layout (`data.format`, detected when `auto`; the layouts are
described in `readers.py`), checks every file, applies `data.on_error` (raise: one error listing
every bad file and line; skip: a warning with the count, the bad records left out), checks that
each record has the needed fields, and returns the records.

Splits: "train", or "eval": `data.eval_path` (any layout), else `data.eval_fraction` (a
deterministic held-out fraction, removed from the train split), else the layout's own eval split
(seed 000 `eval_prompts.txt` + `eval_target_images/`, seed 003 `eval_training_images/` +
`eval_control_images/`); no eval source: no eval records.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FIELDS = {"prompt", "target", "chosen", "rejected", "controls", "conversation"}
SPLITS = ("train", "eval")


class DataError(ValueError):
    """Bad training data; the message lists every bad file and what to do."""


@dataclass
class Record:
    prompt: str
    target: Path | None = None        # SFT target image
    chosen: Path | None = None        # preference pairs
    rejected: Path | None = None
    controls: list[Path] = field(default_factory=list)   # control / source images, in order
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else a layout carries
                                                           # (BAGEL: the conversation, ...)

    @property
    def where(self) -> str:
        """Where the record comes from ("file:line", or its main image), for messages."""
        return str(self.target or self.chosen or self.metadata.get("source") or self.prompt[:40])

    def images(self) -> list[Path]:
        return [p for p in (self.target, self.chosen, self.rejected) if p is not None] + list(self.controls)


# What to add when a needed field is missing, per layout.
_HINTS = {
    "target": {"folder": "add target_images/ (paired with prompts.txt in order)",
               "metadata_jsonl": "give each line an 'image' (or 'file_name') path",
               "prompts_txt": "use a folder with prompts.txt + target_images/, or a .jsonl with 'image' paths"},
    "chosen": {"folder": "add chosen/ and rejected/ (paired with prompts.txt in order)",
               "metadata_jsonl": "give each line 'chosen' and 'rejected' paths"},
    "controls": {"folder": "add source_images/",
                 "metadata_jsonl": "give each line 'control_images' (or 'source_image')",
                 "prompts_txt": "use a .jsonl with a 'source_image' per line"},
    "prompt": {"folder": "add prompts.txt", "metadata_jsonl": "give each line a 'prompt' (or 'text')",
               "control_folder": "add training_images/NAME.txt captions"},
}
_HINTS["rejected"] = _HINTS["chosen"]


def _hint(name: str, fmt: str) -> str:
    return _HINTS.get(name, {}).get(fmt, f"use a layout that provides '{name}' (see README, Data)")


def _has(record: Record, name: str) -> bool:
    if name == "prompt":
        return bool(record.prompt.strip())
    if name == "controls":
        return bool(record.controls)
    if name == "conversation":
        return "conversation" in record.metadata or (record.target is not None and bool(record.prompt.strip()))
    return getattr(record, name) is not None


def _missing_message(record: Record, name: str) -> str:
    if name == "prompt":
        return f"{record.where}: empty prompt"
    if name == "controls":
        return f"{record.where}: no control image; training.mode i2i needs at least one per sample"
    if name == "conversation":
        return f"{record.where}: no BAGEL conversation ('conversations') and no prompt + target image"
    return f"{record.where}: no '{name}' image"


def _held_out(records: list[Record], fraction: float) -> set[int]:
    """Indices of the eval records: the round(n * fraction) (at least one) whose content hash is
    lowest. Depends only on each record's prompt and file names, so adding data keeps them stable."""
    if fraction <= 0 or not records:
        return set()
    count = min(len(records) - 1, max(1, round(len(records) * fraction)))

    def key(index: int) -> str:
        record = records[index]
        names = "|".join(p.name for p in record.images())
        return hashlib.sha256(f"{record.prompt}\0{names}\0{index if not names else ''}".encode()).hexdigest()

    return set(sorted(range(len(records)), key=key)[:count])


def _check(records: list[tuple[Record, list[str]]], problems: list[str], needs: set[str], fmt: str,
           root: Path, same_control_count: bool, key: str) -> tuple[list[Record], list[str]]:
    """-> (good records, every problem). A field missing from every record is a layout error."""
    from glm_training.data.images import check_image

    if records:
        for name in sorted(needs):
            if not any(_has(r, name) for r, _ in records):
                word = "prompts" if name == "prompt" else "BAGEL conversations" if name == "conversation" else \
                    f"'{name}' images"
                raise DataError(f"{key} {root}: the {fmt} layout here has no {word}, which this training "
                                f"needs (fields {sorted(needs)}): {_hint(name, fmt)}.")
    good: list[Record] = []
    for record, found in records:
        issues = list(found) + [msg for msg in (check_image(p) for p in record.images()) if msg]
        for name in sorted(needs):
            # A pairing or caption problem found while reading already says why the field is empty.
            explained = {"prompt": any("caption" in msg for msg in found), "controls": bool(found)}
            if not _has(record, name) and not explained.get(name, False):
                issues.append(_missing_message(record, name))
        if issues:
            problems += issues
        else:
            good.append(record)
    if same_control_count and good:
        counts = Counter(len(r.controls) for r in good)
        common = max(counts, key=lambda n: (counts[n], n))
        for record in [r for r in good if len(r.controls) != common]:
            names = ", ".join(p.name for p in record.controls) or "none"
            problems.append(f"{record.where}: {len(record.controls)} control image(s) ({names}) but "
                            f"{counts[common]} samples have {common}; samples of one batch need the same "
                            "number: add or remove control images, or set training.batch_size: 1")
            good.remove(record)
    return good, problems


def _read(root: Path, fmt: str, split: str, needs: set[str], on_error: str,
          same_control_count: bool, key: str = "data.path") -> list[Record]:
    """`key`: the config key that named `root`, for the messages."""
    from glm_training.data import readers

    if not root.exists():
        raise DataError(f"{key} {root}: does not exist.")
    fmt = readers.detect_format(root, key) if fmt == "auto" else fmt
    if fmt not in readers.READERS:
        raise DataError(f"data.format: unknown format {fmt!r}; use auto or one of {', '.join(readers.READERS)}.")
    problems: list[str] = []
    entries = readers.READERS[fmt](root, split, problems)
    if split == "eval" and not entries and not problems:
        return []
    if problems and not entries:  # layout problems: nothing to skip to
        raise DataError(f"{key} {root}: the dataset is not usable:\n  - " + "\n  - ".join(problems))
    good, problems = _check(entries, problems, needs, fmt, root, same_control_count, key)
    if problems:
        listing = "\n  - ".join(problems)
        if on_error == "skip":
            logger.warning("data.on_error: skip: leaving out %d problem(s) of %s (%d records kept):\n  - %s",
                           len(problems), root, len(good), listing)
        else:
            raise DataError(f"{key} {root}: {len(problems)} problem(s) found before training:\n  - "
                            f"{listing}\nFix or remove these files, or set data.on_error: skip.")
    if not good:
        raise DataError(f"{key} {root}: no usable records.")
    if "conversation" in needs:
        from glm_training.models.bagel.data import record_plan

        for record in good:
            record.metadata.setdefault("conversation", record_plan(record))
    return good


def load_records(data: Any, needs: set[str], split: str = "train", *,
                 same_control_count: bool = False) -> list[Record]:
    """The validated records of `data` (a DataConfig) that hold every field in `needs`.

    same_control_count: every record needs the same number of control images (they batch together
    when training.batch_size > 1); the most common number wins, the others are listed as problems.
    """
    unknown = set(needs) - FIELDS
    if unknown:
        raise ValueError(f"load_records: unknown fields {sorted(unknown)}; known: {sorted(FIELDS)}.")
    if split not in SPLITS:
        raise ValueError(f"load_records: split must be one of {SPLITS}, got {split!r}.")
    if data.path is None:
        raise DataError("data.path: not set; point it at the dataset folder or manifest file.")
    eval_path, fraction = getattr(data, "eval_path", None), float(getattr(data, "eval_fraction", 0.0) or 0.0)
    if eval_path and fraction:
        raise DataError("data.eval_path and data.eval_fraction are both set; keep one (a separate eval "
                        "dataset, or a held-out fraction of data.path).")
    if not 0 <= fraction <= 0.5:
        raise DataError(f"data.eval_fraction: {fraction} must be in [0, 0.5].")
    args = dict(needs=set(needs), on_error=data.on_error, same_control_count=same_control_count)
    if split == "eval" and eval_path:
        return _read(Path(eval_path), "auto", "train", key="data.eval_path", **args)
    if fraction:
        records = _read(Path(data.path), data.format, "train", **args)
        held = _held_out(records, fraction)
        return [r for i, r in enumerate(records) if (i in held) == (split == "eval")]
    return _read(Path(data.path), data.format, split, **args)
