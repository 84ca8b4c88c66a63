"""Tiny random-weight models for prompt-policy GRPO, saved in the real on-disk layouts:

- `prompt_policy_lm`: a Qwen2-style causal LM (`Qwen2ForCausalLM`) with a byte-level BPE
  `Qwen2Tokenizer` and a Qwen2.5 chat template (loads with `AutoModelForCausalLM` /
  `AutoTokenizer`, like Qwen/Qwen2.5-0.5B-Instruct);
- `prompt_policy_vl`: a Qwen2.5-VL model (`Qwen2_5_VLForConditionalGeneration`) with its
  `Qwen2_5_VLProcessor` (image processor + the same tokenizer), like Qwen/Qwen2.5-VL-3B-Instruct;
- `sd3`: a `StableDiffusion3Pipeline` (SD3 transformer, VAE, two CLIP text encoders and T5),
  the seed's generator, which has no training family here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from glm_training.models.tiny.tokenizers import (
    COMMON_PROMPT_TEXT,
    QWEN2_VL_SPECIAL_TOKENS,
    build_clip_tokenizer,
    build_t5_tokenizer,
    byte_level_bpe_vocab,
    clip_vocab_size,
)

#: Qwen2.5's chat template, also rendering image parts of a message ({"type": "image"}) as
#: Qwen2-VL does (vision_start, image_pad, vision_end); the default system turn is Qwen's.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

POLICY_CORPUS = [
    COMMON_PROMPT_TEXT,
    "system user assistant You are a helpful assistant. Rewrite the prompt for an image generator. "
    "Answer with the rewritten prompt only. detailed bright dark vivid photo painting light shadow glow "
    "sunny night white black golden <prompt> </prompt>",
]


def build_policy_tokenizer(out_dir: Path):
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe_vocab(POLICY_CORPUS, QWEN2_VL_SPECIAL_TOKENS)
    for token in QWEN2_VL_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=list(merges), unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
        model_max_length=4096, errors="replace")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return Qwen2Tokenizer.from_pretrained(out_dir)


def _text_config_kwargs(tokenizer) -> dict:
    vocab = len(tokenizer)
    return dict(vocab_size=vocab + (-vocab) % 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = _text_config_kwargs(tokenizer)
    return GenerationConfig(eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"], do_sample=True)


#: Weight init std of the tiny policy LM (see build_tiny_policy_lm).
POLICY_INIT_RANGE = 0.3


def build_tiny_policy_lm(out_dir: Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_policy_tokenizer(out_dir)
    torch.manual_seed(seed)
    # With the usual 0.02 init, a 32-wide model with tied embeddings gives logits of std 0.1 whose
    # largest reachable value is |norm(h)| * |E_v| ~ 0.6: no change of the hidden state (all a LoRA
    # can move) can make one token likely, and the policy cannot learn. 0.3 gives logits of std ~1.7
    # (entropy 5.2 of 6.4 nats, like a peaked pretrained LM) whose reachable range is ~10.
    model = Qwen2ForCausalLM(Qwen2Config(**_text_config_kwargs(tokenizer), tie_word_embeddings=True,
                                         initializer_range=POLICY_INIT_RANGE)).eval()
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out_dir)
    return out_dir


#: Side of the images the tiny VL processor resizes to (2x2 merged vision tokens).
TINY_VL_IMAGE_SIDE = 56


def build_tiny_policy_vl(out_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_policy_tokenizer(out_dir)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = _text_config_kwargs(tokenizer)
    # mrope sections sum to head_dim / 2 (32 / 4 heads = 8 -> 4)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  in_channels=3)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out_dir)
    side = TINY_VL_IMAGE_SIDE
    image_processor = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                        chat_template=CHAT_TEMPLATE).save_pretrained(out_dir)
    return out_dir


def build_tiny_sd3(out_dir: Path, seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip_hidden, t5_hidden = 16, 32  # prompt embeds: [clip_1; clip_2] (32) next to T5 (32)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=t5_hidden, caption_projection_dim=16, pooled_projection_dim=2 * clip_hidden,
        out_channels=4, pos_embed_max_size=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    text_config = CLIPTextConfig(
        vocab_size=clip_vocab_size(), hidden_size=clip_hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=clip_hidden, hidden_act="gelu",
        bos_token_id=521, eos_token_id=522, pad_token_id=522)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(text_config), CLIPTextModelWithProjection(text_config)
    staging = out_dir / "_tokenizer_src"
    tokenizer = CLIPTokenizer.from_pretrained(build_clip_tokenizer(staging / "clip"))
    tokenizer_3 = build_t5_tokenizer(staging / "t5")
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=t5_hidden, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    # Random init leaves the prompt almost no say over the image; a trained SD3's text strongly
    # shapes it. Scale the pooled-text path so a rewrite visibly changes what is rendered.
    with torch.no_grad():
        for linear in (transformer.time_text_embed.text_embedder.linear_1,
                       transformer.time_text_embed.text_embedder.linear_2, transformer.norm_out.linear,
                       transformer.proj_out, text_encoder.text_projection, text_encoder_2.text_projection):
            linear.weight.mul_(3.0)
    pipeline.save_pretrained(out_dir)
    shutil.rmtree(staging)
    return out_dir
