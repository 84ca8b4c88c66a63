"""A tiny random-weight BAGEL in the official file layout, for tests and the quickstart.

Same tensor names and config files as ByteDance-Seed/BAGEL-7B-MoT (`llm_config.json`,
`vit_config.json`, `ema.safetensors`, `ae.safetensors`, tokenizer files), at toy sizes: a 2-layer
MoT LM (hidden 64), a 2-layer ViT (patch 4, 8x8 position table), a 2-level FLUX-layout autoencoder
(downsample 2, 4 latent channels) and a byte-level Qwen2 tokenizer with BAGEL's special tokens.
It is written by `save_bagel` and read back by `load_bagel`, the loader of the real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glm_training.models.bagel.config import AEConfig, BagelConfig, LLMConfig, ViTConfig
from glm_training.models.bagel.loading import save_bagel
from glm_training.models.bagel.model import BagelModel, RMSNorm
from glm_training.models.bagel.packing import SPECIAL_TOKENS
from glm_training.models.tiny.tokenizers import bytes_to_unicode

TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
               ("r", "e"), ("a", "n"), ("Ġ", "c"), ("a", "t"), ("Ġ", "s"), ("o", "r")]


def tiny_bagel_config() -> BagelConfig:
    llm = LLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_theta=10000.0,
                    extra={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "float32",
                           "use_sliding_window": False, "attention_dropout": 0.0})
    # vit_config.json lists 3 layers; BAGEL keeps 2 (vit_select_layer = -2), as 27 -> 26 for SigLIP-so400m.
    vit = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=32, patch_size=4, extra={"model_type": "siglip_vision_model"})
    ae = AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    config = BagelConfig(llm=llm, vit=vit, ae=ae, latent_patch_size=2, max_latent_size=8,
                         vit_max_num_patch_per_side=8)
    config.validate()
    return config


def build_tiny_tokenizer(out_dir: Path):
    from transformers import Qwen2Tokenizer

    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    for first, second in TINY_MERGES:
        vocab.setdefault(first + second, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5: extra special tokens go in `extra_special_tokens`.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(TINY_MERGES),
                               extra_special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _init_tiny_weights(model: BagelModel, generator: torch.Generator) -> None:
    """Random stand-in for pretrained weights: N(0, 0.02) for every linear / embedding tensor of
    the transformer parts, ones for the norms; the autoencoder keeps PyTorch's seeded init.
    llm2vae (zero in the official init) gets N(0, 1/hidden) so that velocities have unit scale and
    depend on the LM, as in a trained model."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith("vae"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        model.llm2vae.weight.normal_(0.0, model.bagel_config.hidden_size ** -0.5, generator=generator)


def build_tiny_bagel(out_dir: Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_bagel_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BagelModel(config)
    _init_tiny_weights(model, torch.Generator().manual_seed(seed))
    tokenizer = build_tiny_tokenizer(out_dir)
    if len(tokenizer) > config.llm.vocab_size:
        raise AssertionError(f"tiny tokenizer ({len(tokenizer)}) exceeds vocab_size {config.llm.vocab_size}")
    save_bagel(model, out_dir)
    return out_dir
