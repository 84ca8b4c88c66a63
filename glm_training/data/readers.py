"""One reader per dataset layout; each returns `Record`s (with the problems it found per record).

Layouts (`data.format`, detected when `auto`):
- folder (seed 000): `prompts.txt`, one prompt per line, paired in order with the files of each
  image folder present (natural sort order): `target_images/` (SFT targets), `chosen/` +
  `rejected/` (preference pairs), `source_images/` (one control image per record; paired by file
  name with `target_images/` when names are shared, else in order). A folder with `prompts.txt`
  alone is a prompt set (GRPO). `eval_prompts.txt` + `eval_target_images/` (+
  `eval_source_images/`) form the evaluation split.
- control_folder (seed 003): `training_images/NAME.png` (target) + `training_images/NAME.txt`
  (prompt) + `control_images/NAME.jpg`, paired by file stem. Several control images (Edit-Plus):
  `control_images/NAME_1.jpg`, `NAME_2.jpg`, ... in number order, numbered from 1 without gaps.
  A control file whose stem is exactly a target's stem always belongs to that target; so
  `NAME.jpg` together with `NAME_1.jpg` for the same target is ambiguous and reported (rename
  `NAME.jpg` to `NAME_1.jpg` and shift the others). Control images without a target are reported.
  `eval_training_images/` + `eval_control_images/` form the evaluation split.
- metadata_jsonl: a `.jsonl` file (one JSON object per line), a `.json` file (a list of them), or
  a folder with `metadata.jsonl` / `pairs.jsonl` / `prompts.jsonl`. One set of keys for every
  use, paths relative to the file: prompt `prompt` (or `text`, `caption`, `text_prompt`); target
  `image` (or `file_name`, `target_image`, `image_path`); `chosen` + `rejected`; controls
  `control_images` (a list, or one path) or `source_image`; BAGEL `conversations` (the seed-004
  conversation format, parsed by `glm_training.models.bagel.data`). Other keys go to
  `Record.metadata`.
- prompts_txt: a `.txt` file, one prompt per line (blank lines skipped).
- pickapic: Pick-a-Pic v2 parquet files (`caption`, `jpg_0`, `jpg_1`, `label_0`), a file or a
  folder of them; ties (label_0 = 0.5) dropped.

Text files are read as UTF-8 with an optional byte-order mark; anything else is one clear error
naming the file and the line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from glm_training.data.images import IMAGE_SUFFIXES
from glm_training.data.records import DataError, Record

Entry = tuple[Record, list[str]]  # a record and the problems found while reading it
MANIFEST_NAMES = ("metadata.jsonl", "pairs.jsonl", "prompts.jsonl")
PROMPT_KEYS = ("prompt", "text", "caption", "text_prompt")
TARGET_KEYS = ("image", "file_name", "target_image", "image_path")


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)


def read_text(path: Path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped (Windows editors write one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}). "
                        f"Save the file as UTF-8, e.g. `iconv -f cp1252 -t utf-8 {path.name} > fixed.txt` "
                        "(with the file's real encoding in place of cp1252).") from None


def read_prompt_lines(path: Path) -> list[str]:
    """One prompt per line, stripped; trailing blank lines are not empty prompts."""
    prompts = [line.strip() for line in read_text(path).splitlines()]
    while prompts and not prompts[-1]:
        prompts.pop()
    return prompts


def detect_format(path: Path, key: str = "data.path") -> str:
    """The layout of `path` (named by the config key `key`, for the messages)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return "metadata_jsonl"
        if suffix == ".txt":
            return "prompts_txt"
        if suffix == ".parquet":
            return "pickapic"
        raise DataError(f"{key} {path}: unknown file type {suffix!r}; use a .jsonl / .json manifest, a "
                        ".txt of prompts, Pick-a-Pic .parquet, or a dataset folder.")
    if any((path / name).is_file() for name in MANIFEST_NAMES):
        return "metadata_jsonl"
    if any(path.glob("*.parquet")):
        return "pickapic"
    if (path / "training_images").is_dir() or (path / "control_images").is_dir():
        return "control_folder"
    if (path / "prompts.txt").is_file() or (path / "target_images").is_dir():
        return "folder"
    raise DataError(f"{key} {path}: no known dataset layout found. Expected prompts.txt + "
                    "target_images/ [+ source_images/] or chosen/ + rejected/ (folder format), training_images/ "
                    "(NAME.png + NAME.txt) + control_images/ (control_folder format), a metadata.jsonl / "
                    "pairs.jsonl manifest, a prompts .txt, or Pick-a-Pic .parquet files.")


# ----------------------------------------------------------------------------------------------
# Seed 000 folder


def read_folder(root: Path, split: str, problems: list[str]) -> list[Entry]:
    prefix = "eval_" if split == "eval" else ""
    prompts_file = root / f"{prefix}prompts.txt"
    if split == "eval":
        if not prompts_file.is_file() and not (root / "eval_target_images").is_dir():
            return []  # no eval split in this folder
        if not prompts_file.is_file():
            prompts_file = root / "prompts.txt"  # eval images captioned by the training prompts
    if not prompts_file.is_file():
        problems.append(f"{prompts_file}: missing (one prompt per line)")
        return []
    prompts = read_prompt_lines(prompts_file)
    records = [Record(p, metadata={"source": f"{prompts_file}:{i + 1}"}) for i, p in enumerate(prompts)]
    for folder_name, attribute in (("target_images", "target"), ("chosen", "chosen"), ("rejected", "rejected")):
        folder = root / f"{prefix}{folder_name}"
        if not folder.is_dir():
            continue
        images = list_images(folder)
        if len(images) != len(prompts):
            problems.append(f"{prompts_file} has {len(prompts)} prompts but {folder} has {len(images)} images; "
                            "they pair in order, so the counts must match")
            continue
        for record, path in zip(records, images):
            setattr(record, attribute, path)
    if problems:
        return []
    entries: list[Entry] = [(r, []) for r in records]
    sources_dir = root / f"{prefix}source_images"
    if sources_dir.is_dir():
        _pair_sources(entries, list_images(sources_dir), sources_dir, root / f"{prefix}target_images", problems)
    elif split == "eval" and (root / "source_images").is_dir() and (root / "eval_target_images").is_dir():
        problems.append(f"{sources_dir}: missing; the training split has source_images/, so the eval "
                        "split needs its own source images")
        return []
    return entries


def _pair_sources(entries: list[Entry], sources: list[Path], sources_dir: Path, images_dir: Path,
                  problems: list[str]) -> None:
    """Source images pair with target_images/ by file stem when the names are shared (a target
    without a same-named source, or a source without a target, is reported by name); when no name
    is shared (or there are no targets), in sorted order, which needs equal counts."""
    by_stem = {p.stem: p for p in sources}
    targets = {r.target.stem for r, _ in entries if r.target is not None}
    if not targets & set(by_stem):
        if len(sources) != len(entries):
            problems.append(f"{sources_dir} has {len(sources)} images but there are {len(entries)} prompts; "
                            "with no file names shared with target_images/ they pair in sorted order, so the "
                            "counts must match")
            entries.clear()
            return
        for (record, _), source in zip(entries, sources):
            record.controls = [source]
        return
    for record, issues in entries:
        if record.target.stem in by_stem:
            record.controls = [by_stem[record.target.stem]]
        else:
            issues.append(f"{record.target}: no source image {sources_dir.name}/{record.target.stem}.* "
                          "(source and target images pair by file name)")
    problems += [f"{p}: source image without a target image in {images_dir.name}/" for p in sources
                 if p.stem not in targets]


# ----------------------------------------------------------------------------------------------
# Seed 003 control folder

_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def read_control_folder(root: Path, split: str, problems: list[str]) -> list[Entry]:
    prefix = "eval_" if split == "eval" else ""
    train_dir, control_dir = root / f"{prefix}training_images", root / f"{prefix}control_images"
    if split == "eval" and not train_dir.is_dir():
        return []  # no eval split in this folder
    if not train_dir.is_dir():
        problems.append(f"{train_dir}: missing folder of target images (NAME.png + NAME.txt caption)")
    if not control_dir.is_dir():
        problems.append(f"{control_dir}: missing folder of control images (NAME.jpg, or NAME_1.jpg, "
                        "NAME_2.jpg, ... for several)")
    if problems:
        return []
    targets: dict[str, list[Path]] = {}
    for path in list_images(train_dir):
        targets.setdefault(path.stem, []).append(path)
    exact: dict[str, list[Path]] = {}
    numbered: dict[str, dict[int, list[Path]]] = {}
    for path in list_images(control_dir):
        match = _NUMBERED.match(path.stem)
        if path.stem in targets:  # an exact name always belongs to that target
            exact.setdefault(path.stem, []).append(path)
        elif match and match.group(1) in targets:
            numbered.setdefault(match.group(1), {}).setdefault(int(match.group(2)), []).append(path)
        else:
            problems.append(f"{path}: control image without a target ({train_dir.name}/{path.stem}.png "
                            "not found)")
    entries: list[Entry] = []
    for stem in sorted(targets, key=lambda name: natural_key(Path(name))):
        target, issues = targets[stem][0], []
        if len(targets[stem]) > 1:
            issues.append(f"{target}: several target images named {stem}: "
                          f"{', '.join(p.name for p in targets[stem])}; keep one")
        caption = target.with_suffix(".txt")
        prompt = ""
        if caption.is_file():
            try:
                prompt = read_text(caption).strip()
            except DataError as error:
                issues.append(f"{error} (caption of {target.name})")
        else:
            issues.append(f"{caption}: missing caption of {target.name}")
        own, extra = exact.get(stem, []), numbered.get(stem, {})
        controls: list[Path] = []
        if own and extra:
            issues.append(f"{target}: ambiguous control images: {control_dir.name}/{own[0].name} and "
                          f"{', '.join(p.name for n in sorted(extra) for p in extra[n])}; use either "
                          f"{stem}.<ext> alone or {stem}_1.<ext>, {stem}_2.<ext>, ...")
        elif own:
            controls = own
            if len(own) > 1:
                issues.append(f"{target}: several control images named {stem}: "
                              f"{', '.join(p.name for p in own)}; keep one")
        elif extra:
            numbers = sorted(extra)
            controls = [extra[n][0] for n in numbers]
            if numbers != list(range(1, len(numbers) + 1)):
                issues.append(f"{target}: control images numbered {numbers}; number them 1..{len(numbers)} "
                              "without gaps")
            for n in numbers:
                if len(extra[n]) > 1:
                    issues.append(f"{target}: several control images numbered {n}: "
                                  f"{', '.join(p.name for p in extra[n])}; keep one")
        else:
            issues.append(f"{target}: no control image ({control_dir.name}/{stem}.jpg, or {stem}_1.jpg, "
                          f"{stem}_2.jpg, ...)")
        entries.append((Record(prompt, target=target, controls=controls, metadata={"source": str(caption)}),
                        issues))
    if not entries:
        problems.append(f"{train_dir}: no target images")
    return entries


# ----------------------------------------------------------------------------------------------
# JSON manifests (metadata.jsonl, pairs.jsonl, prompts .jsonl, BAGEL .json / .jsonl)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def iter_json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, element) of a top-level JSON array, keeping each element's line."""
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if index >= len(text) or text[index] != "[":
        raise DataError(f"{path}:1: a .json data file must hold a list of records.")
    index = _skip_space(text, index + 1)
    if index < len(text) and text[index] == "]":
        return
    while True:
        line = text.count("\n", 0, index) + 1
        try:
            element, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}).") from None
        yield line, element
        index = _skip_space(text, index)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)
            continue
        if index < len(text) and text[index] == "]":
            return
        raise DataError(f"{path}:{text.count(chr(10), 0, index) + 1}: expected ',' or ']' between records.")


def iter_manifest_rows(path: Path, problems: list[str]) -> Iterator[tuple[int, Any]]:
    """(line, row) of a .jsonl file (lines that are not JSON go to `problems`) or a .json list."""
    text = read_text(path)
    if path.suffix.lower() == ".json":
        yield from iter_json_array(text, path)
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{number}: not valid JSON ({error.msg})")


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in row:
            return key, row[key]
    return None, None


def _path(value: Any, key: str, where: str, root: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a path (a non-empty string), got {value!r}")
    return root / value


def _conversation_record(row: dict[str, Any], where: str, root: Path) -> Record:
    """A BAGEL conversation row: its sequence plan in metadata["conversation"]; prompt, target and
    controls from its turns (first user text, last assistant image, user images)."""
    from glm_training.models.bagel.data import BagelDataError, parse_record

    try:
        plan = parse_record(row, where, root)
    except BagelDataError as error:
        raise DataError(str(error)) from None
    turns = [t for t in row["conversations"] if isinstance(t, dict)]
    texts = [t["content"] for t in turns if t.get("role") == "user" and t.get("type") == "text"]
    outputs = [root / t["image_path"] for t in turns if t.get("role") == "assistant" and t.get("type") == "image"]
    inputs = [root / t["image_path"] for t in turns if t.get("role") == "user" and t.get("type") == "image"]
    extra = {k: v for k, v in row.items() if k != "conversations"}
    return Record(texts[0].strip() if texts else "", target=outputs[-1] if outputs else None, controls=inputs,
                  metadata={**extra, "source": where, "conversation": plan})


def parse_manifest_row(row: Any, where: str, root: Path) -> Record:
    """One manifest row -> a Record (key spellings in the module docstring); DataError if malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "conversations" in row:
        return _conversation_record(row, where, root)
    prompt_key, prompt = _first(row, PROMPT_KEYS)
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{where}: '{prompt_key}' must be a string, got {type(prompt).__name__}")
    target_key, target = _first(row, TARGET_KEYS)
    controls = row.get("control_images")
    if controls is None and row.get("source_image") is not None:
        controls = [row["source_image"]]
    if isinstance(controls, str):  # one path given without a list
        controls = [controls]
    if controls is not None and (not isinstance(controls, list)
                                 or not all(isinstance(c, str) and c.strip() for c in controls)):
        raise DataError(f"{where}: 'control_images' must be a list of paths, got {row.get('control_images')!r}")
    known = {prompt_key, target_key, "chosen", "rejected", "control_images", "source_image"}
    if prompt is None and target is None and "chosen" not in row:
        raise DataError(f"{where}: needs a prompt ('prompt' or 'text') and, as the training needs, image paths "
                        f"('image', 'chosen' + 'rejected', 'control_images'); got keys {sorted(row)}")
    return Record(
        (prompt or "").strip(),
        target=_path(target, target_key, where, root) if target is not None else None,
        chosen=_path(row["chosen"], "chosen", where, root) if row.get("chosen") is not None else None,
        rejected=_path(row["rejected"], "rejected", where, root) if row.get("rejected") is not None else None,
        controls=[root / c for c in controls or []],
        metadata={**{k: v for k, v in row.items() if k not in known}, "source": where})


def read_manifest(path: Path, split: str, problems: list[str]) -> list[Entry]:
    if split == "eval":
        return []  # manifests have no eval split of their own: data.eval_path or data.eval_fraction
    manifest = path if path.is_file() else next(path / n for n in MANIFEST_NAMES if (path / n).is_file())
    entries: list[Entry] = []
    for line, row in iter_manifest_rows(manifest, problems):
        try:
            entries.append((parse_manifest_row(row, f"{manifest}:{line}", manifest.parent), []))
        except DataError as error:
            problems.append(str(error))
    if not entries and not problems:
        problems.append(f"{manifest}: no records")
    return entries


# ----------------------------------------------------------------------------------------------
# Prompts .txt


def read_prompts_txt(path: Path, split: str, problems: list[str]) -> list[Entry]:
    if split == "eval":
        return []
    entries = [(Record(line.strip(), metadata={"source": f"{path}:{number}"}), [])
               for number, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]
    if not entries:
        problems.append(f"{path}: no prompts")
    return entries


# ----------------------------------------------------------------------------------------------
# Pick-a-Pic parquet


def read_pickapic(path: Path, split: str, problems: list[str]) -> list[Entry]:
    """Pick-a-Pic v2 rows read with `datasets`; ties dropped. Image bytes are written once to
    `.pickapic_images/` next to the files, named by their sha256, so the cache and the checks
    treat them like any other file."""
    if split == "eval":
        return []
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("Pick-a-Pic parquet files need the datasets package (pip install datasets).") from None
    table = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(table.column_names)
    if missing:
        raise DataError(f"data.path {path}: parquet files lack the Pick-a-Pic columns {sorted(missing)}.")
    image_dir = files[0].parent / ".pickapic_images"
    image_dir.mkdir(parents=True, exist_ok=True)

    def stored(data: bytes) -> Path:
        target = image_dir / f"{hashlib.sha256(data).hexdigest()}.jpg"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return target

    entries: list[Entry] = []
    for number, row in enumerate(table):
        if row["label_0"] == 0.5:
            continue  # a tie says nothing about preference
        first, second = stored(row["jpg_0"]), stored(row["jpg_1"])
        chosen, rejected = (first, second) if row["label_0"] == 1 else (second, first)
        entries.append((Record(str(row["caption"]).strip(), chosen=chosen, rejected=rejected,
                               metadata={"source": f"{path} row {number}"}), []))
    return entries


READERS: dict[str, Callable[[Path, str, list[str]], list[Entry]]] = {
    "folder": read_folder, "control_folder": read_control_folder, "metadata_jsonl": read_manifest,
    "prompts_txt": read_prompts_txt, "pickapic": read_pickapic}
