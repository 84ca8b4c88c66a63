"""Tiny random-weight CLIP (text + vision towers) in the Hugging Face layout, plus a LAION-style
aesthetic head for it.

The folder loads with `CLIPModel.from_pretrained`, `CLIPTokenizer.from_pretrained`,
`CLIPImageProcessor.from_pretrained` (and `CLIPProcessor`/`AutoProcessor`), exactly like
`openai/clip-vit-large-patch14`, so the `clip_score` and `aesthetic` rewards are tested through
their real loading path. `aesthetic_head.safetensors` holds a random MLP with the keys of LAION's
improved aesthetic predictor (see `glm_training.rewards.clip.AestheticHead`), sized for this
model's projection dimension.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from glm_training.models.tiny.tokenizers import build_clip_tokenizer, clip_vocab_size

#: Embedding size of the tiny CLIP's joint (projected) space.
TINY_CLIP_PROJECTION_DIM = 32
#: Side of the square image the tiny vision tower sees.
TINY_CLIP_IMAGE_SIZE = 32


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    from glm_training.rewards.clip import AestheticHead

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = clip_vocab_size()
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_CLIP_PROJECTION_DIM,
        hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1)
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, projection_dim=TINY_CLIP_PROJECTION_DIM,
        hidden_act="quick_gelu")
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=TINY_CLIP_PROJECTION_DIM)
    model = CLIPModel(config).eval()
    model.save_pretrained(out_dir)

    with tempfile.TemporaryDirectory() as source:
        tokenizer = CLIPTokenizer.from_pretrained(build_clip_tokenizer(source))
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": TINY_CLIP_IMAGE_SIZE}, resample=3,  # bicubic, like OpenAI
        do_center_crop=True, crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)

    head = AestheticHead(TINY_CLIP_PROJECTION_DIM)
    save_file({name: tensor.contiguous() for name, tensor in head.state_dict().items()},
              str(out_dir / "aesthetic_head.safetensors"))
    return out_dir
