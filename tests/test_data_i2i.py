"""Image-to-image layouts (seed 000 source_images/, seed 003 control_images/, JSONL), pairing
errors listed by file name, and per-batch control dropout."""

import json

import pytest
import torch
from PIL import Image

from glm_training.config import DataConfig
from glm_training.data.datasets import DataError, ImageDataset, collate, detect_format, load_records


def image(path, colour="red", size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Seed 000: prompts.txt + target_images/ + source_images/ (+ eval split)


def seed000(root, count=3):
    for i in range(count):
        image(root / "target_images" / f"{i:02d}.png", "red")
        image(root / "source_images" / f"{i:02d}.jpg", "blue")
        image(root / "eval_target_images" / f"e{i}.png", "green")
        image(root / "eval_source_images" / f"e{i}.jpg", "white")
    (root / "prompts.txt").write_text("".join(f"edit {i}\n" for i in range(count)))
    (root / "eval_prompts.txt").write_text("".join(f"eval {i}\n" for i in range(count)))
    return root


def test_seed000_source_images_pair_with_targets_and_prompts(tmp_path):
    root = seed000(tmp_path / "d")
    assert detect_format(root) == "folder"
    samples = load_records(DataConfig(path=root), {"prompt", "target", "controls"}, same_control_count=True)
    assert [(s.prompt, s.target.name, [c.name for c in s.controls]) for s in samples] == [
        ("edit 0", "00.png", ["00.jpg"]), ("edit 1", "01.png", ["01.jpg"]), ("edit 2", "02.png", ["02.jpg"])]
    evals = load_records(DataConfig(path=root), {"prompt", "target"}, split="eval")
    assert [(s.prompt, s.target.name, s.controls[0].name) for s in evals][0] == ("eval 0", "e0.png", "e0.jpg")
    assert all(c.parent.name == "eval_source_images" for s in evals for c in s.controls)
    item = ImageDataset(samples, resolution=8)[1]
    assert len(item["control_pixel_values"]) == 1 and item["control_pixel_values"][0].shape == (3, 8, 8)
    assert item["control_pixel_values"][0][2].mean() > 0.9  # blue source, not the red target


def test_seed000_missing_source_is_named(tmp_path):
    root = seed000(tmp_path / "d")
    (root / "source_images" / "01.jpg").unlink()
    image(root / "source_images" / "zz.jpg")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=root), {"prompt", "target"})
    message = str(error.value)
    assert "01.png: no source image source_images/01.*" in message
    assert "zz.jpg: source image without a target image" in message
    kept = load_records(DataConfig(path=root, on_error="skip"), {"prompt", "target"})
    assert [s.target.name for s in kept] == ["00.png", "02.png"]


# ----------------------------------------------------------------------------------------------
# Seed 003: control_images/NAME.jpg + training_images/NAME.png + NAME.txt


def seed003(root, names=("a", "b", "c")):
    for name in names:
        image(root / "training_images" / f"{name}.png", "red")
        (root / "training_images" / f"{name}.txt").write_text(f"make {name} red\n")
        image(root / "control_images" / f"{name}.jpg", "blue")
    return root


def test_seed003_pairs_by_name(tmp_path):
    root = seed003(tmp_path / "d", names=("img_10", "img_2", "img_1"))
    assert detect_format(root) == "control_folder"
    samples = load_records(DataConfig(path=root, format="control_folder"),
                           {"prompt", "target", "controls"}, same_control_count=True)
    # natural order; img_1 is a target of its own, so img_1.jpg is not a second control of "img"
    assert [(s.target.name, s.prompt, [c.name for c in s.controls]) for s in samples] == [
        ("img_1.png", "make img_1 red", ["img_1.jpg"]), ("img_2.png", "make img_2 red", ["img_2.jpg"]),
        ("img_10.png", "make img_10 red", ["img_10.jpg"])]


def test_seed003_several_control_images_in_number_order(tmp_path):
    root = seed003(tmp_path / "d", names=())
    for name in ("x", "y"):
        image(root / "training_images" / f"{name}.png")
        (root / "training_images" / f"{name}.txt").write_text(f"combine {name}")
        for k, colour in ((10, "white"), (2, "green"), (1, "blue")):
            image(root / "control_images" / f"{name}_{k}.jpg", colour)
    with pytest.raises(DataError, match=r"x.png: control images numbered \[1, 2, 10\]; number them 1..3"):
        load_records(DataConfig(path=root), {"prompt", "target"})
    for name in ("x", "y"):
        (root / "control_images" / f"{name}_10.jpg").rename(root / "control_images" / f"{name}_3.jpg")
    samples = load_records(DataConfig(path=root), {"prompt", "target"}, same_control_count=True)
    assert [[c.name for c in s.controls] for s in samples] == [["x_1.jpg", "x_2.jpg", "x_3.jpg"],
                                                                     ["y_1.jpg", "y_2.jpg", "y_3.jpg"]]
    batch = collate([ImageDataset(samples, resolution=8)[i] for i in range(2)])
    assert len(batch["control_pixel_values"]) == 3  # one (B, 3, H, W) tensor per control slot
    assert batch["control_pixel_values"][0].shape == (2, 3, 8, 8)
    assert batch["control_pixel_values"][0][:, 2].mean() > 0.9  # slot 0 is NAME_1 (blue)
    assert batch["control_pixel_values"][1][:, 1].mean() > 0.0 > batch["control_pixel_values"][1][:, 0].mean()


def test_seed003_pairing_errors_are_listed_together_by_file_name(tmp_path):
    root = seed003(tmp_path / "d", names=("a", "b", "c", "d", "e", "f", "g"))
    (root / "control_images" / "b.jpg").unlink()                     # missing partner
    (root / "training_images" / "c.txt").unlink()                    # missing caption
    (root / "control_images" / "d.jpg").write_bytes(b"broken")       # unreadable image
    image(root / "control_images" / "e_1.jpg")                       # ambiguous with e.jpg
    image(root / "control_images" / "orphan.jpg")                    # control without a target
    image(root / "control_images" / "f_1.jpg")                       # f: 2 controls, others 1
    (root / "control_images" / "f.jpg").rename(root / "control_images" / "f_2.jpg")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=root), {"prompt", "target"}, same_control_count=True)
    message = str(error.value)
    assert "b.png: no control image (control_images/b.jpg, or b_1.jpg" in message
    assert "c.txt: missing caption of c.png" in message
    assert "d.jpg: not a readable image" in message
    assert "e.png: ambiguous control images: control_images/e.jpg and e_1.jpg" in message
    assert "orphan.jpg: control image without a target" in message
    assert "f.png: 2 control image(s) (f_1.jpg, f_2.jpg) but 2 samples have 1" in message
    assert "training.batch_size: 1" in message and "data.on_error: skip" in message
    assert "a.png" not in message and "g.png" not in message
    assert [s.target.name for s in load_records(DataConfig(path=root, on_error="skip"),
                                                {"prompt", "target"}, same_control_count=True)] == ["a.png", "g.png"]
    # batch size 1: a different number of controls is fine
    assert {s.target.name for s in load_records(DataConfig(path=root, on_error="skip"),
                                                {"prompt", "target"})} == {"a.png", "f.png", "g.png"}


def test_seed003_missing_folder_is_a_layout_error(tmp_path):
    image(tmp_path / "training_images" / "a.png")
    with pytest.raises(DataError, match=r"control_images: missing folder of control images"):
        load_records(DataConfig(path=tmp_path), {"prompt", "target"})


# ----------------------------------------------------------------------------------------------
# JSONL manifest {"prompt", "image", "control_images": [...]}


def test_jsonl_manifest_with_control_images(tmp_path):
    image(tmp_path / "t0.png"), image(tmp_path / "c0.png", "blue"), image(tmp_path / "c0b.png", "green")
    image(tmp_path / "t1.png"), image(tmp_path / "c1.png", "blue"), image(tmp_path / "c1b.png", "green")
    rows = [{"prompt": "edit 0", "image": "t0.png", "control_images": ["c0.png", "c0b.png"]},
            {"prompt": "edit 1", "image": "t1.png", "control_images": ["c1.png", "c1b.png"]}]
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = load_records(DataConfig(path=manifest), {"prompt", "target", "controls"}, same_control_count=True)
    assert [(s.prompt, s.target.name, [c.name for c in s.controls]) for s in samples] == [
        ("edit 0", "t0.png", ["c0.png", "c0b.png"]), ("edit 1", "t1.png", ["c1.png", "c1b.png"])]
    rows += [{"prompt": "edit 2", "image": "t0.png", "control_images": ["gone.png"]},
             {"prompt": "edit 3", "image": "t1.png", "control_images": "c1.png"},   # a string is one path
             {"prompt": "edit 4", "image": "t1.png", "control_images": [3]},
             {"prompt": "edit 5", "image": "t1.png"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=manifest), {"prompt", "target", "controls"}, same_control_count=True)
    message = str(error.value)
    assert "gone.png: file not found" in message
    assert "edits.jsonl:5: 'control_images' must be a list of paths" in message
    assert "t1.png: no control image; training.mode i2i needs" in message
    assert "t1.png: 1 control image(s) (c1.png) but 2 samples have 2" in message


# ----------------------------------------------------------------------------------------------
# Control dropout: per micro-batch, deterministic in (seed, epoch, first index)


class FakeFamily:
    """Records what the encoder hands to the family (the family itself is not under test here)."""

    prompt_uses_images = False
    device = torch.device("cpu")

    def __init__(self):
        self.conditions = []

    def encode_prompt(self, prompts, control_images=None):
        return {"prompt_embeds": torch.zeros(len(prompts), 2, 4)}

    def encode_images(self, pixels):
        return pixels[:, :, ::4, ::4].clone()

    def collate_prompt_embeds(self, items):
        return {k: torch.cat([i[k] for i in items]) for k in items[0]}

    def condition(self, prompt_embeds, batch):
        self.conditions.append(batch)
        return {"has_controls": "control_latents" in batch, "control_pixels": "control_pixel_values" in batch}


def test_control_dropout_is_per_batch_and_deterministic(tmp_path):
    from glm_training.parts.conditioning import ConditionEncoder

    samples = load_records(DataConfig(path=seed003(tmp_path / "d", names=[f"s{i}" for i in range(8)])),
                           {"prompt", "target"})
    dataset = ImageDataset(samples, resolution=8)
    batches = [collate([dataset[i] for i in range(start, start + 2)]) for start in range(0, 8, 2)]
    encoder = ConditionEncoder(FakeFamily(), samples, None, 8, seed=3, control_dropout=0.5)
    draws = {epoch: [encoder.drops_controls(b, epoch) for b in batches] for epoch in range(6)}
    flat = [d for epoch in draws.values() for d in epoch]
    assert 0 < sum(flat) < len(flat)  # both happen at rate 0.5 over 24 batches
    again = ConditionEncoder(FakeFamily(), samples, None, 8, seed=3, control_dropout=0.5)
    assert {e: [again.drops_controls(b, e) for b in batches] for e in range(6)} == draws  # a resume draws the same
    other_seed = ConditionEncoder(FakeFamily(), samples, None, 8, seed=4, control_dropout=0.5)
    assert {e: [other_seed.drops_controls(b, e) for b in batches] for e in range(6)} != draws
    # depends on the batch's first index only (not on the other members)
    swapped = collate([dataset[i] for i in (0, 5)])
    assert all(encoder.drops_controls(swapped, e) == draws[e][0] for e in range(6))
    # what the family sees: the whole batch with or without control latents, never mixed
    for epoch in range(2):
        for batch, dropped in zip(batches, draws[epoch]):
            _, condition = encoder(batch, epoch)
            assert condition == {"has_controls": not dropped, "control_pixels": not dropped}
    assert not any(ConditionEncoder(FakeFamily(), samples, None, 8, control_dropout=0.0).drops_controls(b, 0)
                   for b in batches)
    assert all(ConditionEncoder(FakeFamily(), samples, None, 8, control_dropout=1.0).drops_controls(b, 0)
               for b in batches)


def test_control_dropout_rate_is_close_to_the_setting(tmp_path):
    from glm_training.parts.conditioning import ConditionEncoder

    encoder = ConditionEncoder(FakeFamily(), [], None, 8, seed=0, control_dropout=0.3)
    pixels = [torch.zeros(1, 3, 4, 4)]
    dropped = [encoder.drops_controls({"index": [i], "control_pixel_values": pixels}, 0) for i in range(2000)]
    assert sum(dropped) / 2000 == pytest.approx(0.3, abs=0.04)
    assert not encoder.drops_controls({"index": [0]}, 0)  # t2i batches have nothing to drop
