"""Dataset formats, up-front validation, the image pipeline (resize, crop, flip) and buckets.

Formats (`data.format`, detected when `auto`):
- folder (seed 000): `prompts.txt`, one prompt per line, and `target_images/` whose files, in
  natural sort order, pair with the lines in order. Image-to-image: `source_images/` pairs the
  same way (one control image per sample). `eval_prompts.txt` + `eval_target_images/`
  (+ `eval_source_images/`) form the optional evaluation split.
- control_folder (seed 003): `training_images/NAME.png` (target) + `training_images/NAME.txt`
  (prompt) + `control_images/NAME.jpg`, paired by file stem. Several control images (Edit-Plus):
  `control_images/NAME_1.jpg`, `NAME_2.jpg`, ... in number order, numbered from 1 without gaps.
  A control file whose stem is exactly a target's stem always belongs to that target; so
  `NAME.jpg` together with `NAME_1.jpg` for the same target is ambiguous and reported (rename
  `NAME.jpg` to `NAME_1.jpg` and shift the others). Control images without a target are reported.
- metadata_jsonl: a folder with `metadata.jsonl`, one `{"file_name": ..., "text": ...}` per line
  (the Hugging Face image-folder convention), or the path of such a `.jsonl` file; also
  `{"prompt", "image", "control_images": [...]}` lines (paths relative to the file).

Every file is checked before training starts; all problems are reported together.

Aspect-ratio buckets (`data.buckets`): `make_buckets` lists (height, width) sizes of about
resolution^2 pixels with sides multiples of the family's `resolution_multiple`; each image goes
to the bucket nearest its aspect ratio (resized to cover, then cropped), its control images to
the same size, and `BucketBatchSampler` builds batches from one bucket at a time.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
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
    #: Pairing problems found while reading the layout (reported with the file checks).
    issues: list[str] = field(default_factory=list, repr=False, compare=False)


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".jsonl":
        return "metadata_jsonl"
    if (path / "metadata.jsonl").is_file():
        return "metadata_jsonl"
    if (path / "training_images").is_dir() or (path / "control_images").is_dir():
        return "control_folder"
    if (path / "prompts.txt").is_file() or (path / "target_images").is_dir():
        return "folder"
    raise DataError(f"data.path {path}: no known dataset layout found. Expected prompts.txt + "
                    "target_images/ [+ source_images/] (folder format), training_images/ (NAME.png + "
                    "NAME.txt) + control_images/ (control_folder format), or metadata.jsonl with "
                    "file_name/text (or image/prompt/control_images) lines.")


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
    samples = [Sample(prompt=p, image=i) for p, i in zip(prompts, images)]
    sources_dir = root / f"{prefix}source_images"
    if sources_dir.is_dir():
        _pair_sources(samples, list_images(sources_dir), sources_dir, images_dir, problems)
    elif split == "eval" and (root / "source_images").is_dir() and (root / "eval_target_images").is_dir():
        problems.append(f"{sources_dir}: missing; the training split has source_images/, so the eval "
                        "split needs its own source images")
        return []
    return samples


def _pair_sources(samples: list[Sample], sources: list[Path], sources_dir: Path, images_dir: Path,
                  problems: list[str]) -> None:
    """Seed-000 image-to-image: source_images/ pairs with target_images/ by file stem when the
    names are shared (a target without a same-named source, or a source without a target, is
    reported by name); when no name is shared, in sorted order, which needs equal counts."""
    by_stem = {p.stem: p for p in sources}
    targets = {s.image.stem for s in samples}
    if not targets & set(by_stem):
        if len(sources) != len(samples):
            problems.append(f"{sources_dir} has {len(sources)} images but {images_dir} has {len(samples)}; "
                            "with no shared file names they pair in sorted order, so the counts must match")
            samples.clear()
            return
        for sample, source in zip(samples, sources):
            sample.control_images = [source]
        return
    for sample in samples:
        if sample.image.stem in by_stem:
            sample.control_images = [by_stem[sample.image.stem]]
        else:
            sample.issues.append(f"{sample.image}: no source image {sources_dir.name}/{sample.image.stem}.* "
                                 "(source and target images pair by file name)")
    problems += [f"{p}: source image without a target image in {images_dir.name}/" for p in sources
                 if p.stem not in targets]


_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def _read_control_folder(root: Path, split: str, problems: list[str]) -> list[Sample]:
    """Seed-003 layout: training_images/NAME.png + NAME.txt, control_images/NAME.jpg or NAME_1.jpg,
    NAME_2.jpg, ... (rules in the module docstring)."""
    prefix = "eval_" if split == "eval" else ""
    train_dir, control_dir = root / f"{prefix}training_images", root / f"{prefix}control_images"
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
    samples = []
    for stem in sorted(targets, key=lambda name: natural_key(Path(name))):
        target, issues = targets[stem][0], []
        if len(targets[stem]) > 1:
            issues.append(f"{target}: several target images named {stem}: "
                          f"{', '.join(p.name for p in targets[stem])}; keep one")
        caption = target.with_suffix(".txt")
        prompt = ""
        if caption.is_file():
            prompt = caption.read_text(encoding="utf-8").strip()
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
        samples.append(Sample(prompt=prompt, image=target, control_images=controls, issues=issues))
    if not samples:
        problems.append(f"{train_dir}: no target images")
    return samples


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
        if not isinstance(row, dict):
            problems.append(f"{manifest}:{line_no}: expected a JSON object, got {type(row).__name__}")
            continue
        name = row.get("file_name") or row.get("image")
        text = row.get("text", row.get("prompt"))
        if not name or text is None:
            problems.append(f"{manifest}:{line_no}: needs 'file_name' and 'text' (or 'image' and 'prompt'); "
                            f"got keys {sorted(row)}")
            continue
        controls = row.get("control_images") or []
        if isinstance(controls, str):  # one path given without a list
            controls = [controls]
        if not isinstance(controls, list) or not all(isinstance(c, str) and c for c in controls):
            problems.append(f"{manifest}:{line_no}: 'control_images' must be a list of paths, got {controls!r}")
            continue
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


FORMATS = ("folder", "control_folder", "metadata_jsonl")


def load_samples(path: str | Path, fmt: str = "auto", split: str = "train",
                 on_error: str = "raise", require_prompt: bool = True, require_controls: bool = False,
                 same_control_count: bool = False) -> list[Sample]:
    """Read and validate a dataset; raise one DataError listing every bad file (or skip them).

    require_controls: every sample needs a control image (training.mode i2i).
    same_control_count: every sample needs the same number of control images (they batch
    together when training.batch_size > 1); the most common number wins, the others are listed.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data.path {root}: does not exist.")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    problems: list[str] = []
    reader = {"folder": _read_folder, "control_folder": _read_control_folder}.get(fmt)
    samples = reader(root, split, problems) if reader else _read_jsonl(root, problems)
    if problems and not samples:  # layout problems: nothing to skip to
        raise DataError(f"data.path {root}: the dataset is not usable:\n  - " + "\n  - ".join(problems))
    good = []
    for index, sample in enumerate(samples):
        issues = list(sample.issues)
        issues += [msg for msg in (check_image(p) for p in [sample.image, *sample.control_images]) if msg]
        if require_prompt and not sample.prompt and not any("caption" in msg for msg in sample.issues):
            issues.append(f"{sample.image}: empty prompt (entry {index + 1})")
        if require_controls and not sample.control_images and not sample.issues:
            issues.append(f"{sample.image}: no control image; training.mode i2i needs at least one per sample")
        if issues:
            problems += issues
        else:
            good.append(sample)
    if same_control_count and good:
        counts = Counter(len(s.control_images) for s in good)
        common = max(counts, key=lambda n: (counts[n], n))
        for sample in [s for s in good if len(s.control_images) != common]:
            names = ", ".join(p.name for p in sample.control_images) or "none"
            problems.append(f"{sample.image}: {len(sample.control_images)} control image(s) ({names}) but "
                            f"{counts[common]} samples have {common}; samples of one batch need the same "
                            "number: add or remove control images, or set training.batch_size: 1")
            good.remove(sample)
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


def resize_and_crop(image: Image.Image, resolution: int | tuple[int, int], center_crop: bool = True,
                    generator: torch.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `resolution` (a square side, or (height, width)) and crop it; return the
    crop's (top, left). A square size gives the same result as before buckets existed."""
    height_out, width_out = (resolution, resolution) if isinstance(resolution, int) else resolution
    width, height = image.size
    scale = max(width_out / width, height_out / height)
    new_w, new_h = max(width_out, round(width * scale)), max(height_out, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (new_h - height_out) // 2, (new_w - width_out) // 2
    else:
        top = int(torch.randint(0, new_h - height_out + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - width_out + 1, (1,), generator=generator))
    return image.crop((left, top, left + width_out, top + height_out)), (top, left)


# ----------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def make_buckets(resolution: int, multiple: int, aspect_range: tuple[float, float] = (0.5, 2.0),
                 step: int | None = None) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution^2 pixels, sides multiples of `multiple` (and of
    `step`, default: the smallest multiple of `multiple` >= resolution/16, so a 1024 px run gets
    64 px steps rather than hundreds of near-identical buckets), width/height within
    `aspect_range`; sorted by aspect ratio. Always includes the square when it is a multiple."""
    low, high = aspect_range
    if not 0 < low <= 1 <= high:
        raise DataError(f"data.bucket_aspect_range: {list(aspect_range)} must be [low, high] with "
                        "0 < low <= 1 <= high (width / height), e.g. [0.5, 2.0].")
    if step is None:
        step = multiple * max(1, math.ceil(resolution / 16 / multiple))
    elif step % multiple:
        raise DataError(f"data.bucket_step: {step} must be a multiple of the family's resolution "
                        f"multiple ({multiple}).")
    area = resolution * resolution
    buckets = set()
    # Each short side once, with the long side that brings the area nearest resolution^2.
    for side in range(step, resolution + 1, step):
        other = max(side, round(area / side / step) * step)
        for height, width in ((side, other), (other, side)):
            if low <= width / height <= high:
                buckets.add((height, width))
    if resolution % multiple == 0:
        buckets.add((resolution, resolution))
    if not buckets:
        raise DataError(f"data.buckets: no bucket fits resolution {resolution} with steps of {step} px "
                        f"and aspect ratios {list(aspect_range)}; raise data.resolution or widen "
                        "data.bucket_aspect_range.")
    return sorted(buckets, key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to the image's (width, height)."""
    width, height = size
    aspect = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - aspect),
                                                   -buckets[i][0] * buckets[i][1]))


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
                 random_flip: bool = False, seed: int = 0,
                 buckets: list[tuple[int, int]] | None = None):
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        # With buckets: the (height, width) list and each sample's bucket index (from the target's
        # size, read from the file header; control images follow their target).
        self.buckets = buckets
        self.bucket_ids: list[int] | None = None
        if buckets:
            self.bucket_ids = []
            for sample in samples:
                with Image.open(sample.image) as image:
                    self.bucket_ids.append(nearest_bucket(image.size, buckets))

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index` after resizing and cropping."""
        if self.bucket_ids is None:
            return (self.resolution, self.resolution)
        return self.buckets[self.bucket_ids[index]]

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
        size = self.resolution if self.bucket_ids is None else self.size_of(index)
        image, crop = resize_and_crop(image, size, self.center_crop, generator)
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
            "target_size": torch.tensor(self.size_of(index)),
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


class BucketBatchSampler(torch.utils.data.Sampler):
    """ShardedBatchSampler's contract (global batches, rank r takes its slice, `set_epoch(epoch,
    start_batch)`, order from (seed, epoch) only) with batches drawn from one bucket each.

    Per epoch: the seeded permutation is split by bucket (keeping its order), each bucket is cut
    into global batches (its ragged end dropped, so every rank's slice has the same shape), and
    the list of global batches is shuffled with the same (seed, epoch). The number of batches
    per epoch therefore never changes, which the trainer's resume arithmetic relies on.
    """

    def __init__(self, bucket_ids: list[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        self.bucket_ids = list(bucket_ids)
        self.num_samples, self.batch_size = len(self.bucket_ids), batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        counts = Counter(self.bucket_ids)
        self.batches_per_epoch = sum(n // self.global_batch_size for n in counts.values())
        if self.batches_per_epoch == 0:
            raise DataError(f"data.buckets: no bucket holds one global batch ({batch_size} per device x "
                            f"{num_replicas} processes); bucket sizes {dict(sorted(counts.items()))}. "
                            "Lower training.batch_size, narrow data.bucket_aspect_range, or add data.")
        starved = {b: n for b, n in counts.items() if n < self.global_batch_size}
        if starved:
            logger.warning("data.buckets: %d sample(s) are in buckets smaller than one global batch (%d) "
                           "and are never trained: %s (bucket index: samples).", sum(starved.values()),
                           self.global_batch_size, starved)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> list[list[int]]:
        """Every global batch of this epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        by_bucket: dict[int, list[int]] = {}
        for index in order:
            by_bucket.setdefault(self.bucket_ids[index], []).append(index)
        size = self.global_batch_size
        batches = [members[start:start + size] for _, members in sorted(by_bucket.items())
                   for start in range(0, len(members) - size + 1, size)]
        if self.shuffle:  # interleave buckets; the same generator continues, still (seed, epoch) only
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.start_batch:]:
            yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


def same_size_chunks(dataset: Any, indices: list[int], batch_size: int) -> list[list[int]]:
    """`indices` cut into batches of at most `batch_size` whose items share one size (for passes
    over every sample, like filling the cache, where a bucket's ragged end must not be dropped)."""
    size_of = getattr(dataset, "size_of", None)
    groups: dict[Any, list[int]] = {}
    for index in indices:
        groups.setdefault(size_of(index) if size_of else None, []).append(index)
    return [members[start:start + batch_size] for members in groups.values()
            for start in range(0, len(members), batch_size)]


def make_batch_sampler(dataset: Any, batch_size: int, num_replicas: int = 1, rank: int = 0,
                       seed: int = 0, shuffle: bool = True) -> torch.utils.data.Sampler:
    """The trainer's batch sampler: by bucket when the dataset has buckets, else ShardedBatchSampler."""
    bucket_ids = getattr(dataset, "bucket_ids", None)
    if bucket_ids is not None:
        return BucketBatchSampler(bucket_ids, batch_size, num_replicas, rank, seed, shuffle)
    return ShardedBatchSampler(len(dataset), batch_size, num_replicas, rank, seed, shuffle)


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
    if not root.exists():
        raise DataError(f"data.path {root}: does not exist (preference pairs: a pairs.jsonl, a folder with "
                        "prompts.txt + chosen/ + rejected/, or Pick-a-Pic parquet files).")
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
    "source_image"? or "control_images"?}`, paths relative to the file; "image" is read as the target
    so SFT manifests work too), or a folder with `prompts.txt` and optional
    `target_images/` and `source_images/` (paired in order). `Sample.image` is the target or None."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data.path {root}: does not exist (prompts: a .txt, a .jsonl, or a folder with prompts.txt).")
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
                target = row.get("target_image") or row.get("image")
                controls = row.get("control_images") or ([row["source_image"]] if row.get("source_image") else [])
                if isinstance(controls, str):
                    controls = [controls]
                samples.append(Sample(str(row["prompt"]).strip(), root.parent / target if target else None,
                                      [root.parent / c for c in controls]))
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
