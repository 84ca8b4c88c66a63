"""BAGEL packing: attention masks, indexes, labels, RoPE positions, dropout and the data formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from glm_training.models.bagel.data import BagelDataError, load_bagel_samples
from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer
from glm_training.models.bagel.packing import (
    BagelSample,
    ImageResize,
    PackingConfig,
    TextItem,
    VaeImageItem,
    VitImageItem,
    build_sample_attention_mask,
    pack_samples,
)
from glm_training.models.bagel.tiny import build_tiny_bagel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", seed=0)
    model = load_bagel(folder)
    tokenizer, special = load_bagel_tokenizer(folder, model.bagel_config)
    # 8x8 images: 4 ViT patches (patch 4) and 2x2 = 4 latent tokens (downsample 4).
    packing = PackingConfig.for_model(model.bagel_config, vae_max_size=8, vae_min_size=8,
                                      vit_max_size=8, vit_min_size=8).without_dropout()
    return model, tokenizer, special, packing


def image(color) -> Image.Image:
    return Image.new("RGB", (8, 8), color)


def expected_mask(sample_of: list[int], split_of: list[int], modes: list[str]) -> torch.Tensor:
    """The official rules, stated per pair: same sample, and the key is in an earlier split that
    is not a noise split, or in the same split (causally for a causal split)."""
    n = len(sample_of)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if sample_of[q] != sample_of[k]:
                continue
            if split_of[k] < split_of[q]:
                mask[q, k] = modes[k] != "noise"
            elif split_of[k] == split_of[q]:
                mask[q, k] = modes[q] != "causal" or k <= q
    return mask


def mixed_pack(tiny):
    model, tokenizer, special, packing = tiny
    samples = [
        # understanding: image, question, answer
        BagelSample([VitImageItem(image("red")), TextItem("ab"), TextItem("cd", loss=True)]),
        # editing: clean VAE + ViT input, instruction, target
        BagelSample([VaeImageItem(image("red")), VitImageItem(image("red")), TextItem("e"),
                     VaeImageItem(image("blue"), loss=True)]),
        # text-to-image with a text after the target (sees the prompt, not the noised image)
        BagelSample([TextItem("f"), VaeImageItem(image("green"), loss=True), TextItem("g", loss=True)]),
    ]
    return pack_samples(samples, tokenizer, special, model.bagel_config, packing, rng=random.Random(0))


def test_mixed_pack_layout(tiny) -> None:
    batch = mixed_pack(tiny)
    # text "ab": <|im_start|> a b <|im_end|> = 4; ViT image: start + 4 patches + end = 6; VAE image: 6.
    assert batch.split_lens == [[6, 4, 4], [6, 6, 3, 6], [3, 6, 3]]
    assert batch.attn_modes == [["full", "causal", "causal"], ["full", "full", "causal", "noise"],
                                ["causal", "noise", "causal"]]
    assert batch.sample_lens == [14, 21, 12] and batch.sequence_length == 47


def test_attention_mask_of_mixed_pack(tiny) -> None:
    batch = mixed_pack(tiny)
    sample_of, split_of, modes = [], [], []
    split_id = 0
    for sample, (lens, sample_modes) in enumerate(zip(batch.split_lens, batch.attn_modes)):
        for length, mode in zip(lens, sample_modes):
            sample_of += [sample] * length
            split_of += [split_id] * length
            modes += [mode] * length
            split_id += 1
    mask = batch.attention_mask()
    assert torch.equal(mask, expected_mask(sample_of, split_of, modes))

    # Hand-picked facts. Sample 0: ViT image 0..5, question 6..9, answer 10..13.
    assert mask[0:6, 0:6].all()                       # image block bidirectional
    assert not mask[0:6, 6:].any()                    # the image does not see later text
    assert mask[7, 6] and not mask[7, 8]              # text causal
    assert mask[10:14, 0:10].all()                    # the answer sees image and question
    # Sample 1 starts at 14: VAE input 14..19, ViT input 20..25, text 26..28, noised target 29..34.
    assert not mask[0:14, 14:].any() and not mask[14:, 0:14].any()   # no attention across samples
    assert mask[29:35, 14:35].all()                   # the target sees all context and itself
    assert mask[20, 19] and not mask[19, 20]          # ViT input after VAE input
    # Sample 2 starts at 35: prompt 35..37, noised image 38..43, text 44..46.
    assert mask[44:47, 35:38].all()
    assert not mask[44:47, 38:44].any()               # nobody else sees a noised image
    assert mask[38:44, 38:44].all()


def test_model_attention_follows_the_mask(tiny) -> None:
    """Perturb one token's input and see which outputs move."""
    model = tiny[0]
    batch = mixed_pack(tiny)
    inputs = model.embed_packed_inputs(batch, generator=torch.Generator().manual_seed(0))
    layout = batch.attention_layout()

    def run(embeds):
        hidden, _ = model.language_model.model(embeds, batch.packed_position_ids, inputs.is_gen, layout)
        return hidden

    base = run(inputs.embeds)
    for position in (8, 16, 40):  # question text, VAE input, noised t2i image
        embeds = inputs.embeds.clone()
        embeds[position] += 1.0
        moved = (run(embeds) - base).abs().amax(dim=-1) > 1e-6
        assert torch.equal(moved, batch.attention_mask()[:, position] | (torch.arange(47) == position)), position


def test_labels_positions_and_indexes(tiny) -> None:
    model, tokenizer, special, _ = tiny
    batch = mixed_pack(tiny)
    ids = {i: t for i, t in zip(batch.packed_text_indexes.tolist(), batch.packed_text_ids.tolist())}
    # Answer "cd" at 10..13: <|im_start|> c d <|im_end|>; CE at 10, 11, 12 predicts c, d, <|im_end|>.
    c, d = tokenizer.encode("cd", add_special_tokens=False)
    assert [ids[i] for i in range(10, 14)] == [special.bos_token_id, c, d, special.eos_token_id]
    assert batch.ce_loss_indexes.tolist() == [10, 11, 12, 44, 45]
    assert batch.packed_label_ids.tolist()[:3] == [c, d, special.eos_token_id]
    assert batch.ce_sample_ids.tolist() == [0, 0, 0, 2, 2]
    # Image blocks are framed by <|vision_start|> / <|vision_end|>.
    assert ids[0] == ids[14] == ids[35 + 3] == special.start_of_image
    assert ids[5] == ids[19] == special.end_of_image
    # RoPE: one position per image, text advancing per token; a target image does not advance.
    assert batch.packed_position_ids[:14].tolist() == [0] * 6 + [1, 2, 3, 4] + [5, 6, 7, 8]
    assert batch.packed_position_ids[14:35].tolist() == [0] * 6 + [1] * 6 + [2, 3, 4] + [5] * 6
    assert batch.packed_position_ids[35:].tolist() == [0, 1, 2] + [3] * 6 + [3, 4, 5]
    assert batch.next_positions == [9, 5, 6]
    # Every position is exactly one of text / ViT / VAE.
    covered = torch.cat([batch.packed_text_indexes, batch.packed_vit_token_indexes, batch.packed_vae_token_indexes])
    assert sorted(covered.tolist()) == list(range(47))
    assert batch.packed_vae_token_indexes.tolist() == [15, 16, 17, 18, 30, 31, 32, 33, 39, 40, 41, 42]
    assert batch.mse_loss_indexes.tolist() == [30, 31, 32, 33, 39, 40, 41, 42]
    assert batch.mse_sample_ids.tolist() == [1] * 4 + [2] * 4
    timesteps = batch.packed_timesteps
    assert torch.isinf(timesteps[:4]).all() and (timesteps[:4] < 0).all()      # clean input image
    assert torch.isfinite(timesteps[4:]).all() and len(set(timesteps[4:8].tolist())) == 1
    assert batch.vae_token_has_loss.tolist() == [False] * 4 + [True] * 8
    assert batch.vit_token_seqlens == [4, 4]


def test_cfg_dropout_removes_items_and_keeps_positions(tiny) -> None:
    model, tokenizer, special, packing = tiny
    always = PackingConfig(vae_resize=packing.vae_resize, vit_resize=packing.vit_resize,
                           text_cond_dropout=1.0, vit_cond_dropout=1.0, vae_cond_dropout=1.0)
    sample = BagelSample([VaeImageItem(image("red"), cfg=True), VitImageItem(image("red"), cfg=True),
                          TextItem("e", cfg=True), VaeImageItem(image("blue"), loss=True)])
    batch = pack_samples([sample], tokenizer, special, model.bagel_config, always, rng=random.Random(0))
    assert batch.split_lens == [[6]] and batch.attn_modes == [["noise"]]
    assert batch.packed_position_ids.tolist() == [2] * 6   # two dropped images still advanced RoPE
    kept = pack_samples([sample], tokenizer, special, model.bagel_config, always, train=False)
    assert kept.split_lens == [[6, 6, 3, 6]]


def test_official_resize_rule() -> None:
    vae = ImageResize(1024, 512, 16)
    assert vae.target_size(1920, 1080) == (1024, 576)
    assert vae.target_size(300, 200) == (768, 512)    # short side raised to 512
    vit = ImageResize(980, 378, 14, max_pixels=2_007_040)
    width, height = vit.target_size(4000, 3000)
    assert width % 14 == 0 and height % 14 == 0 and max(width, height) <= 980


def test_sample_mask_builder_matches_rules() -> None:
    split_lens, modes = [3, 2, 4, 2], ["causal", "full", "noise", "causal"]
    split_of = [i for i, n in enumerate(split_lens) for _ in range(n)]
    mode_of = [modes[i] for i in split_of]
    assert torch.equal(build_sample_attention_mask(split_lens, modes),
                       expected_mask([0] * len(split_of), split_of, mode_of))


# ----------------------------------------------------------------------------------------------
# Data files


def write_images(folder: Path) -> None:
    for name, color in (("cat.png", "gray"), ("in.png", "red"), ("out.png", "blue")):
        Image.new("RGB", (8, 8), color).save(folder / name)


def test_data_formats(tmp_path: Path, tiny) -> None:
    write_images(tmp_path)
    records = [
        {"conversations": [{"role": "user", "type": "image", "image_path": "cat.png"},
                           {"role": "user", "type": "text", "content": "What is it?"},
                           {"role": "assistant", "type": "text", "content": "A cat."}]},
        {"text_prompt": "a blue square", "image_path": "out.png"},
        {"conversations": [{"role": "system", "type": "text", "content": "You edit images."},
                           {"role": "user", "type": "image", "image_path": "in.png"},
                           {"role": "user", "type": "text", "content": "make it blue"},
                           {"role": "assistant", "type": "image", "image_path": "out.png"}]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "train.json").write_text(json.dumps(records, indent=2))
    for name in ("train.jsonl", "train.json"):
        samples = load_bagel_samples(tmp_path / name)
        vlm, t2i, edit = samples
        assert [type(i).__name__ for i in vlm.items] == ["VitImageItem", "TextItem", "TextItem"]
        assert [i.loss for i in vlm.items[1:]] == [False, True] and not any(i.cfg for i in vlm.items)
        assert [type(i).__name__ for i in t2i.items] == ["TextItem", "VaeImageItem"]
        assert t2i.items[0].cfg and t2i.items[1].loss
        assert [type(i).__name__ for i in edit.items] == ["TextItem", "VaeImageItem", "VitImageItem", "TextItem",
                                                          "VaeImageItem"]
        assert [getattr(i, "loss", False) for i in edit.items] == [False, False, False, False, True]
        assert all(i.cfg for i in edit.items[:4])
        assert edit.items[1].image == tmp_path / "in.png"
    assert load_bagel_samples(tmp_path / "train.jsonl")[2].source.endswith("train.jsonl:3")
    lines = (tmp_path / "train.json").read_text().splitlines()
    second = next(i for i, line in enumerate(lines) if '"text_prompt"' in line)  # 0-based; its "{" is above
    assert lines[second - 1].strip() == "{"
    assert load_bagel_samples(tmp_path / "train.json")[1].source.endswith(f"train.json:{second}")
    model, tokenizer, special, packing = tiny
    batch = pack_samples(load_bagel_samples(tmp_path / "train.jsonl"), tokenizer, special, model.bagel_config,
                         packing, rng=random.Random(0))
    assert len(batch.sample_lens) == 3 and batch.n_text_tokens > 0 and batch.n_image_tokens == 8


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"role": "bot", "type": "text", "content": "x"}]}, "conversations[0].role"),
    ({"conversations": [{"role": "user", "type": "video", "content": "x"}]}, "conversations[0].type"),
    ({"conversations": [{"role": "user", "type": "text", "content": "x"},
                        {"role": "assistant", "type": "text"}]}, "conversations[1].content' is missing"),
    ({"conversations": [{"role": "user", "type": "text", "content": "x"},
                        {"role": "assistant", "type": "image", "image_path": "nope.png"}]},
     "conversations[1].image_path': image"),
    ({"conversations": [{"role": "user", "type": "text", "content": "x"}]}, "no assistant entry"),
    ({"text_prompt": "x"}, "field 'image_path' is missing"),
    ({"text_prompt": 3, "image_path": "cat.png"}, "field 'text_prompt' must be a string"),
    ({"prompt": "x"}, "needs 'conversations' or 'text_prompt'"),
])
def test_data_errors_name_file_line_and_field(tmp_path: Path, record, message) -> None:
    write_images(tmp_path)
    good = {"text_prompt": "fine", "image_path": "cat.png"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(BagelDataError) as error:
        load_bagel_samples(path)
    assert f"{path}:3:" in str(error.value)
    assert message in str(error.value)


def test_invalid_json_line_is_reported(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text_prompt": "a", "image_path": "x.png"},\n  {"text_prompt": \n]')
    with pytest.raises(BagelDataError, match=r"broken\.json:4: invalid JSON"):
        load_bagel_samples(path)
