"""Seed-004 BAGEL data files (JSON or JSONL) -> `BagelSample` plans for `pack_samples`.

Two record formats:

- conversation: `{"conversations": [{"role": "system"|"user"|"assistant", "type": "text"|"image",
  "content": "...", "image_path": "..."}, ...]}` (text entries need `content`, image entries
  `image_path`);
- text-to-image: `{"text_prompt": "...", "image_path": "..."}`.

Mapping to the official sequence plans (github.com/ByteDance-Seed/Bagel, `data/vlm_dataset.py`,
`data/t2i_dataset.py`, `data/interleave_datasets/edit_dataset.py`):

- a conversation without an assistant image is understanding (VLM SFT): user images go to the
  ViT, user/system text has no loss, assistant text has CE loss; nothing is dropped for CFG;
- a conversation with an assistant image is generation/editing: user images are conditioning
  images given both as clean VAE latents and to the ViT, user/system text is conditioning text
  (all droppable for CFG), assistant images are generation targets (MSE loss; one followed by
  more turns is also given clean, VAE + ViT, as context for them), assistant text has CE loss;
- text-to-image is conditioning text (droppable) followed by the target image.

Image paths are relative to `image_root`, or to the data file's folder. Every problem raises
`BagelDataError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from glm_training.models.bagel.packing import BagelSample, SequenceItem, TextItem, VaeImageItem, VitImageItem

ROLES = ("system", "user", "assistant")
TYPES = ("text", "image")


class BagelDataError(ValueError):
    """A data file problem; the message names file, line and field."""


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of a .jsonl (one object per line) or .json (list of objects) file."""
    from glm_training.data.readers import DataError, iter_json_array, read_text

    path = Path(path)
    try:
        text = read_text(path)  # UTF-8 with or without a byte-order mark
    except OSError as error:
        raise BagelDataError(f"{path}: cannot read the data file ({error.strerror}).") from None
    except DataError as error:
        raise BagelDataError(str(error)) from None
    if path.suffix == ".jsonl":
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise BagelDataError(f"{path}:{number}: invalid JSON ({error.msg}).") from None
            yield number, record
    elif path.suffix == ".json":
        try:
            yield from iter_json_array(text, path)
        except DataError as error:
            raise BagelDataError(str(error)) from None
    else:
        raise BagelDataError(f"{path}: data files must be .json or .jsonl.")


def _string(value: Any, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BagelDataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise BagelDataError(f"{where}: field '{field}' is empty.")
    return value


def _image(value: Any, where: str, field: str, root: Path) -> Path:
    image_path = root / _string(value, where, field)
    if not image_path.is_file():
        raise BagelDataError(f"{where}: field '{field}': image {image_path} does not exist.")
    return image_path


def parse_record(record: Any, where: str, root: Path) -> BagelSample:
    """One record -> a sample plan (see the module doc for the rules)."""
    if not isinstance(record, dict):
        raise BagelDataError(f"{where}: a record must be a JSON object, got {type(record).__name__}.")
    if "conversations" in record:
        return _parse_conversation(record["conversations"], where, root)
    if "text_prompt" in record or "image_path" in record:
        for key in ("text_prompt", "image_path"):
            if key not in record:
                raise BagelDataError(f"{where}: field '{key}' is missing (text-to-image records need "
                                     "'text_prompt' and 'image_path').")
        prompt = _string(record["text_prompt"], where, "text_prompt")
        image = _image(record["image_path"], where, "image_path", root)
        return BagelSample([TextItem(prompt, loss=False, cfg=True), VaeImageItem(image, loss=True)], where)
    raise BagelDataError(f"{where}: a record needs 'conversations' or 'text_prompt' + 'image_path' "
                         f"(found keys {sorted(record)}).")


def _parse_conversation(turns: Any, where: str, root: Path) -> BagelSample:
    if not isinstance(turns, list) or not turns:
        raise BagelDataError(f"{where}: field 'conversations' must be a non-empty list.")
    parsed: list[tuple[str, str, Any]] = []
    for index, turn in enumerate(turns):
        field = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise BagelDataError(f"{where}: field '{field}' must be an object.")
        role, kind = turn.get("role"), turn.get("type")
        if role not in ROLES:
            raise BagelDataError(f"{where}: field '{field}.role' must be one of {list(ROLES)}, got {role!r}.")
        if kind not in TYPES:
            raise BagelDataError(f"{where}: field '{field}.type' must be one of {list(TYPES)}, got {kind!r}.")
        if kind == "text":
            if "content" not in turn:
                raise BagelDataError(f"{where}: field '{field}.content' is missing (text entries need it).")
            value: Any = _string(turn["content"], where, f"{field}.content")
        else:
            if "image_path" not in turn:
                raise BagelDataError(f"{where}: field '{field}.image_path' is missing (image entries need it).")
            if role == "system":
                raise BagelDataError(f"{where}: field '{field}': a system entry cannot be an image.")
            value = _image(turn["image_path"], where, f"{field}.image_path", root)
        parsed.append((role, kind, value))

    generation = any(role == "assistant" and kind == "image" for role, kind, _ in parsed)
    if not any(role == "assistant" for role, _, _ in parsed):
        raise BagelDataError(f"{where}: field 'conversations' has no assistant entry, so nothing to learn.")
    items: list[SequenceItem] = []
    for index, (role, kind, value) in enumerate(parsed):
        last = index == len(parsed) - 1
        if kind == "text":
            learned = role == "assistant"
            items.append(TextItem(value, loss=learned, cfg=generation and not learned))
        elif role == "assistant":
            items.append(VaeImageItem(value, loss=True))
            if not last:  # an intermediate result is context for the following turns
                items += [VaeImageItem(value, loss=False, cfg=True), VitImageItem(value, cfg=True)]
        elif generation:
            items += [VaeImageItem(value, loss=False, cfg=True), VitImageItem(value, cfg=True)]
        else:
            items.append(VitImageItem(value))
    return BagelSample(items, where)


def record_plan(record: Any) -> BagelSample:
    """The sequence plan of a `Record` without a conversation: its control images (clean VAE
    latents + ViT, droppable), its prompt (droppable) and its target image (generation, MSE loss);
    text-to-image when it has no controls, as `text_prompt` + `image_path` records are."""
    items: list[SequenceItem] = []
    for control in record.controls:
        items += [VaeImageItem(control, loss=False, cfg=True), VitImageItem(control, cfg=True)]
    items += [TextItem(record.prompt, loss=False, cfg=True), VaeImageItem(record.target, loss=True)]
    return BagelSample(items, str(record.metadata.get("source", record.target)))


def load_bagel_samples(paths: str | Path | list[str | Path], image_root: str | Path | None = None) -> list[BagelSample]:
    """Parse every record of the given .json / .jsonl files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    samples = []
    for path in map(Path, paths):
        root = Path(image_root) if image_root is not None else path.parent
        before = len(samples)
        for line, record in iter_records(path):
            samples.append(parse_record(record, f"{path}:{line}", root))
        if len(samples) == before:
            raise BagelDataError(f"{path}: no record found.")
    return samples
