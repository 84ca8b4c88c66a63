"""BAGEL configuration, read from the files of an official checkpoint folder.

An official BAGEL folder (e.g. ByteDance-Seed/BAGEL-7B-MoT) holds `llm_config.json` (Qwen2
style), `vit_config.json` (SigLIP style), `ema.safetensors` (everything but the autoencoder),
`ae.safetensors` (FLUX's autoencoder) and the Qwen2 tokenizer files. It holds no file with the
BAGEL-level settings: the official scripts pass them in code. Facts used here, from the
official repository github.com/ByteDance-Seed/Bagel:

- `modeling/bagel/bagel.py` (`BagelConfig`): the BAGEL-level settings and their defaults
  (latent_patch_size=2, max_latent_size=32, vit_max_num_patch_per_side=70,
  connector_act="gelu_pytorch_tanh", interpolate_pos=False, timestep_shift=1.0).
- `app.py` and `inference.ipynb` (how the released checkpoint is built): the LLM config is
  overridden with qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer";
  the ViT config with rope=False and num_hidden_layers - 1; max_latent_size=64.
- `train/pretrain_unified_navit.py`: vit_select_layer=-2 (the model keeps
  num_hidden_layers + 1 + vit_select_layer ViT layers), timestep_shift (default 1.0), and the
  conditioning dropout probabilities (text 0.1, ViT 0.3, VAE 0.3).
- `modeling/autoencoder.py` (`load_ae`): the FLUX autoencoder parameters (ch=128,
  ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16, scale_factor=0.3611,
  shift_factor=0.1159, downsample=8), hard-coded there.
- `modeling/bagel/qwen2_navit.py` (`Qwen2Config`) and `modeling/bagel/siglip_navit.py`
  (`SiglipVisionConfig`): the defaults of keys absent from the JSON files.

Because the folder has no BAGEL-level file, `load_bagel_config` takes max_latent_size and
vit_max_num_patch_per_side from the shapes of `latent_pos_embed.pos_embed` and
`vit_pos_embed.pos_embed` in `ema.safetensors`, and the autoencoder layout from the shapes in
`ae.safetensors`. An optional `bagel_config.json` (our addition, written by `save_bagel` when a
setting differs from the official default) overrides the BAGEL-level settings.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import safe_open

LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
BAGEL_CONFIG_FILE = "bagel_config.json"
EMA_WEIGHTS_FILE = "ema.safetensors"
AE_WEIGHTS_FILE = "ae.safetensors"

#: The only decoder layout this implementation builds (the released BAGEL-7B-MoT's).
MOT_LAYER_MODULE = "Qwen2MoTDecoderLayer"


class BagelConfigError(ValueError):
    """A BAGEL config file is missing, unreadable or describes something we do not build."""


@dataclass
class LLMConfig:
    """The Qwen2 language model (`llm_config.json`). Defaults: official `Qwen2Config`."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Forced by app.py / the training script for the released model:
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    layer_module: str = MOT_LAYER_MODULE
    #: Every other key of the file, kept so that saving writes the file back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        # The official Qwen2Attention derives it from hidden_size (it ignores a `head_dim` key).
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LLMConfig:
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling not in (None, {}) and (rope_scaling.get("rope_type", rope_scaling.get("type"))
                                               not in (None, "default")):
            raise BagelConfigError(f"{LLM_CONFIG_FILE}: rope_scaling {rope_scaling!r} is not supported "
                                   "(the released BAGEL uses plain RoPE).")
        known = {f.name for f in fields(cls)} - {"extra", "qk_norm", "tie_word_embeddings", "layer_module"}
        values = {name: raw[name] for name in known if name in raw}
        config = cls(**values, extra={k: v for k, v in raw.items() if k not in known})
        config.validate()
        return config

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise BagelConfigError(f"{LLM_CONFIG_FILE}: hidden_size {self.hidden_size} is not divisible by "
                                   f"num_attention_heads {self.num_attention_heads}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise BagelConfigError(f"{LLM_CONFIG_FILE}: num_attention_heads {self.num_attention_heads} is not "
                                   f"a multiple of num_key_value_heads {self.num_key_value_heads}.")
        if self.head_dim % 2:
            raise BagelConfigError(f"{LLM_CONFIG_FILE}: head_dim {self.head_dim} must be even for RoPE.")

    def to_dict(self) -> dict[str, Any]:
        raw = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                raw[f.name] = getattr(self, f.name)
        raw.setdefault("model_type", "qwen2")
        return raw


@dataclass
class ViTConfig:
    """The SigLIP NaViT encoder (`vit_config.json`). Defaults: official `SiglipVisionConfig`."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    #: Which hidden layer BAGEL uses (training script default -2): the model keeps
    #: num_hidden_layers + 1 + select_layer encoder layers (26 of the 27 of SigLIP-so400m).
    select_layer: int = -2
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_model_layers(self) -> int:
        return self.num_hidden_layers + 1 + self.select_layer

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in fields(cls)} - {"extra", "select_layer"}
        values = {name: raw[name] for name in known if name in raw}
        # `rope` is forced to False by app.py (learned position embeddings); drop it.
        extra = {k: v for k, v in raw.items() if k not in known and k != "rope"}
        config = cls(**values, extra=extra)
        if config.hidden_size % config.num_attention_heads:
            raise BagelConfigError(f"{VIT_CONFIG_FILE}: hidden_size is not divisible by num_attention_heads.")
        if config.num_model_layers < 1:
            raise BagelConfigError(f"{VIT_CONFIG_FILE}: num_hidden_layers {config.num_hidden_layers} leaves no "
                                   "layer after dropping the last one (vit_select_layer=-2).")
        return config

    def to_dict(self) -> dict[str, Any]:
        raw = dict(self.extra)
        for f in fields(self):
            if f.name not in ("extra", "select_layer"):
                raw[f.name] = getattr(self, f.name)
        raw.setdefault("model_type", "siglip_vision_model")
        return raw


@dataclass
class AEConfig:
    """FLUX's autoencoder. Defaults: official `load_ae` (the layout is read from ae.safetensors)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_weight_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> AEConfig:
        """Infer the layout from the tensor shapes of an `ae.safetensors` file."""
        try:
            conv_in = shapes["encoder.conv_in.weight"]
            ch, in_channels = conv_in[0], conv_in[1]
            levels = sorted({int(m.group(1)) for name in shapes
                             if (m := re.match(r"encoder\.down\.(\d+)\.", name))})
            blocks = {int(m.group(1)) for name in shapes
                      if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", name))}
            ch_mult = tuple(shapes[f"encoder.down.{level}.block.0.conv1.weight"][0] // ch for level in levels)
            z_channels = shapes["encoder.conv_out.weight"][0] // 2
            out_ch = shapes["decoder.conv_out.weight"][0]
        except KeyError as error:
            raise BagelConfigError(f"{AE_WEIGHTS_FILE}: not a FLUX autoencoder (no tensor {error}).") from None
        if levels != list(range(len(levels))) or not blocks:
            raise BagelConfigError(f"{AE_WEIGHTS_FILE}: encoder.down levels {levels} are not 0..n-1.")
        return cls(in_channels=in_channels, out_ch=out_ch, ch=ch, ch_mult=ch_mult,
                   num_res_blocks=len(blocks), z_channels=z_channels)


@dataclass
class BagelConfig:
    """Everything needed to build a BAGEL model."""

    llm: LLMConfig
    vit: ViTConfig
    ae: AEConfig
    latent_patch_size: int = 2
    max_latent_size: int = 64          # app.py / inference.ipynb for BAGEL-7B-MoT
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0        # training-time shift (the sampler has its own, 3.0)

    #: BAGEL-level keys that `bagel_config.json` may set.
    SETTINGS = ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "connector_act",
                "interpolate_pos", "timestep_shift")

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def latent_channels(self) -> int:
        return self.ae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token side (VAE downsample x latent patch size: 16 for 7B-MoT)."""
        return self.ae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size ** 2 * self.ae.z_channels

    @property
    def vit_patch_size(self) -> int:
        return self.vit.patch_size

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SETTINGS}

    def validate(self) -> None:
        if self.vit_max_num_patch_per_side > self.vit.num_patches_per_side:
            raise BagelConfigError(
                f"vit_max_num_patch_per_side {self.vit_max_num_patch_per_side} exceeds the ViT's position table "
                f"({self.vit.image_size} // {self.vit.patch_size} = {self.vit.num_patches_per_side} per side).")
        if self.connector_act not in ("gelu_pytorch_tanh", "gelu", "silu", "relu"):
            raise BagelConfigError(f"connector_act {self.connector_act!r} is not supported.")
        if self.timestep_shift <= 0:
            raise BagelConfigError(f"timestep_shift must be positive, got {self.timestep_shift}.")

    def to_json_files(self) -> dict[str, dict[str, Any]]:
        """The config files of the official layout, plus `bagel_config.json` only when a setting
        that the weights do not carry differs from the official default."""
        vit = self.vit.to_dict()
        vit["rope"] = False
        files = {LLM_CONFIG_FILE: self.llm.to_dict(), VIT_CONFIG_FILE: vit}
        defaults = {f.name: f.default for f in fields(BagelConfig) if f.name in self.SETTINGS}
        # max_latent_size and vit_max_num_patch_per_side are read back from the weight shapes.
        changed = {name: getattr(self, name) for name in self.SETTINGS
                   if name not in ("max_latent_size", "vit_max_num_patch_per_side")
                   and getattr(self, name) != defaults[name]}
        if changed:
            files[BAGEL_CONFIG_FILE] = changed
        return files


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file header only."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BagelConfigError(f"{path} is missing: not an official BAGEL checkpoint folder "
                               f"(expected {LLM_CONFIG_FILE}, {VIT_CONFIG_FILE}, {EMA_WEIGHTS_FILE}, "
                               f"{AE_WEIGHTS_FILE}).") from None
    except json.JSONDecodeError as error:
        raise BagelConfigError(f"{path}: invalid JSON ({error}).") from None
    if not isinstance(data, dict):
        raise BagelConfigError(f"{path}: expected a JSON object.")
    return data


def _side_from_table(shapes: dict[str, tuple[int, ...]], name: str) -> int | None:
    if name not in shapes:
        return None
    rows = shapes[name][0]
    side = math.isqrt(rows)
    if side * side != rows:
        raise BagelConfigError(f"{EMA_WEIGHTS_FILE}: {name} has {rows} rows, not a square grid.")
    return side


def load_bagel_config(model_dir: str | Path, **overrides: Any) -> BagelConfig:
    """Read the config of the BAGEL checkpoint in `model_dir` (official layout)."""
    model_dir = Path(model_dir)
    llm = LLMConfig.from_dict(_read_json(model_dir / LLM_CONFIG_FILE))
    vit = ViTConfig.from_dict(_read_json(model_dir / VIT_CONFIG_FILE))
    ae_path = model_dir / AE_WEIGHTS_FILE
    ema_path = model_dir / EMA_WEIGHTS_FILE
    for path in (ae_path, ema_path):
        if not path.is_file():
            raise BagelConfigError(f"{path} is missing: not an official BAGEL checkpoint folder.")
    ae = AEConfig.from_weight_shapes(safetensors_shapes(ae_path))
    settings: dict[str, Any] = {}
    ema_shapes = safetensors_shapes(ema_path)
    latent_side = _side_from_table(ema_shapes, "latent_pos_embed.pos_embed")
    vit_side = _side_from_table(ema_shapes, "vit_pos_embed.pos_embed")
    if latent_side is not None:
        settings["max_latent_size"] = latent_side
    if vit_side is not None:
        settings["vit_max_num_patch_per_side"] = vit_side
    extra_path = model_dir / BAGEL_CONFIG_FILE
    if extra_path.is_file():
        extra = _read_json(extra_path)
        unknown = sorted(set(extra) - set(BagelConfig.SETTINGS))
        if unknown:
            raise BagelConfigError(f"{extra_path}: unknown keys {unknown}; allowed: {list(BagelConfig.SETTINGS)}.")
        settings.update(extra)
    unknown = sorted(set(overrides) - set(BagelConfig.SETTINGS))
    if unknown:
        raise BagelConfigError(f"load_bagel_config: unknown overrides {unknown}; "
                               f"allowed: {list(BagelConfig.SETTINGS)}.")
    settings.update(overrides)
    config = BagelConfig(llm=llm, vit=vit, ae=ae, **settings)
    config.validate()
    return config
