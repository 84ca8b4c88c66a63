"""Memory planner: what a training config needs on the accelerator, before any weight is loaded.

`train.py --config X --estimate [--gpu-memory 24] [--quantize transformer=nf4] [--block-swap 16]`

The real architectures are built from the checkpoint's own config files on the meta device
(`accelerate.init_empty_weights`), through the classes the families load, so parameter counts and
weight bytes are exact. LoRA adapters are injected with the same peft call and targets as
`ModelFamily.setup_training`. Activations of the trained denoiser are measured, not guessed: one
forward + backward of the real module runs on meta tensors (no memory, no compute) while a
TorchDispatchMode keeps the byte count of every live storage; attention is routed to the fused
(flash-style) kernel that CUDA uses, which keeps log-sum-exp instead of the score matrix. The VAE
encode is measured the same way under no_grad. Text encoders and token models (GLM-Image AR, BAGEL)
use the standard per-layer count (Korthikanti et al. 2022, fused attention). Latent sizes follow the
checkpoint's VAE config (`vae_scale_factor`). `WhatIf(device="cpu")` plans for CPU kernels instead
(oneDNN's per-convolution reorder copy counts): that is how the tiny-model plans are checked against
a real step's peak RSS (tests/test_planner.py, benchmarks/gpu_memory.py --tiny).

Config files come from: a local checkpoint folder; `tiny:<family>` (the tiny model's folder);
or, for hub ids and paths that are not on this machine, the copies of the published configs in
`glm_training/models/architectures/<family>/` (config.json files only).

Quantization and block swap are what-if options here (`--quantize`, `--block-swap`, or
`model.quantize` when the config has it): they change the figures, not how training loads.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from glm_training.config import Config, ConfigError

ARCHITECTURES_DIR = Path(__file__).parent / "models" / "architectures"
GB = 1024 ** 3  # figures are GiB, as torch.cuda and nvidia-smi report them

#: Published checkpoints whose configs ship in ARCHITECTURES_DIR.
KNOWN_CHECKPOINTS = {
    "black-forest-labs/flux.1-kontext-dev": "flux_kontext",
    "qwen/qwen-image": "qwen_image",
    "qwen/qwen-image-edit": "qwen_image_edit",
    "qwen/qwen-image-edit-2509": "qwen_image_edit",  # same architecture as Qwen-Image-Edit
    "zai-org/glm-image": "glm_image",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "bytedance-seed/bagel-7b-mot": "bagel",
}
FAMILY_ARCHITECTURE = {"flux_kontext": "flux_kontext", "qwen_image": "qwen_image",
                       "qwen_image_edit": "qwen_image_edit", "qwen_image_edit_plus": "qwen_image_edit",
                       "glm_image": "glm_image", "sdxl": "sdxl", "bagel": "bagel"}

QUANTIZATIONS = ("none", "fp8", "int8", "nf4")
#: Bytes per quantized Linear weight element: fp8/int8 one byte (+ one fp32 scale per output row,
#: counted separately); nf4 half a byte + one fp32 absmax per 64-element block (bitsandbytes).
QUANT_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
#: Optimizer state bytes per trainable parameter (fp32 moments; bitsandbytes 8-bit: 1 byte each).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "sgd": 4}
#: Weight bytes of the blocks that the block swapper holds on the device besides the resident
#: ones: the block running and the one being copied in.
SWAP_BUFFER_BLOCKS = 2


# ----------------------------------------------------------------------------------------------
# Resolving the config files


def architecture_dir(cfg: Config) -> tuple[Path, str]:
    """The folder whose config files describe `model.pretrained_model_name_or_path`, and where they
    came from (said in the report)."""
    path = cfg.model.pretrained_model_name_or_path
    family = cfg.model.family
    if path.startswith("tiny:"):
        from glm_training.models.tiny import ensure_tiny

        return ensure_tiny(path.split(":", 1)[1]), f"tiny model {path}"
    local = Path(path).expanduser()
    if local.is_dir():
        return local, f"config files of {local}"
    shipped = KNOWN_CHECKPOINTS.get(path.lower())
    if shipped is not None:
        return ARCHITECTURES_DIR / shipped, f"shipped configs of {path}"
    if family not in FAMILY_ARCHITECTURE:
        raise ConfigError(f"model.family: {family!r} has no architecture the planner knows.")
    name = FAMILY_ARCHITECTURE[family]
    return (ARCHITECTURES_DIR / name,
            f"{path} is not on this machine: shapes of the published {name} checkpoint (shipped configs)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: the memory planner reads the checkpoint's config files "
                          "(model.pretrained_model_name_or_path must be a complete checkpoint folder).") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON ({error}).") from None


# ----------------------------------------------------------------------------------------------
# Building on the meta device


def _diffusers_component(cls_name: str) -> Callable[[Path], nn.Module]:
    def build(folder: Path) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, cls_name)
        return cls.from_config(cls.load_config(str(folder)))
    return build


def _transformers_component(cls_name: str) -> Callable[[Path], nn.Module]:
    def build(folder: Path) -> nn.Module:
        import transformers

        cls = getattr(transformers, cls_name)
        config = transformers.AutoConfig.from_pretrained(str(folder))
        return cls(config)
    return build


@dataclass(frozen=True)
class PartSpec:
    """One module of a family: the family's name for it, where its config lives, how it is built."""

    name: str
    subfolder: str
    build: Callable[[Path], nn.Module]
    kind: str                    # denoiser | text | vae | ar | unified
    #: Loaded only to encode prompts: not resident when the embedding cache is on.
    text_only: bool = False
    #: The VAE runs in fp32 unless its config allows half precision (DiffusionFamily.load_autoencoder).
    fp32_unless_half_ok: bool = False


_CLIP = _transformers_component("CLIPTextModel")
_T5 = _transformers_component("T5EncoderModel")
FAMILY_PARTS: dict[str, tuple[PartSpec, ...]] = {
    "flux_kontext": (
        PartSpec("transformer", "transformer", _diffusers_component("FluxTransformer2DModel"), "denoiser"),
        PartSpec("text_encoder", "text_encoder", _CLIP, "text", text_only=True),
        PartSpec("text_encoder_2", "text_encoder_2", _T5, "text", text_only=True),
        PartSpec("vae", "vae", _diffusers_component("AutoencoderKL"), "vae", fp32_unless_half_ok=True),
    ),
    "qwen_image": (
        PartSpec("transformer", "transformer", _diffusers_component("QwenImageTransformer2DModel"), "denoiser"),
        PartSpec("text_encoder", "text_encoder", _transformers_component("Qwen2_5_VLForConditionalGeneration"),
                 "text", text_only=True),
        PartSpec("vae", "vae", _diffusers_component("AutoencoderKLQwenImage"), "vae"),
    ),
    "sdxl": (
        PartSpec("unet", "unet", _diffusers_component("UNet2DConditionModel"), "denoiser"),
        PartSpec("text_encoder", "text_encoder", _CLIP, "text", text_only=True),
        PartSpec("text_encoder_2", "text_encoder_2", _transformers_component("CLIPTextModelWithProjection"),
                 "text", text_only=True),
        PartSpec("vae", "vae", _diffusers_component("AutoencoderKL"), "vae", fp32_unless_half_ok=True),
    ),
    "glm_image": (
        PartSpec("dit", "transformer", _diffusers_component("GlmImageTransformer2DModel"), "denoiser"),
        PartSpec("ar", "vision_language_encoder", _transformers_component("GlmImageForConditionalGeneration"), "ar"),
        PartSpec("text_encoder", "text_encoder", _T5, "text", text_only=True),
        PartSpec("vae", "vae", _diffusers_component("AutoencoderKL"), "vae", fp32_unless_half_ok=True),
    ),
}
FAMILY_PARTS["qwen_image_edit"] = FAMILY_PARTS["qwen_image"]
FAMILY_PARTS["qwen_image_edit_plus"] = FAMILY_PARTS["qwen_image"]


def _build_bagel(folder: Path) -> nn.Module:
    from glm_training.models.bagel import config as bagel_config
    from glm_training.models.bagel.model import BagelModel

    if (folder / bagel_config.EMA_WEIGHTS_FILE).is_file():
        config = bagel_config.load_bagel_config(folder)  # reads shapes from the weight headers only
    else:  # shipped configs: no weight files, the released model's BAGEL-level settings
        config = bagel_config.BagelConfig(
            llm=bagel_config.LLMConfig.from_dict(_read_json(folder / bagel_config.LLM_CONFIG_FILE)),
            vit=bagel_config.ViTConfig.from_dict(_read_json(folder / bagel_config.VIT_CONFIG_FILE)),
            ae=bagel_config.AEConfig())
    return BagelModel(config)


FAMILY_PARTS["bagel"] = (PartSpec("bagel", ".", _build_bagel, "unified"),)


def build_meta(spec: PartSpec, folder: Path) -> nn.Module:
    """The module with every parameter and buffer on the meta device."""
    from accelerate import init_empty_weights

    target = folder / spec.subfolder
    if not target.is_dir():
        raise ConfigError(f"{target} is missing: the planner needs the {spec.name} config of the checkpoint.")
    with init_empty_weights(include_buffers=True):
        module = spec.build(target)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Activation measurement on meta tensors


#: Convolutions whose CPU kernels (oneDNN) reorder activations into a blocked layout: for the
#: call, a copy of the larger of their activation input and output exists besides both (measured
#: on this machine: a 16->16 channel 3x3 conv at 512x512 peaks at input + output + one of them).
_CONVOLUTIONS = ("aten.convolution.default", "aten.convolution_backward.default")


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every storage an op creates, while it lives; `peak` excludes parameter gradients
    (reported on their own line) by subtracting them as they accumulate. With `cpu_kernels`, the
    transient reorder copy of each convolution (see _CONVOLUTIONS) counts at its call."""

    def __init__(self, module: nn.Module | None = None, cpu_kernels: bool = False) -> None:
        super().__init__()
        self.cpu_kernels = cpu_kernels
        self.live: dict[int, Any] = {}
        # Views of parameters and buffers (a weight's transpose) share their storage: not new memory.
        self.known = {t.untyped_storage()._cdata for t in (*module.parameters(), *module.buffers())} \
            if module is not None else set()
        self.current = 0
        self.grad_bytes = 0
        self.peak = 0

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.live or key in self.known:
            return
        size = storage.nbytes()

        def release(_ref: Any, key: int = key, size: int = size) -> None:
            if self.live.pop(key, None) is not None:
                self.current -= size

        self.live[key] = weakref.ref(storage, release)
        self.current += size
        self.peak = max(self.peak, self.current - self.grad_bytes)

    def grad_accumulated(self, param: torch.Tensor) -> None:
        self.grad_bytes += param.grad.untyped_storage().nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item.untyped_storage())
        if self.cpu_kernels and str(func) in _CONVOLUTIONS:
            def activations(values: Any) -> list[int]:
                return [t.untyped_storage().nbytes() for t in torch.utils._pytree.tree_flatten(values)[0]
                        if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.untyped_storage()._cdata not in self.known]
            reorder = max([0, *activations(args), *activations(out)])
            self.peak = max(self.peak, self.current + reorder - self.grad_bytes)
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """SDPA as CUDA's flash / memory-efficient kernels store it for backward (inputs, output,
    log-sum-exp), in place of the math fallback that meta tensors would take."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def fused_attention():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def measure_step(module: nn.Module, make_inputs: Callable[[], dict[str, Any]], train: bool,
                 cpu_kernels: bool = False) -> int:
    """Peak bytes (beyond parameters and parameter gradients) of one forward (+ backward when
    `train`) of `module` on meta inputs; `cpu_kernels`: as CPU kernels run it (LiveBytes)."""
    tracker = LiveBytes(module, cpu_kernels)
    handles = []
    if train:
        handles = [p.register_post_accumulate_grad_hook(tracker.grad_accumulated)
                   for p in module.parameters() if p.requires_grad]
    from torch.fx.experimental import _config as fx_config

    try:
        # Boolean-mask indexing (GLM-Image's prior-token drop) has no shape on meta: assume all selected.
        with fused_attention(), tracker, fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            with contextlib.nullcontext() if train else torch.no_grad():
                kwargs = make_inputs()
                out = module(**kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                if train:
                    # The loss: MSE against a target of the prediction's shape, in fp32 as the trainers do.
                    target = torch.empty(out.shape, dtype=torch.float32, device=out.device)
                    (out.float() - target).pow(2).mean().backward()
                del out, kwargs
    finally:
        for handle in handles:
            handle.remove()
    return tracker.peak


def measure_denoiser(module: nn.Module, make_inputs: Callable[[], dict[str, Any]], cpu_kernels: bool = False) -> int:
    """`measure_step` of a training step, on a copy of the stack holding one and two of its repeated
    blocks, extrapolated to the real depth: every block of a list saves the same activations
    (checkpointing: the same input), so the peak is linear in the block counts; this keeps the
    measurement of a 60-block transformer to a few seconds."""
    full = {name: getattr(module, name) for name in ("transformer_blocks", "single_transformer_blocks")
            if isinstance(getattr(module, name, None), nn.ModuleList) and len(getattr(module, name)) > 2}
    if not full:
        return measure_step(module, make_inputs, train=True, cpu_kernels=cpu_kernels)

    def at(counts: dict[str, int]) -> int:
        for name, count in counts.items():
            setattr(module, name, nn.ModuleList(list(full[name])[:count]))
        try:
            return measure_step(module, make_inputs, train=True, cpu_kernels=cpu_kernels)
        finally:
            for name, blocks in full.items():
                setattr(module, name, blocks)

    ones = {name: 1 for name in full}
    base = at(ones)
    total = base
    for name, blocks in full.items():
        total += (at({**ones, name: 2}) - base) * (len(blocks) - 1)
    return total


#: Measured activations by everything they depend on (what-ifs such as quantization, block swap
#: or the optimizer leave them unchanged), so the search for changes that fit re-measures nothing.
_MEASURED: dict[tuple, int] = {}


def _memoized(key: tuple, measure: Callable[[], int]) -> int:
    if key not in _MEASURED:
        _MEASURED[key] = measure()
    return _MEASURED[key]


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class PartPlan:
    name: str
    kind: str
    parameters: int
    weight_bytes: float
    quantization: str = "none"
    resident: bool = True
    note: str = ""
    trainable_parameters: int = 0
    trainable_bytes: float = 0.0
    gradient_bytes: float = 0.0
    optimizer_bytes: float = 0.0
    activation_bytes: float = 0.0
    swapped_bytes: float = 0.0

    @property
    def device_bytes(self) -> float:
        weights = self.weight_bytes - self.swapped_bytes if self.resident else 0.0
        return weights + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes


@dataclass
class MemoryPlan:
    family: str
    source: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    parts: list[PartPlan] = field(default_factory=list)
    #: Transient peaks of the phases of one step: name -> bytes (the largest one counts).
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    budget_gb: float | None = None
    suggestions: list[str] = field(default_factory=list)
    device: str = "cuda"

    @property
    def state_bytes(self) -> float:
        return sum(p.device_bytes for p in self.parts)

    @property
    def peak_phase(self) -> tuple[str, float]:
        return max(self.phases.items(), key=lambda item: item[1]) if self.phases else ("none", 0.0)

    @property
    def total_bytes(self) -> float:
        return self.state_bytes + self.peak_phase[1]

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def fits(self, budget_gb: float | None = None) -> bool:
        budget = self.budget_gb if budget_gb is None else budget_gb
        return budget is None or self.total_gb <= budget

    def part(self, name: str) -> PartPlan:
        return next(p for p in self.parts if p.name == name)

    def report(self) -> str:
        def gb(value: float) -> str:
            return f"{value / GB:8.2f}"

        lines = [f"Memory plan: {self.family} at {self.resolution}x{self.resolution}, batch {self.batch_size}, "
                 f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
                 f"{', on CPU' if self.device == 'cpu' else ''} ({self.source}).",
                 f"{'part':<16}{'params':>9} {'quant':>6} {'weights':>8} {'trainable':>9} {'grads':>8} "
                 f"{'optim':>8} {'activ.':>8}   (GiB)"]
        for p in self.parts:
            weights = gb(p.weight_bytes - p.swapped_bytes) if p.resident else "     off"
            lines.append(f"{p.name:<16}{p.parameters / 1e9:8.3f}B {p.quantization:>6} {weights} "
                         f"{gb(p.trainable_bytes):>9} {gb(p.gradient_bytes)} {gb(p.optimizer_bytes)} "
                         f"{gb(p.activation_bytes)}   {p.note}".rstrip())
        for name, value in self.phases.items():
            lines.append(f"  step phase {name:<24}{value / GB:8.2f} GiB transient")
        phase, _ = self.peak_phase
        total = f"Total: {self.total_gb:.2f} GiB (state {self.state_bytes / GB:.2f} + peak phase '{phase}')"
        if self.budget_gb is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            total += f" against {self.budget_gb:g} GiB: {verdict}."
        lines.append(total)
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.suggestions:
            lines.append("Cheapest changes that make it fit:" if not self.fits() else "Options:")
            lines.extend(f"  - {s}" for s in self.suggestions)
        return "\n".join(lines)


@dataclass(frozen=True)
class WhatIf:
    """The knobs the planner varies (command line what-ifs over the config)."""

    quantize: tuple[tuple[str, str], ...] = ()
    block_swap: int = 0
    gradient_checkpointing: bool | None = None
    cache: bool | None = None
    optimizer: str | None = None
    batch_size: int | None = None
    resolution: int | None = None
    #: The accelerator planned for: "cuda" (default, also on a machine without one) or "cpu"
    #: (oneDNN's convolution reorder copies count; the tiny-model measurements run there).
    device: str = "cuda"


def parse_quantize(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """`transformer=nf4` (repeatable; a bare `nf4` means the trained denoiser)."""
    out = []
    for text in values or []:
        name, _, kind = text.rpartition("=")
        kind = kind.strip().lower()
        if kind not in QUANTIZATIONS:
            raise ConfigError(f"--quantize {text!r}: {kind!r} is not one of {list(QUANTIZATIONS)} "
                              "(e.g. --quantize transformer=nf4).")
        out.append((name.strip() or "*denoiser", kind))
    return tuple(out)


def _config_quantize(cfg: Config, specs: tuple) -> dict[str, str]:
    """`model.quantize` exactly as the loader reads it (`ModelFamily.quantize_plan`: a string means
    every quantizable component, names may be pipeline folders or the family's aliases), keyed by
    the planner's part names."""
    from glm_training.models.base import family_class

    plan = family_class(cfg.model.family).quantize_plan(cfg)
    by_folder = {spec.subfolder: spec.name for spec in specs}
    return {by_folder.get(folder, folder): kind for folder, kind in plan.items()}


def _linear_weights(module: nn.Module) -> tuple[int, int]:
    """(elements, output rows) of the nn.Linear weights, the tensors weight quantization replaces."""
    elements = rows = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and not hasattr(sub, "base_layer"):
            elements += sub.weight.numel()
            rows += sub.weight.shape[0]
    return elements, rows


def _weight_bytes(module: nn.Module, dtype: torch.dtype, quantization: str) -> float:
    params = sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    if quantization == "none":
        return params * DTYPE_BYTES[dtype] + buffers
    elements, rows = _linear_weights(module)
    return ((params - elements) * DTYPE_BYTES[dtype] + elements * QUANT_BYTES[quantization] + rows * 4 + buffers)


def _swap_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks a block swapper moves between CPU and device."""
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        if isinstance(getattr(module, name, None), nn.ModuleList):
            blocks.extend(getattr(module, name))
    return blocks


def _add_lora(family: str, cfg: Config, name: str, module: nn.Module) -> None:
    """The adapter `ModelFamily.setup_training` adds (same targets, rank), on meta."""
    from accelerate import init_empty_weights
    from peft import LoraConfig as PeftLoraConfig

    from glm_training.models.base import family_class

    cls = family_class(family)
    lora = cfg.lora
    override = lora.components.get(name)
    rank = override.rank if override is not None and override.rank else lora.rank
    if family == "bagel":
        from glm_training.models.bagel.lora import lora_target_modules

        targets: Any = lora.target_modules or lora_target_modules(cfg.model.component or cls.default_component)
    elif override is not None and override.target_modules:
        targets = override.target_modules
    else:
        targets = lora.target_modules or cls.default_lora_targets[name]
    module.requires_grad_(False)
    with init_empty_weights():
        if family == "bagel":
            from peft import inject_adapter_in_model

            inject_adapter_in_model(PeftLoraConfig(r=rank, lora_alpha=lora.alpha, target_modules=targets), module)
        else:
            module.add_adapter(PeftLoraConfig(r=rank, lora_alpha=lora.alpha, target_modules=targets))
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError(f"lora.target_modules {targets} matched no module of {name}.")


def _trained_parts(cfg: Config) -> list[str]:
    from glm_training.models.base import family_class

    cls = family_class(cfg.model.family)
    group = cfg.model.component or cls.default_component
    if group not in cls.component_groups:
        raise ConfigError(f"model.component: {group!r} is not valid for family {cls.name}; "
                          f"choose one of {sorted(cls.component_groups)}.")
    return list(cls.component_groups[group])


@contextlib.contextmanager
def _quiet_libraries():
    """diffusers warns about dtype casts of modules that hold no data here."""
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def plan_memory(cfg: Config, what_if: WhatIf = WhatIf(), budget_gb: float | None = None,
                suggest: bool = True) -> MemoryPlan:
    """The memory plan of `cfg` (+ what-ifs); with `budget_gb`, what would make it fit."""
    with _quiet_libraries():
        plan = _plan(cfg, what_if, budget_gb)
    if suggest and budget_gb is not None and not plan.fits():
        plan.suggestions = suggest_changes(cfg, what_if, budget_gb, plan)
    return plan


def _plan(cfg: Config, what_if: WhatIf, budget_gb: float | None) -> MemoryPlan:
    from glm_training.models.base import resolve_weight_dtype

    family = cfg.model.family
    if family not in FAMILY_PARTS:
        raise ConfigError(f"model.family: {family!r}: the memory planner knows {sorted(FAMILY_PARTS)}.")
    folder, source = architecture_dir(cfg)
    weight_dtype = resolve_weight_dtype(cfg)
    mixed = cfg.training.mixed_precision != "no"
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.mixed_precision, weight_dtype)
    checkpointing = (cfg.model.gradient_checkpointing if what_if.gradient_checkpointing is None
                     else what_if.gradient_checkpointing)
    cache = cfg.cache.enabled if what_if.cache is None else what_if.cache
    optimizer = what_if.optimizer or (cfg.optimizer.name if not cfg.optimizer.class_path else "adamw")
    batch = what_if.batch_size or cfg.training.batch_size
    if cfg.training.method == "grpo":
        batch = max(batch, cfg.grpo.num_generations)
    resolution = what_if.resolution or cfg.data.resolution
    trained = _trained_parts(cfg)
    if what_if.device not in ("cuda", "cpu"):
        raise ConfigError(f"planner device {what_if.device!r}: choose cuda or cpu.")
    plan = MemoryPlan(family, source, resolution, batch, checkpointing, budget_gb=budget_gb, device=what_if.device)
    if cfg.optimizer.class_path:
        plan.notes.append(f"optimizer.class_path {cfg.optimizer.class_path}: counted as AdamW (8 bytes/param).")
    if cfg.training.method == "dpo":
        plan.notes.append("dpo: winner and loser run together (batch counted x2); the reference pass runs "
                          "without grad (adapter disabled).")
    specs = FAMILY_PARTS[family]
    by_folder = {spec.subfolder: spec.name for spec in specs}  # `--quantize` may name pipeline folders too
    quantize = {**_config_quantize(cfg, specs), **{by_folder.get(k, k): v for k, v in what_if.quantize}}
    denoiser = next((s.name for s in specs if s.kind in ("denoiser", "unified")), None)
    known = {s.name for s in specs}
    for key in quantize:
        if key != "*denoiser" and key not in known:
            raise ConfigError(f"--quantize {key}=...: {family} has parts {sorted(known)}.")
    modules: dict[str, nn.Module] = {}
    for spec in specs:
        module = build_meta(spec, folder)
        modules[spec.name] = module
        dtype = weight_dtype
        if spec.fp32_unless_half_ok and module.config.get("force_upcast", True):
            dtype = torch.float32
        kind = quantize.get(spec.name) or (quantize.get("*denoiser") if spec.name == denoiser else None) or "none"
        if kind != "none" and spec.name in trained and not cfg.lora.enabled:
            raise ConfigError(f"--quantize {spec.name}={kind}: a fully fine-tuned part cannot be quantized; "
                              "use LoRA (lora.enabled: true) or drop the quantization.")
        part = PartPlan(spec.name, spec.kind, count_parameters(module), 0.0, quantization=kind)
        if spec.text_only and cache and spec.name not in trained:
            part.resident, part.note = False, "not loaded (cache.enabled: embeddings precomputed)"
        if spec.name in trained:
            if cfg.lora.enabled:
                _add_lora(family, cfg, spec.name, module)
                part.trainable_parameters = sum(p.numel() for p in module.parameters() if p.requires_grad)
            else:
                part.trainable_parameters = part.parameters
                dtype = torch.float32  # setup_training casts fully trained parts to fp32
            part.trainable_bytes = part.trainable_parameters * 4  # fp32 master weights
            part.gradient_bytes = part.trainable_parameters * 4
            part.optimizer_bytes = part.trainable_parameters * OPTIMIZER_STATE_BYTES.get(optimizer, 8)
            if not cfg.lora.enabled:
                part.trainable_bytes = 0.0  # the fp32 weights themselves are the trained ones
        part.weight_bytes = _weight_bytes(module, dtype, kind)
        if kind != "none":
            part.note = (part.note + f" {kind} Linear weights").strip()
        plan.parts.append(part)
    if not cfg.lora.enabled and cfg.training.method in ("dpo", "grpo"):
        for name in trained:
            p = plan.part(name)
            plan.parts.append(PartPlan(f"{name} (ref)", "reference", p.parameters, p.weight_bytes,
                                       note="frozen copy for the reference (full fine-tuning)"))
    if what_if.block_swap:
        _apply_block_swap(plan, modules, denoiser, what_if.block_swap)
    _measure_phases(plan, cfg, modules, trained, compute_dtype if mixed else weight_dtype, batch, resolution,
                    checkpointing, cache)
    return plan


def _apply_block_swap(plan: MemoryPlan, modules: dict[str, nn.Module], denoiser: str | None, count: int) -> None:
    module = modules.get(denoiser or "")
    blocks = _swap_blocks(module) if module is not None else []
    if not blocks:
        raise ConfigError(f"--block-swap: {plan.family} has no transformer blocks to swap.")
    if count > len(blocks) - SWAP_BUFFER_BLOCKS:
        raise ConfigError(f"--block-swap {count}: {denoiser} has {len(blocks)} blocks; swap at most "
                          f"{len(blocks) - SWAP_BUFFER_BLOCKS}.")
    part = plan.part(denoiser)
    bytes_per_param = part.weight_bytes / max(1, part.parameters)  # this part's mean (quantization included)
    per_block = []
    for block in blocks:
        per_block.append(sum(p.numel() for n, p in block.named_parameters() if "lora_" not in n) * bytes_per_param)
    swapped = sorted(per_block)[-count:]
    part.swapped_bytes = sum(swapped) - SWAP_BUFFER_BLOCKS * max(per_block)
    part.swapped_bytes = max(part.swapped_bytes, 0.0)
    part.note = (part.note + f" {count}/{len(blocks)} blocks swapped to CPU").strip()
    plan.notes.append(f"block swap: {sum(swapped) / GB:.2f} GiB of {denoiser} weights live in pinned CPU memory; "
                      "steps slow down by the PCIe copies.")


# -- phases of one step ---------------------------------------------------------------------------


def _text_tokens(family: str, cfg: Config) -> int:
    from glm_training.models.base import family_class

    length = cfg.model.max_sequence_length or getattr(family_class(family), "max_sequence_length", 77)
    if family == "sdxl":
        return 77
    if family == "flux_kontext":
        return length  # T5 pads to max_sequence_length
    if family.startswith("qwen_image"):
        return min(length, 256)  # padded to the batch's longest prompt; 256 covers long captions
    if family == "glm_image":
        return min(length, 128)  # glyph encoder: the quoted text's bytes
    return 256


def _controls(cfg: Config) -> int:
    return 1 if cfg.training.mode == "i2i" else 0


def vae_scale_factor(family: str, vae: nn.Module) -> int:
    """Pixels per latent side, as the pipelines compute it from the VAE's own config (8 for the
    published VAEs; the tiny models' VAEs have fewer down blocks)."""
    if family.startswith("qwen_image"):
        return 2 ** len(vae.config.temperal_downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _denoiser_inputs(family: str, module: nn.Module, cfg: Config, dtype: torch.dtype, batch: int,
                     resolution: int, vae_scale: int = 8) -> Callable[[], dict[str, Any]]:
    """Meta inputs of one denoiser call; `vae_scale` from `vae_scale_factor` (latent = pixels / it)."""
    meta = torch.device("meta")
    config = module.config
    text = _text_tokens(family, cfg)
    controls = _controls(cfg)

    def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device=meta)

    if family == "flux_kontext":
        side = resolution // vae_scale // 2  # 2x2 latent patches per token
        tokens = side * side * (1 + controls)
        return lambda: {
            "hidden_states": empty(batch, tokens, config.in_channels),
            "encoder_hidden_states": empty(batch, text, config.joint_attention_dim),
            "pooled_projections": empty(batch, config.pooled_projection_dim),
            "timestep": empty(batch), "img_ids": empty(tokens, 3), "txt_ids": empty(text, 3),
            "guidance": empty(batch) if config.guidance_embeds else None, "return_dict": False}
    if family.startswith("qwen_image"):
        side = resolution // vae_scale // 2
        tokens = side * side * (1 + controls)
        if controls:
            text += 256 * controls  # the VL encoder's vision tokens of each condition image
        shapes = [[(1, side, side)] * (1 + controls)] * batch
        return lambda: {
            "hidden_states": empty(batch, tokens, config.in_channels),
            "encoder_hidden_states": empty(batch, text, config.joint_attention_dim),
            "encoder_hidden_states_mask": empty(batch, text, dt=torch.int64),
            "timestep": empty(batch), "img_shapes": shapes, "return_dict": False}
    if family == "sdxl":
        side = resolution // vae_scale
        return lambda: {
            "sample": empty(batch, config.in_channels, side, side), "timestep": empty(batch),
            "encoder_hidden_states": empty(batch, text, config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": empty(batch, config.projection_class_embeddings_input_dim - 6 *
                                                      config.addition_time_embed_dim),
                                  "time_ids": empty(batch, 6)}, "return_dict": False}
    if family == "glm_image":
        side = resolution // vae_scale
        patches = (side // config.patch_size) ** 2
        return lambda: {
            "hidden_states": empty(batch, config.in_channels, side, side),
            "encoder_hidden_states": empty(batch, text, config.text_embed_dim),
            "prior_token_id": empty(batch, patches, dt=torch.int64),
            "prior_token_drop": empty(batch, patches, dt=torch.bool),
            "timestep": empty(batch), "target_size": empty(batch, 2), "crop_coords": empty(batch, 2),
            "return_dict": False}
    raise ConfigError(f"model.family: {family}: no denoiser inputs known to the planner.")


def _vae_inputs(family: str, dtype: torch.dtype, batch: int, resolution: int, images: int):
    shape = (batch * images, 3, 1, resolution, resolution) if family.startswith("qwen_image") else (
        batch * images, 3, resolution, resolution)
    return lambda: {"x": torch.empty(shape, dtype=dtype, device="meta")}


class _Encode(nn.Module):
    """`vae.encode` as a module call, for `measure_step`."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mode()


def _layer_activation_bytes(hidden: int, intermediate: int, kv_hidden: int, tokens: int, dtype_bytes: int,
                            checkpointing: bool, layers: int, training: bool) -> float:
    """Saved activations of a decoder stack with fused attention (Korthikanti et al. 2022): per layer
    and token, the norms' and projections' inputs (5 h + 2 kv), the attention output and log-sum-exp,
    and the SwiGLU MLP's gate, up and product (3 I); with checkpointing only each layer's input is
    kept, plus one layer recomputed during backward. Without grad: about two layers' working set."""
    per_layer = tokens * (6 * hidden + 2 * kv_hidden + 3 * intermediate) * dtype_bytes
    if not training:
        return 2 * per_layer
    if checkpointing:
        return layers * tokens * hidden * dtype_bytes + per_layer
    return layers * per_layer


def _text_config(module: nn.Module) -> Any:
    config = module.config
    return getattr(config, "text_config", None) or config


def _text_encoder_bytes(module: nn.Module, tokens: int, batch: int, dtype_bytes: int) -> float:
    """No-grad prompt encoding: all hidden states are returned (the pipelines read inner layers)
    plus a layer's working set."""
    config = _text_config(module)
    hidden = getattr(config, "hidden_size", None) or config.d_model
    intermediate = getattr(config, "intermediate_size", None) or config.d_ff
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    return batch * ((layers + 1) * tokens * hidden * dtype_bytes +
                    _layer_activation_bytes(hidden, intermediate, hidden, tokens, dtype_bytes, False, 1, False))


def _token_part_bytes(module: nn.Module, cfg: Config, tokens: int, batch: int, dtype_bytes: int,
                      checkpointing: bool, vocab: int) -> float:
    config = _text_config(module)
    if hasattr(config, "llm"):
        config = config.llm
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_hidden = hidden // config.num_attention_heads * config.num_key_value_heads
    stack = _layer_activation_bytes(hidden, intermediate, kv_hidden, tokens, dtype_bytes, checkpointing, layers, True)
    logits = tokens * vocab * (dtype_bytes + 4 + 4)  # logits, their fp32 copy for the CE and its gradient
    return batch * (stack + logits)


def _measure_phases(plan: MemoryPlan, cfg: Config, modules: dict[str, nn.Module], trained: list[str],
                    dtype: torch.dtype, batch: int, resolution: int, checkpointing: bool, cache: bool) -> None:
    family = plan.family
    cpu = plan.device == "cpu"
    dtype_bytes = DTYPE_BYTES[dtype]
    pairs = 2 if cfg.training.method == "dpo" else 1
    images = 1 + _controls(cfg)
    if family == "bagel":
        bagel = modules["bagel"]
        side = resolution // bagel.bagel_config.latent_downsample
        tokens = side * side + (resolution // bagel.bagel_config.vit_patch_size) ** 2 * _controls(cfg) + 256
        plan.part("bagel").activation_bytes = _token_part_bytes(
            bagel, cfg, tokens, batch * pairs, dtype_bytes, checkpointing, bagel.bagel_config.llm.vocab_size)
        plan.phases["forward+backward"] = plan.part("bagel").activation_bytes
        plan.notes.append("bagel: activations from the per-layer formula over the packed sequence "
                          "(generation tokens + ViT tokens of the condition + 256 text).")
        return
    text_parts = [p for p in plan.parts if p.kind == "text" and p.resident]
    if text_parts:
        tokens = _text_tokens(family, cfg)
        plan.phases["encode prompts"] = max(_text_encoder_bytes(modules[p.name], tokens, batch, dtype_bytes)
                                            for p in text_parts)
    if not cache:
        vae = modules["vae"]
        vae_dtype = torch.float32 if vae.config.get("force_upcast", True) and family != "qwen_image" and \
            not family.startswith("qwen_image") else dtype
        vae.to(vae_dtype)
        key = ("vae", plan.source, family, str(vae_dtype), batch * pairs, resolution, images, cpu)
        plan.phases["encode images (VAE)"] = _memoized(key, lambda: measure_step(
            _Encode(vae), _vae_inputs(family, vae_dtype, batch * pairs, resolution, images), train=False,
            cpu_kernels=cpu))
    for name in trained:
        module = modules[name]
        part = plan.part(name)
        if part.kind == "denoiser":
            for p in module.parameters():
                if p.requires_grad:
                    p.data = torch.empty(p.shape, dtype=dtype, device="meta")  # computed in autocast dtype
            module.to(dtype)
            if checkpointing:
                module.enable_gradient_checkpointing()
            module.train()
            key = (name, plan.source, family, str(dtype), batch * pairs, resolution, checkpointing,
                   part.trainable_parameters, cfg.training.mode, _text_tokens(family, cfg), cpu)
            scale = vae_scale_factor(family, modules["vae"])
            part.activation_bytes = _memoized(key, lambda: measure_denoiser(
                module, _denoiser_inputs(family, module, cfg, dtype, batch * pairs, resolution, scale), cpu))
        else:  # GLM-Image AR: teacher-forced image tokens (preview grid + target grid + prompt)
            grid = resolution // 32
            tokens = grid * grid + 16 * 16 + _text_tokens(family, cfg)
            part.activation_bytes = _token_part_bytes(module, cfg, tokens, batch * pairs, dtype_bytes, checkpointing,
                                                      _text_config(module).vision_vocab_size)
            plan.notes.append(f"{name}: activations from the per-layer formula ({tokens} tokens).")
    plan.phases["forward+backward"] = sum(plan.part(name).activation_bytes for name in trained)
    if cfg.training.method == "grpo":
        plan.notes.append("grpo: rollouts run without grad; the training pass is counted at "
                          f"batch {batch} (num_generations per prompt).")


# -- what would make it fit ----------------------------------------------------------------------------


def suggest_changes(cfg: Config, what_if: WhatIf, budget_gb: float, plan: MemoryPlan) -> list[str]:
    """Changes tried in order of what they cost (speed, then quality), cumulatively; the first
    combination that fits is reported, and each step's saving."""
    family = cfg.model.family
    specs = FAMILY_PARTS[family]
    denoiser = next((s.name for s in specs if s.kind in ("denoiser", "unified")), None)
    frozen_text = [s.name for s in specs if s.text_only]
    current = what_if
    steps: list[tuple[str, WhatIf]] = []
    checkpointing = cfg.model.gradient_checkpointing if current.gradient_checkpointing is None else \
        current.gradient_checkpointing
    if not checkpointing:
        steps.append(("gradient checkpointing on (--set model.gradient_checkpointing=true)",
                      replace(current, gradient_checkpointing=True)))
        current = steps[-1][1]
    cached = cfg.cache.enabled if current.cache is None else current.cache
    if frozen_text and not cached:
        steps.append(("precompute prompt embeddings (--set cache.enabled=true, then --cache): text encoders "
                      "are not loaded", replace(current, cache=True)))
        current = steps[-1][1]
    quant = dict(current.quantize)
    if not cfg.lora.enabled and (current.optimizer or cfg.optimizer.name) == "adamw":
        steps.append(("8-bit AdamW (--set optimizer.name=adamw8bit)", replace(current, optimizer="adamw8bit")))
        current = steps[-1][1]
    if cfg.lora.enabled and denoiser is not None and family != "bagel":
        for kind in ("fp8", "nf4"):
            if quant.get(denoiser) in (None, "none") or (kind == "nf4" and quant.get(denoiser) != "nf4"):
                quant[denoiser] = kind
                steps.append((f"quantize {denoiser}={kind}", replace(current, quantize=tuple(quant.items()))))
                current = steps[-1][1]
    results = []
    base = plan.total_gb
    for text, option in steps:
        candidate = plan_memory(cfg, option, budget_gb, suggest=False)
        results.append(f"{text}: {candidate.total_gb:.2f} GiB ({candidate.total_gb - base:+.2f})")
        base = candidate.total_gb
        if candidate.fits():
            return results
    # Still too large: the fewest swapped blocks that fit (binary search over the count).
    if denoiser is not None and family != "bagel":
        module = build_meta(next(s for s in specs if s.name == denoiser), architecture_dir(cfg)[0])
        limit = len(_swap_blocks(module)) - SWAP_BUFFER_BLOCKS
        low, high = 1, limit
        if limit >= 1 and plan_memory(cfg, replace(current, block_swap=limit), budget_gb, suggest=False).fits():
            while low < high:
                middle = (low + high) // 2
                if plan_memory(cfg, replace(current, block_swap=middle), budget_gb, suggest=False).fits():
                    high = middle
                else:
                    low = middle + 1
            fitted = plan_memory(cfg, replace(current, block_swap=low), budget_gb, suggest=False)
            results.append(f"swap {low} blocks to CPU (--block-swap {low}): {fitted.total_gb:.2f} GiB")
            return results
    results.append(f"nothing above fits {budget_gb:g} GiB: lower data.resolution or training.batch_size, "
                   "or shard over several GPUs (FSDP / DeepSpeed).")
    return results


def cuda_budget_gb() -> float | None:
    """Total memory of the current CUDA device (GiB), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB


def check_fits_cuda(cfg: Config) -> MemoryPlan | None:
    """For `--validate`: refuse a config whose plan exceeds the CUDA device, before loading weights."""
    budget = cuda_budget_gb()
    if budget is None:
        return None
    plan = plan_memory(cfg, budget_gb=budget)
    if not plan.fits():
        raise ConfigError(f"the run needs about {plan.total_gb:.1f} GiB, this GPU has {budget:.1f} GiB.\n"
                          + plan.report())
    return plan

