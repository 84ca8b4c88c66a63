import json

import pytest
from PIL import Image

from glm_training.config import DataConfig
from glm_training.data.datasets import DataError, PromptDataset, load_records


def test_prompt_sources_and_targets(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert [s.prompt for s in load_records(DataConfig(path=tmp_path / "p.txt"), {"prompt"})] == ["a", "b"]
    Image.new("RGB", (20, 20), "white").save(tmp_path / "t.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "target_image": "t.png"}) + "\n")
    dataset = PromptDataset(load_records(DataConfig(path=tmp_path / "p.jsonl"), {"prompt"}), resolution=8)
    item = dataset[0]
    assert item["target_pixel_values"].shape == (3, 8, 8) and item["target_pixel_values"].min() >= 0.99
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "target_image": "missing.png"}) + "\n")
    with pytest.raises(DataError, match="missing.png: file not found"):
        load_records(DataConfig(path=tmp_path / "bad.jsonl"), {"prompt"})


def test_jsonl_prompts_take_control_images_like_sft_manifests(tmp_path):
    for name in ("s.png", "c1.png", "c2.png", "t.png"):
        Image.new("RGB", (20, 20), "white").save(tmp_path / name)
    rows = [{"prompt": "edit", "source_image": "s.png"},
            {"prompt": "plus", "control_images": ["c1.png", "c2.png"], "image": "t.png"},
            {"prompt": "one", "control_images": "c1.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_records(DataConfig(path=tmp_path / "p.jsonl"), {"prompt"})
    assert [[c.name for c in s.controls] for s in samples] == [["s.png"], ["c1.png", "c2.png"], ["c1.png"]]
    assert [s.target.name if s.target else None for s in samples] == [None, "t.png", None]


def test_missing_paths_say_so(tmp_path):
    from glm_training.data.datasets import load_records

    with pytest.raises(DataError, match="prompts.txt: does not exist"):
        load_records(DataConfig(path=tmp_path / "prompts.txt"), {"prompt"})
    with pytest.raises(DataError, match="pairs.jsonl: does not exist"):
        load_records(DataConfig(path=tmp_path / "pairs.jsonl"), {"prompt", "chosen", "rejected"})
