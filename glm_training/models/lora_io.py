"""Writing and reading LoRA weights in the layouts other tools load.

- diffusers: `pytorch_lora_weights.safetensors` written by the pipeline class's own
  `save_lora_weights`, so `pipeline.load_lora_weights(dir)` loads it with no warnings.
- comfyui: kohya-style keys (`lora_unet_<module_path>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`) in `comfyui/pytorch_lora_weights.safetensors`, which ComfyUI, A1111 and diffusers load.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_PREFIX = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te1",
                "text_encoder_2": "lora_te2"}


def peft_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def lora_alpha(module: nn.Module) -> float:
    return float(module.peft_config["default"].lora_alpha)


def save_diffusers_lora(pipeline_class: Any, modules: dict[str, nn.Module], out_dir: Path,
                        save_format: str = "diffusers") -> list[Path]:
    from diffusers.utils import convert_state_dict_to_diffusers

    out_dir.mkdir(parents=True, exist_ok=True)
    accepted = inspect.signature(pipeline_class.save_lora_weights).parameters
    kwargs: dict[str, Any] = {}
    for name, module in modules.items():
        key = f"{name}_lora_layers"
        if key not in accepted:
            raise ValueError(f"{pipeline_class.__name__}.save_lora_weights cannot save {name} LoRA layers.")
        kwargs[key] = convert_state_dict_to_diffusers(peft_state_dict(module))
        if f"{name}_lora_adapter_metadata" in accepted:
            config = module.peft_config["default"].to_dict()
            config["target_modules"] = sorted(config.get("target_modules") or [])
            kwargs[f"{name}_lora_adapter_metadata"] = config
    pipeline_class.save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    written = [out_dir / LORA_WEIGHT_NAME]
    if save_format in ("comfyui", "both"):
        written.append(save_kohya_lora(modules, out_dir / "comfyui" / LORA_WEIGHT_NAME))
    return written


def save_kohya_lora(modules: dict[str, nn.Module], path: Path, kohya_prefix: dict[str, str] | None = None) -> Path:
    """`kohya_prefix` overrides KOHYA_PREFIX per component (FLUX: `lora_transformer`, the key
    style that diffusers' FLUX loader and ComfyUI map from diffusers module paths)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        prefix = (kohya_prefix or {}).get(name) or KOHYA_PREFIX.get(name, f"lora_{name}")
        for key, tensor in peft_state_dict(module).items():
            module_path, kind = key.rsplit(".lora_", 1)  # "<path>", "A.weight" / "B.weight"
            kohya = f"{prefix}_{module_path.replace('.', '_')}"
            direction = "lora_down" if kind.startswith("A") else "lora_up"
            state[f"{kohya}.{direction}.weight"] = tensor
            state[f"{kohya}.alpha"] = torch.tensor(lora_alpha(module))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    return path


def save_transformer_lora(pipeline_class: Any, transformer: nn.Module, out_dir: Path, save_format: str,
                          kohya_prefix: str, keep_targets: list[str]) -> list[Path]:
    """A transformer LoRA for a flow pipeline: `<Pipeline>.save_lora_weights` with peft key names
    (lora_A / lora_B, as diffusers' own FLUX / Qwen-Image training scripts save them) + adapter
    metadata, and with `save_format` comfyui/both a kohya file with `kohya_prefix` keys, checked to
    map back to exactly the same weights through `pipeline_class.lora_state_dict`."""
    from glm_training.config import ConfigError

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = transformer.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config.get("target_modules") or [])
    pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=peft_state_dict(transformer),
                                     transformer_lora_adapter_metadata=config, safe_serialization=True)
    written = [out_dir / LORA_WEIGHT_NAME]
    if save_format in ("comfyui", "both"):
        kohya = save_kohya_lora({"transformer": transformer}, out_dir / "comfyui" / LORA_WEIGHT_NAME,
                                {"transformer": kohya_prefix})
        converted = pipeline_class.lora_state_dict(load_file(str(kohya)))
        expected = set(load_file(str(written[0])))
        if set(converted) != expected:
            kohya.unlink()
            lost = sorted(expected - set(converted))[:3]
            raise ConfigError(f"lora.save_format: {save_format} - the kohya/ComfyUI layout of "
                              f"{pipeline_class.__name__} cannot represent some trained modules (e.g. {lost}); "
                              f"keep lora.target_modules to {keep_targets} or set lora.save_format: diffusers.")
        written.append(kohya)
    return written


def load_lora_into_modules(modules: dict[str, nn.Module], path: str | Path) -> None:
    """Load diffusers-layout LoRA weights (`<component>.<module>.lora_A.weight`) into modules
    that already carry an adapter; every module's LoRA tensors must be covered."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"lora.pretrained_weight: {path} does not exist.")
    state = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}."
        # diffusers writes `lora.down`/`lora.up`; peft names them `lora_A`/`lora_B`.
        part = convert_unet_state_dict_to_peft(
            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        if not part:
            raise ValueError(f"lora.pretrained_weight: {path} has no LoRA weights for {name} "
                             f"(keys start with {sorted({k.split('.')[0] for k in state})}).")
        expected = {k: v.shape for k, v in peft_state_dict(module).items()}
        wrong_shape = sorted(k for k in set(part) & set(expected) if part[k].shape != expected[k])
        if set(part) != set(expected) or wrong_shape:
            missing = sorted(set(expected) - set(part))[:3]
            extra = sorted(set(part) - set(expected))[:3]
            raise ValueError(f"lora.pretrained_weight: {path} does not match the LoRA of {name} "
                             f"(missing e.g. {missing}, unexpected e.g. {extra}, other shape e.g. "
                             f"{wrong_shape[:3]}); check lora.rank and lora.target_modules.")
        set_peft_model_state_dict(module, part)
