"""Tiny random-weight FLUX.1 Kontext pipeline in the diffusers layout (same classes as the real one).

Component settings that decide behaviour follow FLUX.1-Kontext-dev: 16 latent channels packed 2x2
(transformer `in_channels=64`), an 8x VAE (4 blocks) with FLUX's scaling/shift factors and no quant
convs, guidance embeddings, and the dynamic-shift flow-matching scheduler. Sizes are tiny.

Running it small (see `tiny_flux_kontext_call_kwargs`): height and width must be multiples of 16;
pass `max_area=height * width` (otherwise the pipeline generates about 1024x1024 whatever size you
ask) and `_auto_resize=False` (otherwise a control image is resized to about one megapixel).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from glm_training.models.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer, clip_vocab_size

# FLUX.1 VAE latent normalisation and the Kontext-dev scheduler config.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
FLUX_KONTEXT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def tiny_flux_kontext_call_kwargs(height: int = 64, width: int = 64, steps: int = 2) -> dict:
    """Keyword arguments that make `FluxKontextPipeline` generate exactly `height` x `width`."""
    if height % 16 or width % 16:
        raise ValueError(f"FLUX Kontext needs height and width divisible by 16, got {height}x{width}")
    return {"height": height, "width": width, "max_area": height * width, "_auto_resize": False,
            "num_inference_steps": steps, "max_sequence_length": 32}


def build_tiny_flux_kontext(out_dir: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip_hidden, t5_hidden, latent_channels = 32, 32, 16

    staging = out_dir / "_tokenizer_src"
    clip_tokenizer = CLIPTokenizer.from_pretrained(build_clip_tokenizer(staging / "clip"))
    t5_tokenizer = build_t5_tokenizer(staging / "t5")

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab_size(), hidden_size=clip_hidden, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=clip_hidden, hidden_act="quick_gelu",
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=t5_hidden, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latents are packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_hidden,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=True,  # Kontext dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 blocks: 8x downsampling like FLUX
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_KONTEXT_SCHEDULER_CONFIG)
    pipeline = FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(staging)
    # Record the T5 tokenizer like black-forest-labs/FLUX.1-Kontext-dev does (`T5TokenizerFast`,
    # an alias of `T5Tokenizer` in transformers 5), so loading follows the real checkpoint's path.
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir
