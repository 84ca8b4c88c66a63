"""Tiny random-weight Qwen-Image pipelines (text-to-image, Edit, Edit-Plus) in the diffusers layout.

Same classes and on-disk layout as Qwen/Qwen-Image, Qwen/Qwen-Image-Edit and Qwen-Image-Edit-2509:
`QwenImageTransformer2DModel`, `AutoencoderKLQwenImage` (8x, 16 latent channels, the real latent
mean/std), a `Qwen2_5_VLForConditionalGeneration` text encoder with its vision tower, a byte-level
`Qwen2Tokenizer`, a `Qwen2VLProcessor` (edit pipelines), and the dynamic-shift scheduler.

The tokenizer gives the pipelines' prompt templates the same token counts as the real Qwen2
vocabulary: the pipelines drop the first 34 (text-to-image) or 64 (edit) template tokens of the
text-encoder output, so any other count would silently change the conditioning.

Sizes: height and width must be multiples of 16. The edit pipelines always rescale the condition
image to about 1024x1024 for the VAE (module constant / hard-coded area in diffusers 0.42.1, not
configurable), so a tiny edit still encodes and attends over a ~1 Mpixel condition image (a few
seconds on CPU). The vision-language side is kept cheap by the processor's `max_pixels`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from glm_training.models.tiny.tokenizers import QWEN2_VL_SPECIAL_TOKENS, build_qwen2_tokenizer

# Qwen-Image's scheduler config (exponential time shift with terminal shift).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# The VL image processor resizes every condition image into this pixel range before the vision
# tower (real checkpoint: 3136..12845056). 56x56..112x112 -> 4..16 merged vision tokens.
TINY_VL_MIN_PIXELS = 56 * 56
TINY_VL_MAX_PIXELS = 112 * 112

TEXT_HIDDEN = 32


def tiny_qwen_image_call_kwargs(height: int = 64, width: int = 64, steps: int = 2) -> dict:
    """Keyword arguments for a tiny Qwen-Image(-Edit) generation of exactly `height` x `width`."""
    if height % 16 or width % 16:
        raise ValueError(f"Qwen-Image needs height and width divisible by 16, got {height}x{width}")
    return {"height": height, "width": width, "num_inference_steps": steps, "max_sequence_length": 64}


def _components(seed: int, staging: Path) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_qwen2_tokenizer(staging / "tokenizer")
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_HIDDEN // head_dim,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": special["<|endoftext|>"],
            "eos_token_id": special["<|im_end|>"],
            "pad_token_id": special["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "out_hidden_size": TEXT_HIDDEN,
        },
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 3 downsamples: 8x like the real VAE
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def _processor(tokenizer, staging: Path):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=TINY_VL_MIN_PIXELS, max_pixels=TINY_VL_MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=TINY_VL_MIN_PIXELS, max_pixels=TINY_VL_MAX_PIXELS)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    processor.save_pretrained(staging / "processor")
    return Qwen2VLProcessor.from_pretrained(staging / "processor")


def _build(pipeline_class_name: str, out_dir: Path, seed: int, with_processor: bool) -> Path:
    import diffusers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / "_tokenizer_src"
    components = _components(seed, staging)
    if with_processor:
        components["processor"] = _processor(components["tokenizer"], staging)
    pipeline = getattr(diffusers, pipeline_class_name)(**components)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(staging)
    return out_dir


def build_tiny_qwen_image(out_dir: Path, seed: int = 0) -> Path:
    return _build("QwenImagePipeline", out_dir, seed, with_processor=False)


def build_tiny_qwen_image_edit(out_dir: Path, seed: int = 0) -> Path:
    return _build("QwenImageEditPipeline", out_dir, seed, with_processor=True)


def build_tiny_qwen_image_edit_plus(out_dir: Path, seed: int = 0) -> Path:
    return _build("QwenImageEditPlusPipeline", out_dir, seed, with_processor=True)
