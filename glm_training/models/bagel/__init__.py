"""BAGEL (ByteDance-Seed/BAGEL-7B-MoT): our implementation, loading the official checkpoint files.

- `load_bagel(model_dir, dtype, device)` / `save_bagel(model, out_dir)`: official layout, strict names.
- `BagelModel.forward_losses(packed_batch)`: text CE and flow-matching MSE, token-normalised.
- `pack_samples(...)`: samples -> packed sequence with per-sample attention masks.
- `load_bagel_samples(paths)`: seed-004 JSON / JSONL data files.
- `BagelSampler` / `generate_image`: text-to-image and editing (flow ODE + CFG), `generate_text`.
- `make_lora_config(component)`, `save_lora`, `load_lora`: LoRA on the und / gen experts.
- `build_tiny_bagel(out_dir, seed)`: a tiny random BAGEL in the official layout.
"""

from glm_training.models.bagel.config import BagelConfig, BagelConfigError, load_bagel_config
from glm_training.models.bagel.data import BagelDataError, load_bagel_samples
from glm_training.models.bagel.generate import BagelSampler, generate_image
from glm_training.models.bagel.loading import (
    BagelCheckpointError,
    load_bagel,
    load_bagel_tokenizer,
    merge_lora,
    save_bagel,
)
from glm_training.models.bagel.lora import load_lora, lora_target_modules, make_lora_config, save_lora
from glm_training.models.bagel.model import COMPONENTS, BagelModel
from glm_training.models.bagel.packing import (
    BagelSample,
    ImageResize,
    PackedBatch,
    PackingConfig,
    SpecialTokens,
    TextItem,
    VaeImageItem,
    VitImageItem,
    build_pack_attention_mask,
    build_sample_attention_mask,
    pack_samples,
)
from glm_training.models.bagel.tiny import build_tiny_bagel

__all__ = [
    "COMPONENTS", "BagelCheckpointError", "BagelConfig", "BagelConfigError", "BagelDataError", "BagelModel",
    "BagelSample", "BagelSampler", "ImageResize", "PackedBatch", "PackingConfig", "SpecialTokens", "TextItem",
    "VaeImageItem", "VitImageItem", "build_pack_attention_mask", "build_sample_attention_mask",
    "build_tiny_bagel", "generate_image", "load_bagel", "load_bagel_config", "load_bagel_samples",
    "load_bagel_tokenizer", "load_lora", "lora_target_modules", "make_lora_config", "merge_lora", "pack_samples",
    "save_bagel", "save_lora",
]
