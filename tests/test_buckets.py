"""Aspect-ratio buckets: bucket sizes, nearest-bucket assignment, one shape per batch, sharding
over ranks, exact resume, cache keys per bucket, and an SDXL SFT run on mixed-aspect images."""

import json
import math

import pytest
import torch
from PIL import Image

from glm_training.config import ConfigError, DataConfig, config_from_dict
from glm_training.data.cache import EmbeddingCache
from glm_training.data.datasets import (BucketBatchSampler, DataError, ImageDataset, ShardedBatchSampler,
                                        collate, load_records, make_batch_sampler, make_buckets,
                                        nearest_bucket, same_size_chunks)

from conftest import sdxl_config

# (width, height) of the source images: wide, tall, square, slightly wide
SIZES = [(64, 32), (32, 64), (48, 48), (50, 40)]


def mixed_aspect_data(root, per_size=4, sizes=SIZES, controls=False):
    """Folder format with images of several aspect ratios (controls: source_images/ of another aspect)."""
    (root / "target_images").mkdir(parents=True)
    prompts = []
    for i in range(per_size * len(sizes)):
        width, height = sizes[i % len(sizes)]
        colour = (40 * (i % 6), 255 - 30 * (i % 8), 128)
        Image.new("RGB", (width, height), colour).save(root / "target_images" / f"{i:03d}.png")
        if controls:
            (root / "source_images").mkdir(exist_ok=True)
            Image.new("RGB", (height + 8, width), "blue").save(root / "source_images" / f"{i:03d}.png")
        prompts.append(f"a flat colour {i}")
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return root


def test_buckets_have_the_area_multiples_and_aspect_range():
    for resolution, multiple in ((1024, 16), (1024, 8), (512, 32), (64, 8), (32, 8)):
        buckets = make_buckets(resolution, multiple, (0.5, 2.0))
        assert (resolution, resolution) in buckets
        for height, width in buckets:
            assert height % multiple == 0 and width % multiple == 0
            assert 0.5 <= width / height <= 2.0
            assert abs(height * width / resolution**2 - 1) < 0.25
        assert len(set(buckets)) == len(buckets) and (buckets[-1][1], buckets[-1][0]) == buckets[0]
    wide = make_buckets(1024, 16, (0.25, 4.0))
    assert max(w / h for h, w in wide) > 3 and all(0.25 <= w / h <= 4 for h, w in wide)
    assert make_buckets(1024, 16, (1.0, 1.0)) == [(1024, 1024)]
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in make_buckets(256, 8, step=32))
    with pytest.raises(DataError, match="data.bucket_aspect_range"):
        make_buckets(1024, 16, (2.0, 3.0))
    with pytest.raises(DataError, match=r"data.bucket_step: 20 must be a multiple of .*\(16\)"):
        make_buckets(1024, 16, step=20)


def test_each_image_lands_in_its_nearest_bucket_and_controls_follow(tmp_path):
    buckets = make_buckets(32, 8)
    assert buckets == [(40, 24), (32, 32), (24, 40)]
    for width, height in [(64, 32), (32, 64), (48, 48), (50, 40), (33, 40), (1000, 10)]:
        chosen = buckets[nearest_bucket((width, height), buckets)]
        distances = [abs(math.log(w / h) - math.log(width / height)) for h, w in buckets]
        assert abs(math.log(chosen[1] / chosen[0]) - math.log(width / height)) == min(distances)
    root = mixed_aspect_data(tmp_path / "d", per_size=1, controls=True)
    dataset = ImageDataset(load_records(DataConfig(path=root), {"prompt", "target"}), 32, buckets=buckets)
    expected = [(24, 40), (40, 24), (32, 32), (32, 32)]  # 64x32 wide, 32x64 tall, square, 50x40 ~ square
    for index, (height, width) in enumerate(expected):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, height, width)
        assert item["target_size"].tolist() == [height, width]
        assert item["original_size"].tolist() == [SIZES[index][1], SIZES[index][0]]
        # the control image has another aspect ratio but is cropped to its target's bucket
        assert [c.shape for c in item["control_pixel_values"]] == [(3, height, width)]
    # resize to cover + center crop: 64x32 -> 48x24 (x0.75 covers 40x24), 4 px cut from each side
    assert dataset[0]["crop_top_left"].tolist() == [0, 4]


def test_batches_never_mix_shapes_and_sampler_is_deterministic(tmp_path):
    root = mixed_aspect_data(tmp_path / "d", per_size=5)
    dataset = ImageDataset(load_records(DataConfig(path=root), {"prompt", "target"}), 32, buckets=make_buckets(32, 8))
    sampler = make_batch_sampler(dataset, batch_size=2, seed=1)
    assert isinstance(sampler, BucketBatchSampler)
    # buckets: 5 wide, 5 tall, 10 square -> 2 + 2 + 5 batches of 2 per epoch, ragged ends dropped
    assert len(sampler) == 9
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 9 and all(len(b) == 2 for b in batches)
        for indices in batches:
            assert len({dataset.bucket_ids[i] for i in indices}) == 1
            batch = collate([dataset[i] for i in indices])  # stacking fails on mixed shapes
            assert batch["pixel_values"].shape[0] == 2
        assert len({i for b in batches for i in b}) == 18  # no sample twice in an epoch
        orders.append(batches)
    assert orders[0] != orders[1]  # a new order each epoch
    again = BucketBatchSampler(dataset.bucket_ids, 2, seed=1)
    again.set_epoch(1)
    assert list(again) == orders[1]  # (seed, epoch) alone decide the order
    assert isinstance(make_batch_sampler(ImageDataset(dataset.samples, 32), 2), ShardedBatchSampler)


def test_same_size_chunks_cover_every_sample_in_uniform_batches(tmp_path):
    root = mixed_aspect_data(tmp_path / "d", per_size=3)
    dataset = ImageDataset(load_records(DataConfig(path=root), {"prompt", "target"}), 32, buckets=make_buckets(32, 8))
    chunks = same_size_chunks(dataset, list(range(len(dataset))), batch_size=2)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(12))  # ragged ends kept
    assert all(len({dataset.size_of(i) for i in chunk}) == 1 and len(chunk) <= 2 for chunk in chunks)


def test_two_ranks_get_disjoint_shards_that_cover_the_single_process_batches():
    bucket_ids = [i % 3 for i in range(40)] + [0] * 5  # uneven buckets: 19, 13, 13
    single = BucketBatchSampler(bucket_ids, batch_size=4, seed=7)
    ranks = [BucketBatchSampler(bucket_ids, batch_size=2, num_replicas=2, rank=r, seed=7) for r in range(2)]
    for epoch in range(2):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        shards = [list(s) for s in ranks]
        assert len(shards[0]) == len(shards[1]) == len(single) == 4 + 3 + 3
        for a, b in zip(*shards):
            assert not set(a) & set(b)
            assert len({bucket_ids[i] for i in a + b}) == 1  # the ranks step through the same bucket
        assert [a + b for a, b in zip(*shards)] == list(single)  # N x B trains like one process with N*B
        seen = [i for shard in shards for batch in shard for i in batch]
        assert len(seen) == len(set(seen)) == 40  # disjoint; 45 minus the ragged ends (3 + 1 + 1)
    even = [i % 3 for i in range(36)]  # 12 per bucket: no ragged end, the shards cover every sample
    shards = [list(BucketBatchSampler(even, batch_size=2, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    assert sorted(i for shard in shards for batch in shard for i in batch) == list(range(36))
    with pytest.raises(DataError, match="no bucket holds one global batch"):
        BucketBatchSampler([0, 1, 2, 3], batch_size=2)


def test_resume_at_start_batch_gives_the_remaining_batches():
    bucket_ids = [i % 4 for i in range(30)]
    sampler = BucketBatchSampler(bucket_ids, batch_size=3, num_replicas=2, rank=1, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    for start in (0, 1, len(full) - 1, len(full)):
        resumed = BucketBatchSampler(bucket_ids, batch_size=3, num_replicas=2, rank=1, seed=5)
        resumed.set_epoch(2, start_batch=start)
        assert len(resumed) == len(full) - start
        assert list(resumed) == full[start:]


def test_cache_keys_include_the_bucket_size(tmp_path):
    Image.new("RGB", (40, 20), "red").save(tmp_path / "a.png")
    cache = EmbeddingCache(tmp_path / "cache", "m")
    keys = {size: cache.latent_key(tmp_path / "a.png", size, False) for size in [(24, 40), (40, 24), (32, 32)]}
    assert len(set(keys.values())) == 3
    # a square bucket is the square crop of a run without buckets: the same pixels, the same entry
    assert keys[(32, 32)] == cache.latent_key(tmp_path / "a.png", 32, False)
    assert cache.latent_key(tmp_path / "a.png", torch.Size([24, 40]), False) == keys[(24, 40)]


def test_bucket_config_errors_name_the_key(tmp_path):
    from glm_training.models.base import build_family
    from glm_training.trainers.sft import build_diffusion_data

    raw = sdxl_config(tmp_path, tmp_path, data={"buckets": True, "bucket_aspect_range": [1.5, 2.0]})
    cfg = config_from_dict(raw)
    family = build_family(cfg, load=False)  # only its declarations are read before the data
    mixed_aspect_data(tmp_path / "d", per_size=1)
    cfg.data.path = str(tmp_path / "d")
    with pytest.raises(ConfigError, match="data.bucket_aspect_range"):
        build_diffusion_data(cfg, family)


def test_sdxl_sft_with_buckets_on_mixed_aspect_images_trains_end_to_end(tmp_path):
    from glm_training.trainers.sft import SFTTrainer

    root = mixed_aspect_data(tmp_path / "d", per_size=2, sizes=[(64, 32), (32, 64), (40, 40)])
    raw = sdxl_config(tmp_path, root, data={"buckets": True, "random_flip": True},
                      training={"max_train_steps": 3, "batch_size": 2, "checkpointing_steps": 100},
                      cache={"enabled": True, "dir": str(tmp_path / "cache")})
    trainer = SFTTrainer(config_from_dict(raw))
    trainer.setup()
    assert trainer.batches_per_epoch == 3
    shapes = [tuple(batch["pixel_values"].shape) for batch in trainer.dataloader(0)]
    assert sorted(shapes) == [(2, 3, 24, 40), (2, 3, 32, 32), (2, 3, 40, 24)]
    run_dir = trainer.train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    # the cache holds each image's latents at its bucket's size, keyed by that size
    cache, dataset = trainer.parts[0].encoder.cache, trainer.dataset
    for index, sample in enumerate(dataset.samples):
        height, width = dataset.size_of(index)
        entries = [cache.get(cache.latent_key(sample.target, (height, width), flip)) for flip in (False, True)]
        assert any(entries)  # trained at least once (3 steps x 2 = every sample) in one orientation
        for entry in filter(None, entries):
            assert tuple(entry["latents"].shape[1:]) == tuple(trainer.family.latent_shape(height, width))


def test_cache_command_fills_every_bucket(tmp_path):
    """`train.py --cache` with buckets: batches of one size each, every image's latents stored."""
    import yaml

    from glm_training.cli import main

    root = mixed_aspect_data(tmp_path / "d", per_size=3, sizes=[(64, 32), (32, 64)])
    raw = sdxl_config(tmp_path, root, data={"buckets": True}, training={"batch_size": 2},
                      cache={"enabled": True, "dir": str(tmp_path / "cache")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--config", str(tmp_path / "c.yaml"), "--cache"]) == 0
    from glm_training.models.base import build_family
    from glm_training.trainers.sft import build_diffusion_data

    cfg = config_from_dict(raw)
    dataset, encoder = build_diffusion_data(cfg, build_family(cfg))
    for index, sample in enumerate(dataset.samples):
        assert encoder.cache.get(encoder.cache.latent_key(sample.target, dataset.size_of(index), False)), sample.target
