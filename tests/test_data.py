import json

import pytest
import torch
from PIL import Image

from glm_training.data.cache import EmbeddingCache, fingerprint_model_dir
from glm_training.config import DataConfig
from glm_training.data.datasets import (DataError, ImageDataset, ShardedBatchSampler, load_records,
                                        resize_and_crop)
from glm_training.data.synthetic import make_shapes_dataset


def test_folder_format_pairs_in_natural_order(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", count=12, size=16)
    samples = load_records(DataConfig(path=root), {"prompt", "target"})
    assert len(samples) == 12
    assert [s.target.name for s in samples[:3]] == ["0000.png", "0001.png", "0002.png"]
    assert samples[0].prompt == (root / "prompts.txt").read_text().splitlines()[0]


def test_every_bad_file_is_listed_at_once(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", count=4, size=16)
    (root / "target_images" / "0001.png").write_bytes(b"not a png")
    lines = (root / "prompts.txt").read_text().splitlines()
    lines[2] = "   "
    (root / "prompts.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=root), {"prompt", "target"})
    message = str(error.value)
    assert "2 problem(s)" in message
    assert "0001.png: not a readable image" in message
    assert "0002.png: empty prompt" in message
    assert "data.on_error: skip" in message
    kept = load_records(DataConfig(path=root, on_error="skip"), {"prompt", "target"})
    assert [s.target.name for s in kept] == ["0000.png", "0003.png"]


def test_count_mismatch_and_missing_layout(tmp_path):
    root = make_shapes_dataset(tmp_path / "d", count=3, size=16)
    (root / "target_images" / "0002.png").unlink()
    with pytest.raises(DataError, match=r"has 3 prompts but .*target_images has 2 images"):
        load_records(DataConfig(path=root), {"prompt", "target"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no known dataset layout"):
        load_records(DataConfig(path=tmp_path / "empty"), {"prompt", "target"})
    with pytest.raises(DataError, match=r"does not exist"):
        load_records(DataConfig(path=tmp_path / "nowhere"), {"prompt", "target"})


def test_metadata_jsonl_format(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "a.png")
    Image.new("RGB", (10, 10), "blue").save(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": "red"}, {"file_name": "b.png", "text": "blue"},
            {"file_name": "c.png", "text": "missing"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=tmp_path), {"prompt", "target"})
    assert "c.png: file not found" in str(error.value)
    assert "metadata.jsonl:4: not valid JSON" in str(error.value)


def test_resize_crop_and_tensor_range(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    cropped, (top, left) = resize_and_crop(image, 16)
    assert cropped.size == (16, 16) and top == 0 and left == 8
    make_shapes_dataset(tmp_path / "d", count=2, size=24)
    item = ImageDataset(load_records(DataConfig(path=tmp_path / "d"), {"prompt", "target"}), resolution=16)[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["original_size"].tolist() == [24, 24]


def test_sharded_sampler_matches_single_process_global_batches():
    single = ShardedBatchSampler(10, batch_size=4, seed=3)
    ranks = [ShardedBatchSampler(10, batch_size=2, num_replicas=2, rank=r, seed=3) for r in range(2)]
    merged = [a + b for a, b in zip(*[list(s) for s in ranks])]
    assert merged == list(single)
    single.set_epoch(1, start_batch=1)
    assert len(list(single)) == 1 and list(single)[0] != merged[1]  # new epoch, new order
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedBatchSampler(3, batch_size=2, num_replicas=2)


def test_cache_keys_follow_content_not_path(tmp_path):
    make_shapes_dataset(tmp_path / "d", count=2, size=16)
    first = tmp_path / "d" / "target_images" / "0000.png"
    cache = EmbeddingCache(tmp_path / "cache", "model-a")
    key = cache.latent_key(first, 16, False)
    renamed = first.with_name("renamed.png")
    first.rename(renamed)
    assert cache.latent_key(renamed, 16, False) == key
    assert cache.latent_key(renamed, 32, False) != key
    assert cache.latent_key(renamed, 16, True) != key
    Image.new("RGB", (16, 16), "green").save(renamed)
    assert cache.latent_key(renamed, 16, False) != key
    cache.put(key, {"latents": torch.ones(1, 4, 2, 2)})
    assert torch.equal(cache.get(key)["latents"], torch.ones(1, 4, 2, 2))
    assert EmbeddingCache(tmp_path / "cache", "model-b").get(key) is None  # other model, other entries
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_model_fingerprint_changes_with_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"a" * 100)
    before = fingerprint_model_dir(str(tmp_path / "m"))
    fingerprint_model_dir.cache_clear()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"b" * 100)
    assert fingerprint_model_dir(str(tmp_path / "m")) != before
