"""One Record for every layout: images opened one way (checked pixel by pixel against numpy
reference conversions), text read as UTF-8 with or without BOM, needs, on_error and eval splits."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from glm_training.config import DataConfig
from glm_training.data.datasets import ImageDataset, PreferenceDataset, PromptDataset
from glm_training.data.images import image_size, open_image
from glm_training.data.records import DataError, Record, load_records

SFT, PAIRS, PROMPTS = {"prompt", "target"}, {"prompt", "chosen", "rejected"}, {"prompt"}
RNG = np.random.default_rng(0)


def rgb(height=6, width=6):
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(array, path, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kwargs) if mode else Image.fromarray(array).save(path, **kwargs)
    return path


def on_white(colour, alpha):
    """Reference alpha compositing on white, in float."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(colour.astype(np.float64) * a + 255 * (1 - a))


# ----------------------------------------------------------------------------------------------
# Images: every mode to 8-bit RGB, the same way for every reader and dataset


def reference_cases(tmp_path):
    """(file, expected uint8 (H, W, 3) array) for every kind of file that trains differently."""
    cases = {}
    gray16 = RNG.integers(0, 65536, (6, 6), dtype=np.uint16)
    gray16[0, :3] = [0, 65535, 257 * 100]
    cases["gray16"] = (save(gray16, tmp_path / "gray16.png"), np.rint(gray16 / 257.0))
    cmyk = RNG.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    cases["cmyk"] = (save(cmyk, tmp_path / "cmyk.tiff", "CMYK"),
                     np.rint(np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255))
    palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
    indices = RNG.integers(0, 4, (6, 6), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "palette.png")
    cases["palette"] = (tmp_path / "palette.png", palette[indices])
    image.save(tmp_path / "palette_transparent.png", transparency=2)  # index 2 is see-through
    alpha = np.where(indices == 2, 0, 255)
    cases["palette_transparent"] = (tmp_path / "palette_transparent.png", on_white(palette[indices], alpha))
    rgba = RNG.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    cases["rgba"] = (save(rgba, tmp_path / "rgba.png", "RGBA"), on_white(rgba[..., :3], rgba[..., 3]))
    la = RNG.integers(0, 256, (6, 6, 2), dtype=np.uint8)
    cases["la"] = (save(la, tmp_path / "la.png", "LA"), on_white(np.repeat(la[..., :1], 3, -1), la[..., 1]))
    gray = RNG.integers(0, 256, (6, 6), dtype=np.uint8)
    cases["gray"] = (save(gray, tmp_path / "gray.png", "L"), gray)
    colour = rgb()
    cases["rgb"] = (save(colour, tmp_path / "rgb.png"), colour)
    return {name: (path, np.broadcast_to(np.asarray(ref, np.float64)[..., None] if np.ndim(ref) == 2 else ref,
                                         (6, 6, 3)))
            for name, (path, ref) in cases.items()}


def test_every_image_mode_matches_its_reference_conversion(tmp_path):
    for name, (path, reference) in reference_cases(tmp_path / "img").items():
        opened = open_image(path)
        assert opened.mode == "RGB", name
        # Compositing in PIL's integer arithmetic may round the other way: at most 1 level.
        assert np.abs(np.asarray(opened, np.float64) - reference).max() <= 1, name


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 36).astype(np.uint16).reshape(6, 6)
    opened = np.asarray(open_image(save(ramp, tmp_path / "ramp.png")))[..., 0]
    assert opened[0, 0] == 0 and opened[-1, -1] == 255
    assert 120 <= opened.mean() <= 135  # PIL's plain convert("RGB") clips this ramp to ~250 on average


@pytest.mark.parametrize("orientation, rotate", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                                 (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied_everywhere(tmp_path, orientation, rotate):
    pixels = rgb(4, 8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(pixels, tmp_path / "photo.png", exif=exif)
    upright = rotate(pixels)
    assert np.array_equal(np.asarray(open_image(path)), upright)
    assert image_size(path) == (upright.shape[1], upright.shape[0])  # (width, height): bucket choice
    (tmp_path / "prompts.txt").write_text("a photo\n")
    (tmp_path / "target_images").mkdir()
    path.rename(tmp_path / "target_images" / "photo.png")
    records = load_records(DataConfig(path=str(tmp_path)), SFT)
    item = ImageDataset(records, resolution=4)[0]
    assert item["original_size"].tolist() == list(upright.shape[:2])


def test_datasets_train_on_the_reference_pixels_in_minus_one_to_one(tmp_path):
    cases = reference_cases(tmp_path / "img")
    names = sorted(cases)
    (tmp_path / "prompts.txt").write_text("".join(f"{n}\n" for n in names))
    target_dir = tmp_path / "target_images"
    target_dir.mkdir()
    for i, name in enumerate(names):  # numbered so the natural order matches the prompts
        path = cases[name][0]
        path.rename(target_dir / f"{i:02d}{path.suffix}")
    records = load_records(DataConfig(path=str(tmp_path)), SFT)
    assert [r.prompt for r in records] == names
    images, prompts = ImageDataset(records, resolution=6), PromptDataset(records, resolution=6)
    pairs = PreferenceDataset([Record(r.prompt, chosen=r.target, rejected=r.target) for r in records], 6)
    for i, name in enumerate(names):
        expected = torch.from_numpy(np.array(cases[name][1])).permute(2, 0, 1).float() / 127.5 - 1
        for tensor in (images[i]["pixel_values"], prompts[i]["target_pixel_values"], pairs[i]["chosen_pixel_values"]):
            assert tensor.min() >= -1 and tensor.max() <= 1
            assert (tensor - expected).abs().max() <= 1 / 127.5 + 1e-6, name


# ----------------------------------------------------------------------------------------------
# Text: UTF-8 with or without BOM; anything else is one clear error


def test_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    save(rgb(), tmp_path / "target_images" / "0.png")
    (tmp_path / "prompts.txt").write_bytes("\ufeffa red cat\n".encode("utf-8"))
    assert load_records(DataConfig(path=str(tmp_path)), SFT)[0].prompt == "a red cat"
    (tmp_path / "p.txt").write_bytes("\ufefffirst\nsecond\n".encode("utf-8"))
    assert [r.prompt for r in load_records(DataConfig(path=str(tmp_path / "p.txt")), PROMPTS)] == ["first", "second"]
    manifest = tmp_path / "m.jsonl"  # a BOM also breaks the JSON of the first line
    manifest.write_bytes(("\ufeff" + json.dumps({"prompt": "café", "image": "target_images/0.png"}) + "\n")
                         .encode("utf-8"))
    assert load_records(DataConfig(path=str(manifest)), SFT)[0].prompt == "café"


def test_non_utf8_prompts_name_the_file_line_and_fix(tmp_path):
    save(rgb(), tmp_path / "target_images" / "0.png")
    save(rgb(), tmp_path / "target_images" / "1.png")
    (tmp_path / "prompts.txt").write_bytes("a dog\na café\n".encode("latin-1"))
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=str(tmp_path)), SFT)
    message = str(error.value)
    assert f"{tmp_path / 'prompts.txt'}:2: not UTF-8 text (byte 0xe9 at column 6)" in message
    assert "Save the file as UTF-8" in message and "iconv" in message


# ----------------------------------------------------------------------------------------------
# One manifest, every trainer's needs; on_error everywhere; missing fields named


def test_one_manifest_serves_sft_dpo_and_grpo_with_one_key_spelling(tmp_path):
    for name in ("t", "w", "l", "c"):
        save(rgb(), tmp_path / f"{name}.png")
    row = {"prompt": "p", "image": "t.png", "chosen": "w.png", "rejected": "l.png", "control_images": ["c.png"],
           "ocr_text": "HELLO"}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    data = DataConfig(path=str(tmp_path / "data.jsonl"))
    (record,) = load_records(data, SFT | {"controls"})
    assert (record.target.name, record.chosen.name, record.rejected.name) == ("t.png", "w.png", "l.png")
    assert [c.name for c in record.controls] == ["c.png"] and record.metadata["ocr_text"] == "HELLO"
    assert load_records(data, PAIRS) == load_records(data, PROMPTS) == [record]


def test_needed_field_missing_everywhere_is_one_layout_error(tmp_path):
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    assert [r.prompt for r in load_records(DataConfig(path=str(tmp_path)), PROMPTS)] == ["a", "b"]
    with pytest.raises(DataError, match=r"no 'target' images, which this training needs.*: add target_images/"):
        load_records(DataConfig(path=str(tmp_path)), SFT)
    with pytest.raises(DataError, match=r"no 'chosen' images.*: add chosen/ and rejected/"):
        load_records(DataConfig(path=str(tmp_path)), PAIRS)


def test_needed_field_missing_in_one_row_names_file_line_and_field(tmp_path):
    save(rgb(), tmp_path / "w.png"), save(rgb(), tmp_path / "l.png")
    rows = [{"prompt": "a", "chosen": "w.png", "rejected": "l.png"}, {"prompt": "b", "chosen": "w.png"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=str(tmp_path)), PAIRS)
    assert "w.png: no 'rejected' image" in str(error.value) and "1 problem(s)" in str(error.value)
    assert [r.prompt for r in load_records(DataConfig(path=str(tmp_path), on_error="skip"), PAIRS)] == ["a"]


def test_on_error_applies_to_prompt_data_too(tmp_path, caplog):
    save(rgb(), tmp_path / "s.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"prompt": "good", "source_image": "s.png"}, {"prompt": "bad", "source_image": "broken.png"},
            {"prompt": "gone", "target_image": "missing.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(path=str(tmp_path / "p.jsonl")), PROMPTS)
    message = str(error.value)
    assert "3 problem(s)" in message and "broken.png: not a readable image" in message
    assert "missing.png: file not found" in message and "p.jsonl:4: not valid JSON" in message
    with caplog.at_level(logging.WARNING):
        kept = load_records(DataConfig(path=str(tmp_path / "p.jsonl"), on_error="skip"), PROMPTS)
    assert [r.prompt for r in kept] == ["good"]
    assert "leaving out 3 problem(s)" in caplog.text


def test_folder_pairs_and_unknown_needs(tmp_path):
    (tmp_path / "prompts.txt").write_text("x\ny\n")
    for i in range(2):
        save(rgb(), tmp_path / "chosen" / f"{i}.png"), save(rgb(), tmp_path / "rejected" / f"{i}.png")
    pairs = load_records(DataConfig(path=str(tmp_path)), PAIRS)
    assert [(p.prompt, p.chosen.parent.name, p.rejected.parent.name) for p in pairs] == [
        ("x", "chosen", "rejected"), ("y", "chosen", "rejected")]
    with pytest.raises(ValueError, match="unknown fields"):
        load_records(DataConfig(path=str(tmp_path)), {"image"})


# ----------------------------------------------------------------------------------------------
# Eval split


def manifest(path, count):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        save(rgb(), path / f"{i}.png")
    (path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"p{i}"}) + "\n"
                                                 for i in range(count)))
    return path


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path):
    root = manifest(tmp_path / "d", 20)
    data = DataConfig(path=str(root), eval_fraction=0.2)
    train, held = load_records(data, SFT), load_records(data, SFT, split="eval")
    assert len(held) == 4 and len(train) == 16
    assert {r.prompt for r in train} | {r.prompt for r in held} == {f"p{i}" for i in range(20)}
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert [r.prompt for r in load_records(data, SFT, split="eval")] == [r.prompt for r in held]
    assert load_records(DataConfig(path=str(root)), SFT, split="eval") == []  # no eval source configured


def test_eval_path_any_layout_and_conflicts(tmp_path):
    root, other = manifest(tmp_path / "d", 3), tmp_path / "e"
    (other / "target_images").mkdir(parents=True)
    save(rgb(), other / "target_images" / "0.png")
    (other / "prompts.txt").write_text("held out\n")
    data = DataConfig(path=str(root), eval_path=str(other))
    assert [r.prompt for r in load_records(data, SFT, split="eval")] == ["held out"]
    assert len(load_records(data, SFT)) == 3
    with pytest.raises(DataError, match="data.eval_path and data.eval_fraction are both set"):
        load_records(DataConfig(path=str(root), eval_path=str(other), eval_fraction=0.1), SFT)


# ----------------------------------------------------------------------------------------------
# BAGEL conversations are records too


def test_bagel_conversations_and_plain_records_get_sequence_plans(tmp_path):
    from glm_training.models.bagel.packing import TextItem, VaeImageItem, VitImageItem

    save(rgb(), tmp_path / "in.png"), save(rgb(), tmp_path / "out.png")
    rows = [{"conversations": [{"role": "user", "type": "image", "image_path": "in.png"},
                               {"role": "user", "type": "text", "content": "make it blue"},
                               {"role": "assistant", "type": "image", "image_path": "out.png"}]},
            {"text_prompt": "a cat", "image_path": "out.png"},
            {"conversations": [{"role": "user", "type": "text", "content": "no answer"}]}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = DataConfig(path=str(tmp_path / "train.jsonl"))
    with pytest.raises(DataError, match=r"train.jsonl:3: field 'conversations' has no assistant entry"):
        load_records(data, {"conversation"})
    edit, t2i = load_records(DataConfig(path=data.path, on_error="skip"), {"conversation"})
    assert (edit.prompt, edit.target.name, [c.name for c in edit.controls]) == ("make it blue", "out.png", ["in.png"])
    kinds = [(type(i).__name__, getattr(i, "loss", None)) for i in edit.metadata["conversation"].items]
    assert kinds == [("VaeImageItem", False), ("VitImageItem", None), ("TextItem", False), ("VaeImageItem", True)]
    plan = t2i.metadata["conversation"].items
    assert isinstance(plan[0], TextItem) and plan[0].text == "a cat" and plan[0].cfg
    assert isinstance(plan[1], VaeImageItem) and plan[1].loss and plan[1].image == tmp_path / "out.png"
    assert not any(isinstance(i, VitImageItem) for i in plan)
