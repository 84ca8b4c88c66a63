"""LoRA on BAGEL's experts (peft), saved as safetensors in peft's adapter layout.

`component` picks the expert: `und` adapts the understanding projections of every LM layer
(`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`), `gen` the generation expert's
(`self_attn.{q,k,v,o}_proj_moe_gen`, `mlp_moe_gen.{gate,up,down}_proj`, the official names), `both`
all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

_SUFFIX = {"und": "", "gen": "_moe_gen", "both": "(_moe_gen)?"}


def lora_target_modules(component: str) -> str:
    """A peft `target_modules` regex (matched against full module names) for an expert."""
    if component not in _SUFFIX:
        raise ValueError(f"component must be one of {sorted(_SUFFIX)}, got {component!r}.")
    suffix = _SUFFIX[component]
    # Official names: self_attn.q_proj_moe_gen (suffix on the projection), mlp_moe_gen.gate_proj (on the MLP).
    return (rf"language_model\.model\.layers\.\d+\."
            rf"(self_attn\.(q|k|v|o)_proj{suffix}|mlp{suffix}\.(gate|up|down)_proj)")


def make_lora_config(component: str, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
                     init_lora_weights: bool | str = True) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init_lora_weights,
                      target_modules=lora_target_modules(component))


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
    """Inject LoRA layers in place; only the LoRA weights stay trainable."""
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"LoRA target_modules {config.target_modules!r} matched no module of the model.")


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("The model has no LoRA adapter.")
    for layer in layers:
        layer.enable_adapters(enabled)


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_lora(model: nn.Module, out_dir: str | Path, adapter_name: str = "default") -> list[Path]:
    """Write `adapter_model.safetensors` and `adapter_config.json` (peft layout)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, adapter_name).items()}
    weights = out_dir / ADAPTER_WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": "pt"})
    config = model.peft_config[adapter_name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config_path = out_dir / ADAPTER_CONFIG_FILE
    config_path.write_text(json.dumps(config, indent=2, default=str))
    return [weights, config_path]


def load_lora(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Inject (if needed) and load an adapter written by `save_lora`; every tensor must fit."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights_path = folder / ADAPTER_WEIGHTS_FILE if path.is_dir() else path
    state = load_file(str(weights_path))
    config_path = folder / ADAPTER_CONFIG_FILE
    if adapter_name not in getattr(model, "peft_config", {}):
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: cannot rebuild the LoRA layers for {weights_path}.")
        config = LoraConfig.from_pretrained(str(folder))
        add_lora(model, config, adapter_name)
    elif config_path.is_file():
        # Weights copied into an existing adapter keep its lora_alpha: it must be the file's.
        from glm_training.models.lora_io import check_pretrained_alpha

        check_pretrained_alpha(model, json.loads(config_path.read_text()).get("lora_alpha"), weights_path,
                               "bagel", adapter_name)
    expected = set(lora_state_dict(model, adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit the model's LoRA layers: {len(missing)} missing "
                         f"(e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]}).")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
