"""Tiny random-weight GLM-Image pipeline in the diffusers layout (same classes as zai-org/GLM-Image).

Components: `GlmImageTransformer2DModel` (DiT), `GlmImageForConditionalGeneration` (the AR model with
its vision tower and VQ image tokenizer), `GlmImageProcessor` (image processor + AR tokenizer + chat
template), a ByT5 glyph encoder (`T5EncoderModel` + `ByT5Tokenizer`), an 8x `AutoencoderKL` and the
flow-matching scheduler.

Token layout of the AR vocabulary, as in the real model: ids `0..CODEBOOK-1` are image tokens
(`<|dit_token_i|>`), `CODEBOOK` starts an image (the tokenizer's `bos`), `CODEBOOK+1` ends one
(`eos`). The AR head (`vision_vocab_size`) covers exactly the codebook, so a random model can only
emit valid image tokens and never the stop token: the pipeline always gets its full
16x16 preview + (H/32)*(W/32) target tokens (+1).

Sizes: height and width must be multiples of 32; condition images for image-to-image should be
multiples of 32 too (the AR side sees (H/32)x(W/32) tokens, the DiT side (H/16)x(W/16) patches;
the pipeline upsamples the former 2x). The processor's `min_pixels` is small (32x32) so small
images are not upscaled: the real processor's 512x512 minimum would upscale a tiny condition image
and break that correspondence. Image-to-image needs `FixedGlmImagePipeline`
(`glm_training.models.glm_image_support`) with diffusers 0.42.1 / transformers 5.23.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from glm_training.models.tiny.tokenizers import build_byt5_tokenizer, build_glm_image_tokenizer, glm_image_dit_token

CODEBOOK_SIZE = 128
GLYPH_HIDDEN = 32

# GLM-Image / CogView4 scheduler config: linear time shift, mu from the image sequence length.
GLM_IMAGE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.25,
    "max_shift": 0.75,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "linear",
}


def glm_image_chat_template(codebook_size: int = CODEBOOK_SIZE) -> str:
    """Chat template: images as `<start><|image|><end>`, then the text (the processor appends the
    target grid `<sop>h w<eop>` and the image-start token that generation continues from)."""
    start, end = glm_image_dit_token(codebook_size), glm_image_dit_token(codebook_size + 1)
    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}" + start + "<|image|>" + end +
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    )


def tiny_glm_image_call_kwargs(height: int = 64, width: int = 64, steps: int = 2) -> dict:
    """Keyword arguments for a tiny GLM-Image generation of exactly `height` x `width`."""
    if height % 32 or width % 32:
        raise ValueError(f"GLM-Image needs height and width divisible by 32, got {height}x{width}")
    return {"height": height, "width": width, "num_inference_steps": steps, "max_sequence_length": 64}


def build_glm_image_processor(out_dir: Path):
    from transformers import GlmImageImageProcessor, GlmImageProcessor

    tokenizer = build_glm_image_tokenizer(out_dir / "ar_tokenizer", codebook_size=CODEBOOK_SIZE)
    image_processor = GlmImageImageProcessor(
        patch_size=16, temporal_patch_size=1, merge_size=1,  # as the real processor
        min_pixels=32 * 32, max_pixels=2048 * 2048,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=glm_image_chat_template())
    processor.save_pretrained(out_dir / "processor")
    return GlmImageProcessor.from_pretrained(out_dir / "processor")


def build_tiny_glm_image(out_dir: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / "_tokenizer_src"
    torch.manual_seed(seed)

    glyph_tokenizer = build_byt5_tokenizer(staging / "byt5")
    processor = build_glm_image_processor(staging)
    ar_tokenizer = processor.tokenizer
    image_start, image_end = CODEBOOK_SIZE, CODEBOOK_SIZE + 1
    assert ar_tokenizer.bos_token_id == image_start and ar_tokenizer.eos_token_id == image_end

    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(glyph_tokenizer), d_model=GLYPH_HIDDEN, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=glyph_tokenizer.pad_token_id, eos_token_id=glyph_tokenizer.eos_token_id,
        decoder_start_token_id=glyph_tokenizer.pad_token_id))

    vision_hidden = 32
    ar_config = GlmImageConfig(
        text_config={
            "vocab_size": len(ar_tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "vision_vocab_size": CODEBOOK_SIZE,  # the AR head covers exactly the codebook
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1]},
            "pad_token_id": ar_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": image_end,
        },
        vision_config={
            "depth": 1,
            "hidden_size": vision_hidden,
            "num_heads": 2,
            "intermediate_size": 64,
            "image_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 1,
        },
        vq_config={"embed_dim": 16, "num_embeddings": CODEBOOK_SIZE, "latent_channels": vision_hidden},
        image_token_id=processor.image_token_id,
        image_start_token_id=image_start,
        image_end_token_id=image_end,
    )
    vision_language_encoder = GlmImageForConditionalGeneration(ar_config)
    generation_config = vision_language_encoder.generation_config
    generation_config.bos_token_id = image_start
    generation_config.eos_token_id = image_end
    generation_config.pad_token_id = ar_config.text_config.pad_token_id

    latent_channels = 16
    transformer = GlmImageTransformer2DModel(
        patch_size=2,  # with the 8x VAE: one DiT patch per 16 pixels, 2x2 patches per AR token
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        text_embed_dim=GLYPH_HIDDEN,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=CODEBOOK_SIZE,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 blocks: 8x downsampling like the real VAE
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
        latents_mean=[0.0] * latent_channels,
        latents_std=[1.0] * latent_channels,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**GLM_IMAGE_SCHEDULER_CONFIG)
    pipeline = GlmImagePipeline(
        tokenizer=glyph_tokenizer, processor=processor, text_encoder=text_encoder,
        vision_language_encoder=vision_language_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(staging)
    # diffusers 0.42.1 records the processor and AR model under library "glm_image"; record them
    # under "transformers" (where the classes live). Both spellings load with from_pretrained.
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("processor", "vision_language_encoder"):
        index[name] = ["transformers", index[name][1]]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir
