"""Load and save BAGEL in the official file layout, with strict tensor-name matching.

Official layout (ByteDance-Seed/BAGEL-7B-MoT; the official `app.py` loads `ema.safetensors` into
`Bagel` and `ae.safetensors` through `modeling/autoencoder.py:load_ae`):
`llm_config.json`, `vit_config.json`, `ema.safetensors` (every BAGEL tensor but the
autoencoder's: `language_model.*`, `vit_model.*`, `connector.*`, `vit_pos_embed.pos_embed`,
`time_embedder.*`, `vae2llm.*`, `llm2vae.*`, `latent_pos_embed.pos_embed`), `ae.safetensors`
(`encoder.*`, `decoder.*`) and the Qwen2 tokenizer files.

Every tensor of each file must map to exactly one parameter of our model with the same shape,
and every parameter must be found: anything else raises `BagelCheckpointError` naming the first
20 missing / unexpected / mis-shaped names and their counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from glm_training.models.bagel.config import (
    AE_WEIGHTS_FILE,
    EMA_WEIGHTS_FILE,
    BagelConfig,
    load_bagel_config,
    safetensors_shapes,
)
from glm_training.models.bagel.model import BagelModel
from glm_training.models.bagel.packing import SpecialTokens

VAE_PREFIX = "vae."
SHOWN = 20


class BagelCheckpointError(ValueError):
    """A checkpoint file does not match the model tensor for tensor."""


def expected_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(ema.safetensors names -> shapes, ae.safetensors names -> shapes) of a BagelModel."""
    ema, ae = {}, {}
    for name, tensor in model.state_dict().items():
        if name.startswith(VAE_PREFIX):
            ae[name[len(VAE_PREFIX):]] = tuple(tensor.shape)
        else:
            ema[name] = tuple(tensor.shape)
    return ema, ae


def check_names(file: Path | str, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise `BagelCheckpointError` unless `found` and `expected` have the same names and shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(name for name in set(found) & set(expected) if found[name] != expected[name])
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{file} does not match the BAGEL model strictly:"]
    if missing:
        lines.append(f"  {len(missing)} missing tensors (in the model, not in the file), first {SHOWN}:")
        lines += [f"    {name}" for name in missing[:SHOWN]]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected tensors (in the file, not in the model), first {SHOWN}:")
        lines += [f"    {name}" for name in unexpected[:SHOWN]]
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatches, first {SHOWN}:")
        lines += [f"    {name}: file {found[name]} vs model {expected[name]}" for name in mismatched[:SHOWN]]
    raise BagelCheckpointError("\n".join(lines))


def _read_tensors(path: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():
            tensors[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
    return tensors


def load_bagel(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               config: BagelConfig | None = None) -> BagelModel:
    """Build BAGEL from the official config files and load `ema.safetensors` + `ae.safetensors`
    strictly. The model comes back in eval mode with every parameter frozen."""
    model_dir = Path(model_dir)
    config = config or load_bagel_config(model_dir)
    device = torch.device(device)
    with torch.device("meta"):
        model = BagelModel(config)
    ema_expected, ae_expected = expected_shapes(model)
    ema_path, ae_path = model_dir / EMA_WEIGHTS_FILE, model_dir / AE_WEIGHTS_FILE
    check_names(ema_path, safetensors_shapes(ema_path), ema_expected)
    check_names(ae_path, safetensors_shapes(ae_path), ae_expected)
    state = _read_tensors(ema_path, dtype, device)
    state.update({VAE_PREFIX + name: tensor for name, tensor in _read_tensors(ae_path, dtype, device).items()})
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def _has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def save_bagel(model: BagelModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` in the official layout (config files, ema.safetensors, ae.safetensors and,
    when given, the tokenizer). A model with LoRA layers must be merged first (`merge_lora`)."""
    if _has_lora(model):
        raise ValueError("save_bagel: the model has LoRA layers; save them with save_lora, or merge_lora first.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in model.bagel_config.to_json_files().items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    ema, ae = {}, {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if name.startswith(VAE_PREFIX):
            ae[name[len(VAE_PREFIX):]] = tensor
        else:
            ema[name] = tensor
    save_file(ema, str(out_dir / EMA_WEIGHTS_FILE), metadata={"format": "pt"})
    save_file(ae, str(out_dir / AE_WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base Linear and remove the LoRA modules (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def load_bagel_tokenizer(model_dir: str | Path, config: BagelConfig | None = None):
    """The checkpoint's Qwen2 tokenizer and BAGEL's special token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    special = SpecialTokens.from_tokenizer(tokenizer)
    if config is not None and len(tokenizer) > config.llm.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
                         f"{config.llm.vocab_size}.")
    return tokenizer, special
