"""Tiny random-weight SDXL pipeline in the diffusers layout (same classes as the real one)."""

from __future__ import annotations

from pathlib import Path

import torch

from glm_training.models.tiny.tokenizers import build_clip_tokenizer, clip_vocab_size


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text_hidden, projection_dim, time_embed_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        cross_attention_dim=2 * text_hidden,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon")
    text_config = CLIPTextConfig(
        vocab_size=clip_vocab_size(), hidden_size=text_hidden, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=projection_dim, hidden_act="gelu", bos_token_id=521, eos_token_id=522, pad_token_id=522)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    tokenizer_dir = build_clip_tokenizer(out_dir / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(out_dir)
    for leftover in (out_dir / "_tokenizer_src").iterdir():
        leftover.unlink()
    (out_dir / "_tokenizer_src").rmdir()
    return out_dir
