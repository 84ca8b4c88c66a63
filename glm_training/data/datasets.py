"""Torch datasets over `Record`s, the image pipeline (resize, crop, flip), buckets and samplers.

Reading data is `load_records` (records.py, with one reader per layout in readers.py); every image
is opened by `open_image` (images.py). Every pixel tensor these datasets emit is in [-1, 1].

Aspect-ratio buckets (`data.buckets`): `make_buckets` lists (height, width) sizes of about
resolution^2 pixels with sides multiples of the family's `resolution_multiple`; each image goes
to the bucket nearest its aspect ratio (resized to cover, then cropped), its control images to
the same size, and `BucketBatchSampler` builds batches from one bucket at a time.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from glm_training.data.images import IMAGE_SUFFIXES, check_image, image_size, open_image  # noqa: F401
from glm_training.data.readers import detect_format, list_images, natural_key, read_prompt_lines  # noqa: F401
from glm_training.data.records import FIELDS, DataError, Record, load_records  # noqa: F401

logger = logging.getLogger(__name__)


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

    def __init__(self, samples: list[Record], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0,
                 buckets: list[tuple[int, int]] | None = None):
        without = [s.where for s in samples if s.target is None]
        if without:
            raise DataError(f"{len(without)} record(s) have no target image (e.g. {without[0]}); SFT loads "
                            "records with load_records(data, needs={'prompt', 'target'}).")
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
                self.bucket_ids.append(nearest_bucket(image_size(sample.target), buckets))

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
        image = open_image(path)
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
        pixels, original, crop = self.load(sample.target, index)
        item = {
            "index": index,
            "prompt": sample.prompt,
            "pixel_values": pixels,
            "original_size": torch.tensor(original),
            "crop_top_left": torch.tensor(crop),
            "target_size": torch.tensor(self.size_of(index)),
            "flip": self.flip_for(index),
        }
        if sample.controls:
            item["control_pixel_values"] = [self.load(p, index)[0] for p in sample.controls]
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


class PreferenceDataset(torch.utils.data.Dataset):
    """Chosen and rejected images of each pair, with the same crop rules as ImageDataset."""

    def __init__(self, pairs: list[Record], resolution: int, center_crop: bool = True,
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
        if pair.controls:
            item["control_pixel_values"] = [self.images.load(p, index)[0] for p in pair.controls]
        return item


class PromptDataset(torch.utils.data.Dataset):
    """Prompts with their optional target / source images in [-1, 1] at the training resolution."""

    def __init__(self, samples: list[Record], resolution: int):
        self.samples = samples
        self.images = ImageDataset([], resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item: dict[str, Any] = {"index": index, "prompt": sample.prompt}
        if sample.target is not None:
            item["target_pixel_values"] = self.images.load(sample.target, index)[0]
        if sample.controls:
            item["control_pixel_values"] = [self.images.load(p, index)[0] for p in sample.controls]
        return item
