"""Tiny FLUX.1 Kontext, Qwen-Image (+Edit, +Edit-Plus) and GLM-Image pipelines: built offline,
reloaded through the real `from_pretrained`, and sampled in text-to-image and edit modes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from glm_training.models.tiny import build_tiny, ensure_tiny


def test_every_load_here_is_offline():
    from huggingface_hub import constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and constants.HF_HUB_OFFLINE  # conftest sets it


def solid(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def pattern(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def model_index(path) -> dict:
    index = json.loads((path / "model_index.json").read_text())
    return {name: value for name, value in index.items() if name != "_diffusers_version"}


def load(pipeline_class, path):
    pipe = pipeline_class.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flux_kontext", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus",
                                  "glm_image"])
def test_builders_are_seeded_and_write_safetensors(name, tmp_path):
    first = build_tiny(name, tmp_path / "a", seed=0)
    again = build_tiny(name, tmp_path / "b", seed=0)
    other = build_tiny(name, tmp_path / "c", seed=1)
    weights = sorted(path.relative_to(first) for path in first.rglob("*.safetensors"))
    assert weights and not list(first.rglob("*.bin")) and not (first / "_tokenizer_src").exists()
    for relative in weights:
        assert (first / relative).read_bytes() == (again / relative).read_bytes(), relative
    assert any((first / r).read_bytes() != (other / r).read_bytes() for r in weights)
    assert sum(path.stat().st_size for path in first.rglob("*")) < 8 * 2**20  # tiny


# ------------------------------------------------------------------------------------------------
# FLUX.1 Kontext
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxKontextPipeline

    path = ensure_tiny("flux_kontext")
    return path, load(FluxKontextPipeline, path)


def test_flux_kontext_layout_and_config(flux):
    path, pipe = flux
    assert model_index(path) == {
        "_class_name": "FluxKontextPipeline",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.scheduler.config.use_dynamic_shifting


def test_flux_kontext_text_to_image_and_edit(flux):
    from glm_training.models.tiny.flux_kontext import tiny_flux_kontext_call_kwargs

    _, pipe = flux
    t2i = generate(pipe, prompt="a red cat", **tiny_flux_kontext_call_kwargs(64, 48))
    assert t2i.shape == (1, 64, 48, 3)
    np.testing.assert_array_equal(t2i, generate(pipe, prompt="a red cat", **tiny_flux_kontext_call_kwargs(64, 48)))
    assert not np.array_equal(t2i, generate(pipe, seed=1, prompt="a red cat", **tiny_flux_kontext_call_kwargs(64, 48)))

    kwargs = tiny_flux_kontext_call_kwargs(32, 64)
    edit = generate(pipe, image=pattern(64, 32, 0), prompt="make it blue", **kwargs)
    assert edit.shape == (1, 32, 64, 3)
    np.testing.assert_array_equal(edit, generate(pipe, image=pattern(64, 32, 0), prompt="make it blue", **kwargs))
    # The control image conditions the result.
    assert not np.allclose(edit, generate(pipe, image=pattern(64, 32, 1), prompt="make it blue", **kwargs))


def test_flux_kontext_call_kwargs_reject_illegal_sizes():
    from glm_training.models.tiny.flux_kontext import tiny_flux_kontext_call_kwargs

    with pytest.raises(ValueError, match="divisible by 16"):
        tiny_flux_kontext_call_kwargs(40, 64)


# ------------------------------------------------------------------------------------------------
# Qwen-Image
# ------------------------------------------------------------------------------------------------

QWEN_INDEX = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


@pytest.fixture(scope="module")
def qwen():
    from diffusers import QwenImagePipeline

    path = ensure_tiny("qwen_image")
    return path, load(QwenImagePipeline, path)


@pytest.fixture(scope="module")
def qwen_edit():
    from diffusers import QwenImageEditPipeline

    path = ensure_tiny("qwen_image_edit")
    return path, load(QwenImageEditPipeline, path)


@pytest.fixture(scope="module")
def qwen_edit_plus():
    from diffusers import QwenImageEditPlusPipeline

    path = ensure_tiny("qwen_image_edit_plus")
    return path, load(QwenImageEditPlusPipeline, path)


def template_parts(pipe) -> tuple[str, str]:
    """(prefix, suffix) of the pipeline's prompt template around the user's prompt."""
    prefix, suffix = pipe.prompt_template_encode.split("{}")
    return prefix, suffix


def test_qwen_template_prefix_has_the_real_token_count_and_the_prompt_survives_the_drop(qwen, qwen_edit,
                                                                                      qwen_edit_plus):
    prompt = "a red cat on the left"
    for (_, pipe), drop in ((qwen, 34), (qwen_edit, 64), (qwen_edit_plus, 64)):
        tokenizer = pipe.tokenizer
        assert pipe.prompt_template_encode_start_idx == drop  # what the real Qwen2 tokenizer yields
        prefix, suffix = template_parts(pipe)
        # The edit template puts the image slot right after the system turn: the drop must end
        # exactly at `<|vision_start|>`, keeping the vision tokens.
        system_turn = prefix.split("<|vision_start|>")[0]
        assert len(tokenizer(system_turn).input_ids) == drop
        ids = tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids
        assert ids[:drop] == tokenizer(system_turn).input_ids
        kept = ids[drop:]
        prompt_ids = tokenizer(prompt).input_ids
        assert len(prompt_ids) == 6  # common words are single tokens, as in the real vocabulary
        starts = [i for i in range(len(kept)) if kept[i:i + len(prompt_ids)] == prompt_ids]
        assert len(starts) == 1, "the prompt's own tokens must all survive the template drop"
        if "<|vision_start|>" in prefix:
            assert tokenizer.convert_ids_to_tokens(kept[0]) == "<|vision_start|>"


def test_qwen_prompt_embeddings_hold_exactly_the_prompt_and_template_suffix(qwen):
    _, pipe = qwen
    tokenizer = pipe.tokenizer
    _, suffix = template_parts(pipe)
    embeds, mask = pipe.encode_prompt(["a red cat", "a blue square on the left"], device="cpu")
    lengths = mask.sum(dim=1).tolist()
    assert lengths == [len(tokenizer(p + suffix).input_ids) for p in ["a red cat", "a blue square on the left"]]
    assert lengths == [3 + 5, 6 + 5]
    assert embeds.shape == (2, max(lengths), pipe.text_encoder.config.text_config.hidden_size)


def test_qwen_image_text_to_image(qwen):
    from glm_training.models.tiny.qwen_image import tiny_qwen_image_call_kwargs

    path, pipe = qwen
    assert model_index(path) == QWEN_INDEX | {"_class_name": "QwenImagePipeline"}
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 64
    kwargs = tiny_qwen_image_call_kwargs(48, 64)
    image = generate(pipe, prompt="a red cat", **kwargs)
    assert image.shape == (1, 48, 64, 3)
    np.testing.assert_array_equal(image, generate(pipe, prompt="a red cat", **kwargs))
    assert not np.array_equal(image, generate(pipe, prompt="a blue dog", **kwargs))


def test_qwen_edit_condition_image_goes_through_the_vision_language_encoder(qwen_edit):
    _, pipe = qwen_edit
    tokenizer = pipe.tokenizer
    _, suffix = template_parts(pipe)
    condition = pattern(1024, 1024, 0)  # what the pipeline hands the encoder (it rescales to ~1 Mpx)
    embeds, mask = pipe.encode_prompt("make it blue", image=condition, device="cpu")
    assert mask is None  # a single prompt has no padding; the pipeline then drops the mask
    merge = pipe.processor.image_processor.merge_size
    grid = pipe.processor.image_processor(images=[condition], return_tensors="pt")["image_grid_thw"][0]
    vision_tokens = int(grid.prod()) // merge**2
    assert vision_tokens == 16  # the tiny processor's max_pixels keeps the vision tower cheap
    assert embeds.shape[1] == 2 + vision_tokens + len(tokenizer("make it blue" + suffix).input_ids)
    other, _ = pipe.encode_prompt("make it blue", image=pattern(1024, 1024, 1), device="cpu")
    assert not torch.allclose(embeds, other)


def test_qwen_image_edit(qwen_edit):
    from glm_training.models.tiny.qwen_image import tiny_qwen_image_call_kwargs

    path, pipe = qwen_edit
    assert model_index(path) == QWEN_INDEX | {"_class_name": "QwenImageEditPipeline",
                                              "processor": ["transformers", "Qwen2VLProcessor"]}
    kwargs = tiny_qwen_image_call_kwargs(32, 48)
    image = generate(pipe, image=pattern(48, 32, 0), prompt="make it blue", **kwargs)
    assert image.shape == (1, 32, 48, 3)
    np.testing.assert_array_equal(image, generate(pipe, image=pattern(48, 32, 0), prompt="make it blue", **kwargs))


def test_qwen_image_edit_plus_with_several_condition_images(qwen_edit_plus):
    from glm_training.models.tiny.qwen_image import tiny_qwen_image_call_kwargs

    path, pipe = qwen_edit_plus
    assert model_index(path) == QWEN_INDEX | {"_class_name": "QwenImageEditPlusPipeline",
                                              "processor": ["transformers", "Qwen2VLProcessor"]}
    kwargs = tiny_qwen_image_call_kwargs(32, 32)
    images = [pattern(32, 32, 0), solid(32, 32, (0, 0, 250))]
    image = generate(pipe, image=images, prompt="put the cat on the blue background", **kwargs)
    assert image.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(
        image, generate(pipe, image=images, prompt="put the cat on the blue background", **kwargs))


# ------------------------------------------------------------------------------------------------
# GLM-Image
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def glm():
    from glm_training.models.glm_image_support import FixedGlmImagePipeline

    path = ensure_tiny("glm_image")
    return path, load(FixedGlmImagePipeline, path)


def test_glm_image_layout_and_both_library_spellings_load(glm, tmp_path):
    from diffusers import GlmImagePipeline
    from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

    path, _ = glm
    index = model_index(path)
    assert index == {
        "_class_name": "GlmImagePipeline",
        "processor": ["transformers", "GlmImageProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "ByT5Tokenizer"],
        "transformer": ["diffusers", "GlmImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"],
    }
    copy = shutil.copytree(path, tmp_path / "glm_image_library")
    raw = json.loads((copy / "model_index.json").read_text())
    raw["processor"][0] = raw["vision_language_encoder"][0] = "glm_image"  # what diffusers itself writes
    (copy / "model_index.json").write_text(json.dumps(raw))
    for directory in (path, copy):
        pipe = GlmImagePipeline.from_pretrained(directory)
        assert isinstance(pipe.processor, GlmImageProcessor)
        assert isinstance(pipe.vision_language_encoder, GlmImageForConditionalGeneration)


def test_glm_image_stop_token_cannot_be_sampled(glm):
    _, pipe = glm
    ar = pipe.vision_language_encoder
    codebook = ar.config.vq_config.num_embeddings
    assert ar.config.text_config.vision_vocab_size == codebook
    assert pipe.transformer.config.prior_vq_quantizer_codebook_size == codebook
    assert ar.generation_config.eos_token_id == ar.config.image_end_token_id >= codebook
    assert pipe.processor.tokenizer.bos_token_id == ar.config.image_start_token_id


def test_glm_image_text_to_image(glm):
    from glm_training.models.tiny.glm_image import tiny_glm_image_call_kwargs

    _, pipe = glm
    prior, _, _ = pipe.generate_prior_tokens("a red cat", 64, 96, device=torch.device("cpu"),
                                             generator=torch.Generator().manual_seed(0))
    assert prior.shape == (1, (64 // 32) * (96 // 32) * 4)  # (H/32)*(W/32) AR tokens, upsampled 2x
    kwargs = tiny_glm_image_call_kwargs(64, 96)
    image = generate(pipe, prompt="a red cat", **kwargs)
    assert image.shape == (1, 64, 96, 3)
    np.testing.assert_array_equal(image, generate(pipe, prompt="a red cat", **kwargs))


def test_glm_image_image_to_image_with_the_fix(glm):
    from glm_training.models.tiny.glm_image import tiny_glm_image_call_kwargs

    _, pipe = glm
    kwargs = tiny_glm_image_call_kwargs(64, 64)
    image = generate(pipe, image=[pattern(64, 64, 0)], prompt="make it blue", **kwargs)
    assert image.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(image, generate(pipe, image=[pattern(64, 64, 0)], prompt="make it blue", **kwargs))
    assert not np.allclose(image, generate(pipe, image=[pattern(64, 64, 1)], prompt="make it blue", **kwargs))
    # Several condition images of different sizes.
    several = generate(pipe, image=[pattern(64, 64, 0), pattern(96, 64, 2)], prompt="make it blue",
                       **tiny_glm_image_call_kwargs(32, 64))
    assert several.shape == (1, 32, 64, 3)


@pytest.mark.xfail(
    raises=RuntimeError, strict=True,
    reason="Known upstream bug (diffusers 0.42.1 + transformers 5.23): GlmImagePipeline image-to-image "
           "concatenates per-image feature maps before VQ tokenization. If this XPASSes, upstream fixed it: "
           "FixedGlmImagePipeline in glm_training/models/glm_image_support.py can be retired.")
def test_stock_glm_image_pipeline_image_to_image_is_still_broken_upstream(glm):
    from diffusers import GlmImagePipeline

    from glm_training.models.tiny.glm_image import tiny_glm_image_call_kwargs

    _, fixed = glm
    stock = GlmImagePipeline(**fixed.components)
    stock.set_progress_bar_config(disable=True)
    generate(stock, image=[pattern(64, 64, 0)], prompt="make it blue", **tiny_glm_image_call_kwargs(64, 64))


def test_image_tokens_per_image_match_what_the_ar_model_reads(glm):
    from glm_training.models.glm_image_support import image_tokens_per_image, upsample_image_tokens

    _, pipe = glm
    ar, processor = pipe.vision_language_encoder, pipe.processor
    images = [pattern(64, 64, 0), pattern(96, 64, 1), pattern(128, 128, 2)]
    tokens = image_tokens_per_image(ar, processor, images)
    assert [t.numel() for t in tokens] == [(img.height // 32) * (img.width // 32) for img in images] == [4, 6, 16]
    codebook = ar.config.vq_config.num_embeddings
    assert all(t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < codebook for t in tokens)
    assert len(torch.cat(tokens).unique()) > 1

    # Same answer from packed pixel values + grids.
    features = processor.image_processor(images=images, return_tensors="pt")
    again = image_tokens_per_image(ar, features["pixel_values"], features["image_grid_thw"])
    assert all(torch.equal(a, b) for a, b in zip(tokens, again))

    # The AR model's own expectation: one `<|image|>` placeholder per token, and substituting our
    # tokens for the placeholders gives the model exactly the input it builds itself.
    messages = [[{"role": "user", "content": [{"type": "image", "image": img} for img in images]
                  + [{"type": "text", "text": "make it blue"}]}]]
    inputs = processor.apply_chat_template(messages, tokenize=True, target_h=64, target_w=64,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"][0]
    starts = (ids == ar.config.image_start_token_id).nonzero().view(-1).tolist()
    ends = (ids == ar.config.image_end_token_id).nonzero().view(-1).tolist()
    placeholders = [int((ids[s + 1:e] == processor.image_token_id).sum()) for s, e in zip(starts, ends)]
    assert placeholders == [t.numel() for t in tokens]
    with torch.no_grad():
        model_view = ar(**inputs).logits
        substituted = inputs["input_ids"].clone()
        substituted[substituted == processor.image_token_id] = torch.cat(tokens)
        ours = ar(input_ids=substituted, attention_mask=inputs["attention_mask"],
                  image_grid_thw=inputs["image_grid_thw"], images_per_sample=inputs["images_per_sample"]).logits
    torch.testing.assert_close(ours, model_view)

    up = upsample_image_tokens(tokens[1], 2, 3)
    assert up.shape == (24,) and torch.equal(up.view(4, 6)[::2, ::2].reshape(-1), tokens[1])

    with pytest.raises(ValueError, match="num_images, 3"):
        image_tokens_per_image(ar, features["pixel_values"], torch.tensor([2, 2]))


def test_fix_glm_image_pipeline_shares_components_and_saves_the_upstream_layout(glm, tmp_path):
    from diffusers import DiffusionPipeline, GlmImagePipeline

    from glm_training.models.glm_image_support import FixedGlmImagePipeline, fix_glm_image_pipeline

    _, fixed = glm
    stock = GlmImagePipeline(**fixed.components)
    converted = fix_glm_image_pipeline(stock)
    assert isinstance(converted, FixedGlmImagePipeline)
    assert converted.transformer is stock.transformer
    assert converted.vision_language_encoder is stock.vision_language_encoder
    assert fix_glm_image_pipeline(converted) is converted

    converted.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "GlmImagePipeline"
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "saved")) is GlmImagePipeline
    assert type(FixedGlmImagePipeline.from_pretrained(tmp_path / "saved")) is FixedGlmImagePipeline
