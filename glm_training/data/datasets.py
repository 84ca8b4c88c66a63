"""Dataset formats, up-front validation, and the image pipeline (resize, crop, flip).

Formats (`data.format`, detected when `auto`):
- folder (seed 000): `prompts.txt`, one prompt per line, and `target_images/` whose files, in
  natural sort order, pair with the lines in order. `eval_prompts.txt` + `eval_target_images/`
  form the optional evaluation split.
- metadata_jsonl: a folder with `metadata.jsonl`, one `{"file_name": ..., "text": ...}` per line
  (the Hugging Face image-folder convention), or the path of such a `.jsonl` file.

Every file is checked before training starts; all problems are reported together.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DataError(ValueError):
    """Bad training data; the message lists every bad file and what to do."""


@dataclass
class Sample:
    prompt: str
    image: Path
    control_images: list[Path] = field(default_factory=list)


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".jsonl":
        return "metadata_jsonl"
    if (path / "metadata.jsonl").is_file():
        return "metadata_jsonl"
    if (path / "prompts.txt").is_file() or (path / "target_images").is_dir():
        return "folder"
    raise DataError(f"data.path {path}: no known dataset layout found. Expected prompts.txt + "
                    "target_images/ (folder format) or metadata.jsonl with file_name/text lines.")


def read_prompt_lines(path: Path) -> list[str]:
    """One prompt per line, stripped; trailing blank lines are not empty prompts."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while prompts and not prompts[-1]:
        prompts.pop()
    return prompts


def _read_folder(root: Path, split: str, problems: list[str]) -> list[Sample]:
    prefix = "eval_" if split == "eval" else ""
    prompts_file, images_dir = root / f"{prefix}prompts.txt", root / f"{prefix}target_images"
    if split == "eval" and not prompts_file.exists():
        prompts_file = root / "prompts.txt"
    if not prompts_file.is_file():
        problems.append(f"{prompts_file}: missing (one prompt per line)")
    if not images_dir.is_dir():
        problems.append(f"{images_dir}: missing folder of target images")
    if problems:
        return []
    prompts = read_prompt_lines(prompts_file)
    images = list_images(images_dir)
    if len(prompts) != len(images):
        problems.append(f"{prompts_file} has {len(prompts)} prompts but {images_dir} has "
                        f"{len(images)} images; they pair in order, so the counts must match")
        return []
    return [Sample(prompt=p, image=i) for p, i in zip(prompts, images)]


def _read_jsonl(path: Path, problems: list[str]) -> list[Sample]:
    manifest = path if path.is_file() else path / "metadata.jsonl"
    root = manifest.parent
    samples = []
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{manifest}:{line_no}: not valid JSON ({error.msg})")
            continue
        name = row.get("file_name") or row.get("image")
        text = row.get("text", row.get("prompt"))
        if not name or text is None:
            problems.append(f"{manifest}:{line_no}: needs 'file_name' and 'text' (got keys {sorted(row)})")
            continue
        controls = row.get("control_images") or []
        samples.append(Sample(prompt=str(text).strip(), image=root / name,
                              control_images=[root / c for c in controls]))
    return samples


def check_image(path: Path) -> str | None:
    if not path.is_file():
        return f"{path}: file not found"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        return f"{path}: not a readable image ({error})"
    return None


def load_samples(path: str | Path, fmt: str = "auto", split: str = "train",
                 on_error: str = "raise", require_prompt: bool = True) -> list[Sample]:
    """Read and validate a dataset; raise one DataError listing every bad file (or skip them)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data.path {root}: does not exist.")
    fmt = detect_format(root) if fmt == "auto" else fmt
    problems: list[str] = []
    samples = _read_folder(root, split, problems) if fmt == "folder" else _read_jsonl(root, problems)
    if problems and not samples:  # layout problems: nothing to skip to
        raise DataError(f"data.path {root}: the dataset is not usable:\n  - " + "\n  - ".join(problems))
    good = []
    for index, sample in enumerate(samples):
        issues = [msg for msg in (check_image(p) for p in [sample.image, *sample.control_images]) if msg]
        if require_prompt and not sample.prompt:
            issues.append(f"{sample.image}: empty prompt (entry {index + 1})")
        if issues:
            problems += issues
        else:
            good.append(sample)
    if problems:
        listing = "\n  - ".join(problems)
        if on_error == "skip":
            logger.warning("Skipping bad samples of %s:\n  - %s", root, listing)
        else:
            raise DataError(f"data.path {root}: {len(problems)} problem(s) found before training:\n  - "
                            f"{listing}\nFix or remove these files, or set data.on_error: skip.")
    if not good:
        raise DataError(f"data.path {root}: no usable samples.")
    return good


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True,
                    generator: torch.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to `resolution`, crop a square; return the crop's (top, left)."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    array = array.reshape(image.height, image.width, 3).permute(2, 0, 1)
    return array.float() / 127.5 - 1.0


def sample_generator(seed: int, epoch: int, index: int, salt: int = 0) -> torch.Generator:
    """Randomness of one sample in one epoch, independent of batch size, rank and resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + index * 31 + salt) % (2**63))


class ImageDataset(torch.utils.data.Dataset):
    """Target image (and control images) of each sample, ready for the VAE."""

    def __init__(self, samples: list[Sample], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0):
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def flip_for(self, index: int) -> bool:
        if not self.random_flip:
            return False
        return bool(torch.rand(1, generator=sample_generator(self.seed, self.epoch, index, salt=1)) < 0.5)

    def load(self, path: Path, index: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
        original = (image.height, image.width)
        generator = sample_generator(self.seed, self.epoch, index, salt=2)
        image, crop = resize_and_crop(image, self.resolution, self.center_crop, generator)
        tensor = to_tensor(image)
        if self.flip_for(index):
            tensor = tensor.flip(-1)
        return tensor, original, crop

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        pixels, original, crop = self.load(sample.image, index)
        item = {
            "index": index,
            "prompt": sample.prompt,
            "pixel_values": pixels,
            "original_size": torch.tensor(original),
            "crop_top_left": torch.tensor(crop),
            "target_size": torch.tensor([self.resolution, self.resolution]),
            "flip": self.flip_for(index),
        }
        if sample.control_images:
            item["control_pixel_values"] = [self.load(p, index)[0] for p in sample.control_images]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif key == "control_pixel_values":
            batch[key] = [torch.stack(group) for group in zip(*values)]
        else:
            batch[key] = values
    return batch


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Global batches from a seeded per-epoch permutation; rank r takes its slice of each.

    The order depends only on (seed, epoch), so a run on N processes sees the same global
    batches as a run on one, and a resumed run can start at any batch (`start_batch`).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        if self.global_batch_size > num_samples:
            raise DataError(f"The dataset has {num_samples} samples, fewer than one global batch "
                            f"({batch_size} per device x {num_replicas} processes). Lower "
                            "training.batch_size or add data.")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples // self.global_batch_size - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
                self.seed * 7919 + self.epoch)).tolist()
        else:
            order = list(range(self.num_samples))
        full = self.num_samples // self.global_batch_size  # drop the ragged end: ranks stay in step
        for b in range(self.start_batch, full):
            start = b * self.global_batch_size + self.rank * self.batch_size
            yield order[start:start + self.batch_size]


@dataclass
class PreferencePair:
    prompt: str
    chosen: Path
    rejected: Path
    control_images: list[Path] = field(default_factory=list)


def load_pickapic_parquet(files: list[Path], image_dir: Path) -> list[PreferencePair]:
    """Pick-a-Pic v2 layout (`caption`, `jpg_0`, `jpg_1`, `label_0`) read with `datasets`; ties
    (label_0 = 0.5) dropped. Image bytes are written once to `image_dir`, named by their sha256,
    so the cache and the validation treat them like any other file."""
    import hashlib

    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("Pick-a-Pic parquet files need the datasets package (pip install datasets).") from None
    table = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(table.column_names)
    if missing:
        raise DataError(f"data.path {files[0].parent}: parquet files lack the Pick-a-Pic columns {sorted(missing)}.")
    image_dir.mkdir(parents=True, exist_ok=True)

    def stored(data: bytes) -> Path:
        target = image_dir / f"{hashlib.sha256(data).hexdigest()}.jpg"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return target

    pairs = []
    for row in table:
        if row["label_0"] == 0.5:
            continue  # a tie says nothing about preference
        first, second = stored(row["jpg_0"]), stored(row["jpg_1"])
        chosen, rejected = (first, second) if row["label_0"] == 1 else (second, first)
        pairs.append(PreferencePair(str(row["caption"]).strip(), chosen, rejected))
    return pairs


def load_preference_pairs(path: str | Path, on_error: str = "raise") -> list[PreferencePair]:
    """Preference pairs from a JSONL file (`{"prompt", "chosen", "rejected", "control_images"?}`,
    paths relative to the file), a folder with `prompts.txt` + `chosen/` + `rejected/`, or a
    Pick-a-Pic v2 parquet file / folder of them."""
    root = Path(path)
    problems: list[str] = []
    pairs: list[PreferencePair] = []
    parquet = [root] if root.suffix == ".parquet" else sorted(root.glob("*.parquet")) if root.is_dir() else []
    if parquet:
        pairs = load_pickapic_parquet(parquet, parquet[0].parent / ".pickapic_images")
    elif root.is_file() or (root / "pairs.jsonl").is_file():
        manifest = root if root.is_file() else root / "pairs.jsonl"
        for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append(PreferencePair(
                    str(row["prompt"]).strip(), manifest.parent / row["chosen"], manifest.parent / row["rejected"],
                    [manifest.parent / c for c in row.get("control_images") or []]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                problems.append(f"{manifest}:{line_no}: needs JSON with prompt, chosen, rejected ({error!r})")
    elif (root / "prompts.txt").is_file():
        prompts = read_prompt_lines(root / "prompts.txt")
        chosen, rejected = list_images(root / "chosen"), list_images(root / "rejected")
        if not len(prompts) == len(chosen) == len(rejected):
            problems.append(f"{root}: {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} "
                            "rejected images; they pair in order, so the counts must match")
        else:
            pairs = [PreferencePair(p, c, r) for p, c, r in zip(prompts, chosen, rejected)]
    else:
        raise DataError(f"data.path {root}: expected a pairs .jsonl file (prompt, chosen, rejected) "
                        "or a folder with prompts.txt, chosen/ and rejected/.")
    good = []
    for pair in pairs:
        issues = [m for m in (check_image(p) for p in [pair.chosen, pair.rejected, *pair.control_images]) if m]
        if not pair.prompt:
            issues.append(f"{pair.chosen}: empty prompt")
        problems += issues
        if not issues:
            good.append(pair)
    if problems and (on_error != "skip" or not good):
        raise DataError(f"data.path {root}: {len(problems)} problem(s) found before training:\n  - "
                        + "\n  - ".join(problems) + "\nFix or remove these pairs, or set data.on_error: skip.")
    return good


class PreferenceDataset(torch.utils.data.Dataset):
    """Chosen and rejected images of each pair, with the same crop rules as ImageDataset."""

    def __init__(self, pairs: list[PreferencePair], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0):
        self.pairs = pairs
        self.images = ImageDataset([], resolution, center_crop, random_flip, seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        item: dict[str, Any] = {"index": index, "prompt": pair.prompt, "flip": self.images.flip_for(index)}
        for role, path in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            pixels, original, crop = self.images.load(path, index)
            item[f"{role}_pixel_values"] = pixels
            item[f"{role}_original_size"] = torch.tensor(original)
            item[f"{role}_crop_top_left"] = torch.tensor(crop)
        item["target_size"] = torch.tensor([self.images.resolution] * 2)
        if pair.control_images:
            item["control_pixel_values"] = [self.images.load(p, index)[0] for p in pair.control_images]
        return item


def load_prompts(path: str | Path) -> list[Sample]:
    """Prompts for online training (GRPO), optionally with target / source images per prompt:
    a `.txt` file (one prompt per line), a `.jsonl` file (`{"prompt", "target_image"?,
    "source_image"?}`, paths relative to the file), or a folder with `prompts.txt` and optional
    `target_images/` and `source_images/` (paired in order). `Sample.image` is the target or None."""
    root = Path(path)
    problems: list[str] = []
    samples: list[Sample] = []
    if root.suffix == ".txt" and root.is_file():
        samples = [Sample(p.strip(), None) for p in root.read_text(encoding="utf-8").splitlines() if p.strip()]
    elif root.suffix == ".jsonl" and root.is_file():
        for line_no, line in enumerate(root.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                target = row.get("target_image")
                source = row.get("source_image")
                samples.append(Sample(str(row["prompt"]).strip(), root.parent / target if target else None,
                                      [root.parent / source] if source else []))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                problems.append(f"{root}:{line_no}: needs JSON with a prompt ({error!r})")
    elif (root / "prompts.txt").is_file():
        prompts = read_prompt_lines(root / "prompts.txt")
        targets = list_images(root / "target_images") if (root / "target_images").is_dir() else None
        sources = list_images(root / "source_images") if (root / "source_images").is_dir() else None
        for name, images in (("target_images", targets), ("source_images", sources)):
            if images is not None and len(images) != len(prompts):
                problems.append(f"{root / name} has {len(images)} images for {len(prompts)} prompts")
        if not problems:
            samples = [Sample(p, targets[i] if targets else None, [sources[i]] if sources else [])
                       for i, p in enumerate(prompts)]
    else:
        raise DataError(f"data.path {root}: expected prompts .txt / .jsonl, or a folder with prompts.txt.")
    for sample in samples:
        paths = ([sample.image] if sample.image else []) + sample.control_images
        problems += [m for m in (check_image(p) for p in paths) if m]
        if not sample.prompt:
            problems.append(f"{root}: empty prompt")
    if problems:
        raise DataError(f"data.path {root}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    if not samples:
        raise DataError(f"data.path {root}: no prompts.")
    return samples


class PromptDataset(torch.utils.data.Dataset):
    """Prompts with their optional target / source images in [0, 1] at the training resolution."""

    def __init__(self, samples: list[Sample], resolution: int):
        self.samples = samples
        self.images = ImageDataset([], resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item: dict[str, Any] = {"index": index, "prompt": sample.prompt}
        if sample.image is not None:
            item["target_images"] = (self.images.load(sample.image, index)[0] + 1) / 2
        if sample.control_images:
            item["control_pixel_values"] = [self.images.load(p, index)[0] for p in sample.control_images]
        return item
