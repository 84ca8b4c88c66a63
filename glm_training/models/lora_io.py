"""Writing and reading LoRA weights in the layouts other tools load.

- diffusers: `pytorch_lora_weights.safetensors` written by the pipeline class's own
  `save_lora_weights`, so `pipeline.load_lora_weights(dir)` loads it with no warnings. The adapter
  config (rank, `lora_alpha`, targets) travels in the file's `lora_adapter_metadata`.
- comfyui: kohya-style keys (`lora_unet_<module_path>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`) in `comfyui/pytorch_lora_weights.safetensors`, which ComfyUI, A1111 and diffusers load.

Module paths are written in their canonical (checkpoint) form: transformers 5 flattened
`CLIPTextModel` (no `text_model.` level), but kohya / ComfyUI / A1111 and older diffusers name its
layers `text_model.encoder.layers.<i>...`, so that level is put back on save and dropped on load.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_PREFIX = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te1",
                "text_encoder_2": "lora_te2"}
#: The CLIP text-encoder modules ComfyUI maps from `lora_te1_` / `lora_te2_` keys
#: (`comfy/lora.py` LORA_CLIP_MAP, per encoder layer); any other text-encoder module is dropped there.
COMFYUI_CLIP_MODULE = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def checkpoint_prefix(module: nn.Module) -> str:
    """What the module's own parameter paths lack against their canonical checkpoint names:
    `text_model.` for a transformers-5 `CLIPTextModel` (its checkpoint keys keep that level)."""
    try:
        from transformers import CLIPTextModel
    except ImportError:  # transformers is a hard requirement; keep this module importable without it
        return ""
    if isinstance(module, CLIPTextModel) and not hasattr(module, "text_model"):
        return "text_model."
    return ""


def peft_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's LoRA tensors (peft names, `<path>.lora_A.weight`) under canonical module paths."""
    from peft.utils import get_peft_model_state_dict

    prefix = checkpoint_prefix(module)
    return {prefix + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(module).items()}


def lora_alpha(module: nn.Module) -> float:
    return float(module.peft_config["default"].lora_alpha)


def adapter_metadata(module: nn.Module) -> dict[str, Any]:
    """The adapter's peft config as diffusers stores it in `lora_adapter_metadata` (JSON-safe)."""
    config = module.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


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
            kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(module)
    if save_format in ("comfyui", "both"):
        check_comfyui_modules(modules)  # before writing anything: a run must not end with half its files
    pipeline_class.save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    written = [out_dir / LORA_WEIGHT_NAME]
    if save_format in ("comfyui", "both"):
        written.append(save_kohya_lora(modules, out_dir / "comfyui" / LORA_WEIGHT_NAME))
    return written


def check_comfyui_modules(modules: dict[str, nn.Module]) -> None:
    """Text-encoder LoRA modules ComfyUI would silently drop (it maps only CLIP attention and MLP
    projections) stop the kohya export with the config keys to change."""
    from glm_training.config import ConfigError

    for name, module in modules.items():
        if not KOHYA_PREFIX.get(name, "").startswith("lora_te"):
            continue
        paths = sorted({key.rsplit(".lora_", 1)[0] for key in peft_state_dict(module)})
        unmapped = [p for p in paths if not COMFYUI_CLIP_MODULE.fullmatch(p)]
        if unmapped:
            raise ConfigError(f"lora.save_format: comfyui - ComfyUI maps only the q/k/v/out projections and "
                              f"mlp.fc1/fc2 of {name}'s layers, the LoRA also adapts {unmapped[:3]}; keep "
                              f"lora.text_encoder_target_modules to [q_proj, k_proj, v_proj, out_proj, fc1, fc2] "
                              f"or set lora.save_format: diffusers.")


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
            # ComfyUI / kohya scale by alpha / rank with rank = lora_down's rows, as peft does.
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
    pipeline_class.save_lora_weights(out_dir, transformer_lora_layers=peft_state_dict(transformer),
                                     transformer_lora_adapter_metadata=adapter_metadata(transformer),
                                     safe_serialization=True)
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


# ------------------------------------------------------------------------------------------------
# Reading


def diffusers_lora_metadata(path: Path) -> dict[str, Any]:
    """The `lora_adapter_metadata` diffusers keeps in a LoRA file (`<component>.lora_alpha`, ...),
    or {} for a file without it."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    return json.loads(raw) if raw else {}


def check_pretrained_alpha(module: nn.Module, file_alpha: float | None, path: Path, name: str,
                           adapter_name: str = "default") -> None:
    """Copying weights into an adapter keeps the run's `lora_alpha`: the loaded change would be
    (run alpha / file alpha) times the trained one. Refuse unless they agree."""
    from glm_training.config import ConfigError

    if file_alpha is None:
        return
    config = module.peft_config[adapter_name]
    if float(config.lora_alpha) != float(file_alpha):
        raise ConfigError(f"lora.pretrained_weight: {path} was trained with lora_alpha {float(file_alpha):g}, this "
                          f"run's LoRA of {name} has alpha {float(config.lora_alpha):g} (the loaded change would "
                          f"be scaled by {float(config.lora_alpha) / float(file_alpha):g}); set lora.alpha "
                          f"(or lora.components.{name}.alpha) to {float(file_alpha):g}.")


def load_lora_into_modules(modules: dict[str, nn.Module], path: str | Path) -> None:
    """Load diffusers-layout LoRA weights (`<component>.<module>.lora_A.weight`) into modules
    that already carry an adapter; every module's LoRA tensors must be covered and its rank and
    alpha must be the file's (from its `lora_adapter_metadata`), so the loaded change is the trained one."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    def to_peft(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # diffusers writes UNet / transformer LoRA as `lora.down`/`lora.up` (or peft's names) and
        # text-encoder LoRA as `lora_linear_layer.down`/`.up`; peft names them `lora_A`/`lora_B`.
        if any(".lora_linear_layer." in k for k in part):
            return convert_state_dict_to_peft(part)
        return convert_unet_state_dict_to_peft(part)

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"lora.pretrained_weight: {path} does not exist.")
    state = load_file(str(path))
    metadata = diffusers_lora_metadata(path)
    for name, module in modules.items():
        prefix = f"{name}."
        part = to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        if not part:
            raise ValueError(f"lora.pretrained_weight: {path} has no LoRA weights for {name} "
                             f"(keys start with {sorted({k.split('.')[0] for k in state})}).")
        canonical = checkpoint_prefix(module)
        # Files from before the canonical names (or from other tools) may lack the `text_model.` level.
        part = {k if not canonical or k.startswith(canonical) else canonical + k: v for k, v in part.items()}
        expected = {k: v.shape for k, v in peft_state_dict(module).items()}
        wrong_shape = sorted(k for k in set(part) & set(expected) if part[k].shape != expected[k])
        if set(part) != set(expected) or wrong_shape:
            missing = sorted(set(expected) - set(part))[:3]
            extra = sorted(set(part) - set(expected))[:3]
            raise ValueError(f"lora.pretrained_weight: {path} does not match the LoRA of {name} "
                             f"(missing e.g. {missing}, unexpected e.g. {extra}, other shape e.g. "
                             f"{wrong_shape[:3]}); check lora.rank and lora.target_modules.")
        check_pretrained_alpha(module, metadata.get(f"{name}.lora_alpha"), path, name)
        set_peft_model_state_dict(module, {k[len(canonical):]: v for k, v in part.items()})


def load_lora_adapter_file(model: nn.Module, path: str | Path, prefix: str, adapter_name: str = "default") -> None:
    """`model.load_lora_adapter` for one safetensors file with its `lora_adapter_metadata` read:
    without `weight_name` diffusers skips the metadata and `lora_alpha` falls back to the rank."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a LoRA safetensors file).")
    model.load_lora_adapter(str(path.parent), weight_name=path.name, use_safetensors=True, prefix=prefix,
                            adapter_name=adapter_name)
    alpha = diffusers_lora_metadata(path).get(f"{prefix}.lora_alpha")
    loaded = getattr(model, "peft_config", {}).get(adapter_name)
    if alpha is not None and loaded is not None and float(loaded.lora_alpha) != float(alpha):
        # Guards the silent fallback above against a diffusers version that changes it again.
        raise RuntimeError(f"{path}: diffusers loaded lora_alpha {loaded.lora_alpha}, the file says {alpha}; "
                           f"this diffusers version does not read LoRA metadata as expected (pin requirements.txt).")
