"""The model-family interface: what trainers need from a model, and nothing more.

A family is one file: it loads its checkpoint (`load`), names its trainable components, declares
what it supports (`modes`, `max_control_images`, `methods`, its own config section: read by
`check_config` before anything loads) and returns its trained **parts** (`make_parts`), each of a
kind from `glm_training.parts`:

- a denoiser (`parts.Denoiser`) built on the hooks of `DenoiserHooks` below: `objective`,
  `encode_prompt`, `encode_images`, `decode_latents`, `latent_shape`, `condition`, `predict`;
- a token policy (`parts.TokenPolicy`) implementing `TokenPolicyHooks`: teacher-forced per-token
  log-probs and sampling with the log-probs of the distribution sampled from.

Trainers loop over `parts()` and call the method of their training (`sft_loss`,
`preference_loss`, `policy_backward`); families whose parts chain in generation (GLM-Image: AR
tokens -> DiT) override `rollout` / `eval_images`. LoRA, full fine-tuning, per-component learning
rates, the frozen reference (adapter disabled) and checkpoint state are handled here generically,
on the modules `components()` returns. `register_family` adds a family without editing this file.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from glm_training.config import Config, ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_weight_dtype(cfg: Config) -> torch.dtype:
    name = cfg.model.weight_dtype
    if name == "auto":
        name = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.training.mixed_precision]
    return DTYPES[name]


def resolve_model_path(cfg: Config) -> str:
    """`tiny:<name>` builds (once) and returns the tiny random-weight model of that name."""
    path = cfg.model.pretrained_model_name_or_path
    if path.startswith("tiny:"):
        from glm_training.models.tiny import ensure_tiny

        return str(ensure_tiny(path.split(":", 1)[1]))
    return path


# -- quantized frozen weights (model.quantize, model.gguf_file) -----------------------------------
#: `model.quantize` kinds -> the library that does them (README "Quantization and offload"):
#: int8 / fp8 weight-only with torchao (CPU and CUDA), nf4 with bitsandbytes (CUDA only).
QUANTIZE_KINDS = ("none", "int8", "fp8", "nf4")


class _DropLegacyTorchaoWarning(logging.Filter):
    # diffusers 0.42 warns at import that torchao 0.18 lacks its legacy tensor classes (they only
    # matter for torch.load pickles; quantized checkpoints here are safetensors), and that int8
    # wants bf16 (int8 weight-only with fp32 activations runs and trains: tests/test_quantization.py).
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return ("Unable to import `torchao` Tensor objects" not in message
                and "for integer quantization, but only bfloat16 is supported" not in message)


logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(_DropLegacyTorchaoWarning())


def quantization_config(kind: str, library: str, key: str, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """The diffusers / transformers `quantization_config` of one `model.quantize` kind, or a
    ConfigError naming `key` when its backend cannot run here (no CUDA, package missing)."""
    import importlib.util

    lib = importlib.import_module(library)
    if kind == "nf4":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: nf4 (bitsandbytes 4-bit) needs a CUDA GPU and none is visible; on this "
                              "machine choose int8 or fp8 (torchao, runs on CPU), or none.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{key}: nf4 needs bitsandbytes: pip install 'glm_training[quant]' (or pip install "
                              "bitsandbytes), or choose int8 / fp8 (torchao).")
        compute = compute_dtype if compute_dtype != torch.float32 else torch.bfloat16
        return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{key}: {kind} uses torchao, which is not installed: pip install -r requirements.txt "
                          "(torchao==0.18.0), or set it to none.")
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # Weight-only: activations (and the LoRA path) stay in bf16/fp32, the frozen matmul dequantizes.
    return lib.TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())


def quantize_linears(module: nn.Module, kind: str, key: str, skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize the nn.Linear weights of an already loaded module in place (families whose
    checkpoints are not diffusers / transformers folders, e.g. BAGEL), skipping names under `skip`."""
    if kind == "nf4":
        raise ConfigError(f"{key}: nf4 is not available for this family's own checkpoint format (bitsandbytes "
                          "loads through diffusers / transformers only); choose int8 or fp8 (torchao).")
    config = quantization_config(kind, "diffusers", key).quant_type
    from torchao.quantization import quantize_

    quantize_(module, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and not name.startswith(skip))
    return module


class ModelFamily(ABC):
    """Base of every family. Subclasses set the class attributes and implement the loaders."""

    name: ClassVar[str]
    #: Trainable components this family offers, e.g. ("unet", "text_encoder", "text_encoder_2").
    component_choices: ClassVar[tuple[str, ...]]
    #: What `model.component` selects: e.g. {"dit": ("transformer",), "both": (...)}.
    component_groups: ClassVar[dict[str, tuple[str, ...]]]
    default_component: ClassVar[str]
    #: LoRA target modules per component when `lora.target_modules` is not set.
    default_lora_targets: ClassVar[dict[str, list[str]]]
    #: Default `dpo.beta` for this family's objective.
    default_dpo_beta: ClassVar[float] = 1000.0
    # -- what the config check asks (`check_config`): declarations, no code per family --------
    #: `training.mode` values this family trains: "t2i" (prompt only) and/or "i2i" (edits).
    modes: ClassVar[tuple[str, ...]] = ("t2i",)
    #: Control images one sample may have (0: none; None: any number).
    max_control_images: ClassVar[int | None] = 0
    #: `training.method` values this family supports.
    methods: ClassVar[tuple[str, ...]] = ("sft", "dpo", "grpo")
    #: The family's own config section (a dataclass), the top-level YAML section named like
    #: the family (`bagel:`); None: the family has none.
    options: ClassVar[type | None] = None
    #: Old key -> its key in the family section; the old one is still read, with a warning.
    renamed_keys: ClassVar[dict[str, str]] = {}
    #: What the denoiser is trained to predict: "epsilon" (DDPM noise / v) or "flow" (velocity);
    #: decides which of model.prediction_type, training.snr_gamma / weighting_scheme act.
    objective_kind: ClassVar[str] = "flow"
    #: Whether the denoiser has a guidance embedding (then model.guidance_scale acts).
    guidance_distilled: ClassVar[bool] = False
    #: Whether `model.train_text_encoder` is supported.
    text_encoder_trainable: ClassVar[bool] = False
    #: Schema keys this family never reads -> why; setting one to a non-default value is an error.
    ignored_keys: ClassVar[dict[str, str]] = {}
    #: Pipeline folders `model.quantize` may quantize (frozen or LoRA-wrapped; never the VAE).
    quantizable: ClassVar[tuple[str, ...]] = ()
    #: Other names `model.quantize` accepts for them (GLM-Image's part names: dit -> transformer).
    quantize_aliases: ClassVar[dict[str, str]] = {}
    #: The folder a pre-quantized `model.gguf_file` replaces (its class has `from_single_file`).
    gguf_component: ClassVar[str | None] = None
    #: Transformer block classes of each component (class names): the FSDP wrap units
    #: (`block_classes`); a component not listed cannot be sharded.
    fsdp_blocks: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Per component, frozen sub-modules FSDP leaves unsharded (a regex, full match on module
    #: names): those the family calls outside the component's forward, where FSDP2 gathers nothing.
    fsdp_unsharded: ClassVar[dict[str, str]] = {}

    @classmethod
    def block_classes(cls, component: str) -> list[str]:
        """Names of the block classes FSDP shards `component` by (one `fully_shard` unit each). Names,
        not types: the accelerator is made before any weight (or class) is loaded."""
        if component not in cls.fsdp_blocks:
            raise ConfigError(f"FSDP (accelerate launch --config_file configs/accelerate/fsdp.yaml): {cls.name} "
                              f"declares no transformer blocks for {component}; launch with ddp.yaml or a "
                              "deepspeed_zero*.yaml config instead.")
        return list(cls.fsdp_blocks[component])

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The config rules that follow from the declarations above (called by `config_from_dict`
        before anything is loaded). Families with more rules extend it."""
        from glm_training.config import schema_default

        mode, method = cfg.training.mode, cfg.training.method
        if mode not in cls.modes:
            if mode == "i2i":
                edit = [name for name in family_names() if "i2i" in family_class(name).modes]
                raise ConfigError(f"training.mode: i2i needs an edit family ({', '.join(edit)}); "
                                  f"{cls.name} has no control-image input.")
            t2i = [name for name in family_names() if "t2i" in family_class(name).modes]
            raise ConfigError(f"model.family: {cls.name} is an edit model; set training.mode: i2i "
                              f"or use a text-to-image family ({', '.join(t2i)}).")
        if cfg.logging.sample_control_images and cls.max_control_images == 0:
            raise ConfigError(f"logging.sample_control_images: {cls.name} takes no control images; remove them.")
        if method not in cls.methods:
            raise ConfigError(f"training.method: {method} is not supported by {cls.name}; "
                              f"use one of {list(cls.methods)}.")
        model, training = cfg.model, cfg.training
        if model.max_sequence_length is not None and getattr(cls, "max_sequence_length", None) is None:
            raise ConfigError(f"model.max_sequence_length: {cls.name} has no text length to set; remove it.")
        if model.guidance_scale is not None and not cls.guidance_distilled:
            raise ConfigError(f"model.guidance_scale: {cls.name} has no guidance embedding (only guidance-distilled "
                              "families such as flux_kontext use it); remove it, and set the sampling guidance "
                              "with logging.sample_guidance_scale / grpo.guidance_scale.")
        if model.train_text_encoder and not cls.text_encoder_trainable:
            raise ConfigError(f"model.train_text_encoder: not supported for {cls.name} (its text encoder stays "
                              "frozen); set it to false.")
        if cls.objective_kind != "epsilon":
            if model.prediction_type is not None:
                raise ConfigError(f"model.prediction_type: {cls.name} is trained with flow matching (velocity "
                                  "target); prediction_type applies to epsilon families only. Remove it.")
            if training.snr_gamma is not None:
                raise ConfigError(f"training.snr_gamma: min-SNR weighting applies to epsilon families; {cls.name} "
                                  "is flow matching: use training.weighting_scheme instead, or remove it.")
        elif training.weighting_scheme != "none":
            raise ConfigError(f"training.weighting_scheme: {training.weighting_scheme!r} is a flow-matching timestep "
                              f"density; {cls.name} is an epsilon family: use training.snr_gamma instead, or set "
                              "it to none.")
        for key, why in cls.ignored_keys.items():
            section, name = key.split(".")
            if getattr(getattr(cfg, section), name) != schema_default(key):
                raise ConfigError(f"{key}: {cls.name} does not use it ({why}); remove it.")
        cls.quantize_plan(cfg)
        if model.gguf_file is not None:
            if cls.gguf_component is None:
                raise ConfigError(f"model.gguf_file: {cls.name} cannot load a GGUF denoiser (diffusers has no "
                                  "single-file loader for it); remove it, or use model.quantize.")
            if not str(model.gguf_file).endswith(".gguf"):
                raise ConfigError(f"model.gguf_file: {model.gguf_file} is not a .gguf file.")
        if model.block_swap and not cfg.lora.enabled:
            raise ConfigError("model.block_swap: streams frozen weights; with full fine-tuning every weight is "
                              "trained (and stays on the GPU with its optimizer state). Use LoRA or set it to 0.")

    @classmethod
    def quantize_plan(cls, cfg: Config) -> dict[str, str]:
        """`model.quantize` -> {pipeline folder: kind} for this family (kinds other than none),
        checked: known folders, known kinds, no fully fine-tuned part, never the VAE."""
        value, key = cfg.model.quantize, "model.quantize"
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return {}
        if isinstance(value, str):
            plan = {folder: value for folder in cls.quantizable}
        elif isinstance(value, dict):
            plan = {}
            for name, kind in value.items():
                folder = cls.quantize_aliases.get(str(name), str(name))
                if folder == "vae":
                    raise ConfigError(f"{key}.vae: the VAE is never quantized (small, and its decode quality "
                                      "shows directly in the images); remove it.")
                if folder not in cls.quantizable:
                    raise ConfigError(f"{key}.{name}: {cls.name} has no quantizable component {name!r}; use "
                                      f"{list(cls.quantizable) + list(cls.quantize_aliases)}.")
                plan[folder] = kind
        else:
            raise ConfigError(f"{key}: expected one of {list(QUANTIZE_KINDS)} or a mapping {{component: kind}}, "
                              f"got {value!r}.")
        if plan and not cls.quantizable:
            raise ConfigError(f"{key}: {cls.name} does not support quantized weights; remove it.")
        for folder, kind in plan.items():
            if not isinstance(kind, str) or kind.lower() not in QUANTIZE_KINDS:
                raise ConfigError(f"{key}.{folder}: {kind!r} is not one of {list(QUANTIZE_KINDS)}.")
        plan = {folder: kind.lower() for folder, kind in plan.items() if kind.lower() != "none"}
        if not cfg.lora.enabled:
            trained = set(cls.component_groups.get(cfg.model.component or cls.default_component, ()))
            if cfg.model.train_text_encoder:
                trained |= {"text_encoder", "text_encoder_2"}
            full = sorted(f for f in plan if f in trained or any(cls.quantize_aliases.get(t) == f for t in trained))
            if full:
                raise ConfigError(f"{key}: {full} are fully fine-tuned (lora.enabled: false) and cannot be "
                                  f"quantized; use LoRA, or set {key}: {{{full[0]}: none}}.")
        return plan

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.weight_dtype = weight_dtype
        self.model_path = resolve_model_path(cfg)
        group = cfg.model.component or self.default_component
        if group not in self.component_groups:
            raise ConfigError(
                f"model.component: {group!r} is not valid for family {self.name}; "
                f"choose one of {sorted(self.component_groups)}.")
        self.component_group = group
        if cfg.model.max_sequence_length is not None:  # check_config refused it for families without one
            self.max_sequence_length = cfg.model.max_sequence_length
        self.trained: list[str] = list(self.component_groups[group])
        # Filled by load(): the nn.Modules by name. Trainers may replace trained entries with
        # their distributed wrappers; `unwrapped()` gives the plain module back.
        self.modules: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------------------------------
    # Loading and trainable parts

    @abstractmethod
    def load(self) -> None:
        """Load weights from `self.model_path` into `self.modules` (frozen parts in eval mode)."""

    def from_pretrained(self, cls: Any, subfolder: str, dtype: torch.dtype | None = None) -> Any:
        """`cls.from_pretrained` of one subfolder of the checkpoint, with `model.revision` / `variant`.
        A path or hub id that cannot be loaded (missing, not a pipeline, another family's
        pipeline, a hub id while offline) raises ConfigError naming the key and what to do."""
        import json
        import os

        library = "diffusers" if cls.__module__.startswith("diffusers") else "transformers"
        # transformers 5 names it dtype (torch_dtype is its deprecated alias).
        kwargs = {("torch_dtype" if library == "diffusers" else "dtype"): dtype} if dtype is not None else {}
        # model.quantize: the library's own quantization_config for this folder (a folder saved
        # quantized carries its config in config.json and loads as it is).
        kind = self.quantize_plan(self.cfg).get(subfolder, "none")
        if self.cfg.model.gguf_file is not None and subfolder == self.gguf_component:
            return self._from_gguf(cls, subfolder, dtype)
        if kind != "none":
            kwargs["quantization_config"] = quantization_config(kind, library, f"model.quantize.{subfolder}",
                                                                dtype or self.weight_dtype)
            if kind == "nf4":  # bitsandbytes quantizes while placing the weights on the GPU
                kwargs["device_map"] = {"": str(self.device)}
        try:
            return cls.from_pretrained(self.model_path, subfolder=subfolder, revision=self.cfg.model.revision,
                                       variant=self.cfg.model.variant, **kwargs)
        except OSError as error:  # EnvironmentError: what diffusers / transformers raise for all of these
            key, path = "model.pretrained_model_name_or_path", self.model_path
            local = Path(path).expanduser()
            if local.is_dir():
                index = local / "model_index.json"
                found = None
                if index.is_file():
                    try:
                        found = json.loads(index.read_text()).get("_class_name")
                    except (OSError, ValueError):
                        pass
                # Pipelines each family loads (model_index.json `_class_name`), to name the mismatch.
                expected = {"sdxl": "StableDiffusionXLPipeline", "flux_kontext": "FluxKontextPipeline",
                            "qwen_image": "QwenImagePipeline", "qwen_image_edit": "QwenImageEditPipeline",
                            "qwen_image_edit_plus": "QwenImageEditPlusPipeline",
                            "glm_image": "GlmImagePipeline"}.get(self.name)
                if found and expected and found != expected:
                    raise ConfigError(
                        f"{key}: {path} holds a {found} (model_index.json), but model.family {self.name} loads a "
                        f"{expected}: set model.family to the family of this model, or point {key} at a "
                        f"{expected} folder. (Loading {subfolder}/ failed: {error})") from None
                if not (local / subfolder).is_dir():
                    what = f"a {found} without {subfolder}/" if found else "not a diffusers pipeline folder"
                    raise ConfigError(f"{key}: {path} is {what} (model.family {self.name} loads {subfolder}/ "
                                      f"from it); point {key} at the folder with model_index.json of a "
                                      f"{expected or self.name} pipeline.") from None
                raise ConfigError(f"{key}: cannot load {path}/{subfolder} ({type(error).__name__}: {error}); the "
                                  "folder may be incomplete or damaged: download it again.") from None
            if path.startswith(("/", ".", "~")) or path.count("/") > 1:  # a hub id is owner/name
                raise ConfigError(f"{key}: {path} does not exist; give a local pipeline folder or a hub id "
                                  "(owner/name).") from None
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise ConfigError(f"{key}: {path} is not a local folder and is not in the Hugging Face cache, and "
                                  "HF_HUB_OFFLINE is set, so it cannot be downloaded: pass a local folder (e.g. "
                                  f"`huggingface-cli download {path} --local-dir ./models/...`) or unset "
                                  "HF_HUB_OFFLINE.") from None
            raise ConfigError(f"{key}: cannot load {subfolder}/ of hub model {path} ({type(error).__name__}: "
                              f"{error}); check the id, model.revision, your network and your token "
                              "(`huggingface-cli login` for gated models).") from None

    def _from_gguf(self, cls: Any, subfolder: str, dtype: torch.dtype | None) -> Any:
        """`model.gguf_file`: a pre-quantized GGUF of the denoiser (diffusers GGUFQuantizationConfig,
        dequantized per matmul in the compute dtype), its config from the checkpoint folder."""
        import importlib.util

        path = Path(self.cfg.model.gguf_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.gguf_file: {path} does not exist.")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError("model.gguf_file: reading GGUF needs the gguf package: pip install -r requirements.txt "
                              "(gguf==0.19.0).")
        from diffusers import GGUFQuantizationConfig

        compute = dtype or self.weight_dtype
        try:
            return cls.from_single_file(str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=compute),
                                        config=self.model_path, subfolder=subfolder, torch_dtype=compute)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ConfigError(f"model.gguf_file: {path} is not a GGUF of {cls.__name__} matching "
                              f"{self.model_path}/{subfolder}/config.json ({type(error).__name__}: {error}).") from None

    def place_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Put a frozen encoder on its device: `model.text_encoder_device` (text encoders) or
        `model.vae_device` (VAE), else the training device. Off the training device, an accelerate
        hook moves each call's inputs there and the outputs back, so callers need not know."""
        key = "model.vae_device" if name == "vae" else "model.text_encoder_device"
        wanted = self.cfg.model.vae_device if name == "vae" else self.cfg.model.text_encoder_device
        device = torch.device(wanted) if wanted and name not in self.trained else self.device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{key}: {wanted} asked for, but no CUDA device is visible; use cpu or remove it.")
        module = module.to(device)
        if device != self.device:
            from accelerate.hooks import AlignDevicesHook, add_hook_to_module

            # The VAE's encode / decode call its children, the text encoders their forward.
            targets = ([child for child in module.children() if any(True for _ in child.parameters())]
                       if name == "vae" else [module])
            for target in targets:
                add_hook_to_module(target, AlignDevicesHook(execution_device=device, io_same_device=True))
        return module

    def transformer_blocks(self, component: str) -> list[nn.Module]:
        """The repeated blocks of `component` that `model.block_swap` streams, in execution order
        (the diffusers transformers' `transformer_blocks` then `single_transformer_blocks`)."""
        module = self.unwrapped(component)
        blocks: list[nn.Module] = []
        for attr in ("transformer_blocks", "single_transformer_blocks"):
            if isinstance(getattr(module, attr, None), nn.ModuleList):
                blocks.extend(getattr(module, attr))
        return blocks

    def setup_block_swap(self) -> None:
        """`model.block_swap: N`: N blocks of the trained denoiser live in pinned CPU memory and are
        streamed to the GPU around their forward and backward (`models.offload.BlockSwap`)."""
        from glm_training.models.offload import SWAP_BUFFER_BLOCKS, BlockSwap

        count = self.cfg.model.block_swap
        name = next((n for n in self.trained if self.transformer_blocks(n)), None)
        if name is None:
            raise ConfigError(f"model.block_swap: {', '.join(self.trained)} of {self.name} has no transformer block "
                              "list to swap; set it to 0.")
        if self.device.type != "cuda":
            logging.getLogger(__name__).warning(
                "model.block_swap: %d ignored: training runs on %s, and block swap streams weights from CPU "
                "memory to a CUDA GPU; every block stays where it is.", count, self.device)
            return
        blocks = self.transformer_blocks(name)
        if count > len(blocks) - SWAP_BUFFER_BLOCKS:
            raise ConfigError(f"model.block_swap: {count}, but {name} has {len(blocks)} blocks; swap at most "
                              f"{len(blocks) - SWAP_BUFFER_BLOCKS}.")
        self.block_swapper = BlockSwap(self.unwrapped(name), blocks, count, self.device)

    def components(self) -> dict[str, nn.Module]:
        """The trainable parts by name."""
        return {name: self.modules[name] for name in self.trained}

    def unwrapped(self, name: str) -> nn.Module:
        """The plain module (DDP / DeepSpeed wrappers removed; an FSDP2 module is sharded in place and
        stays itself: read its full weights inside `full_weights()`)."""
        module = self.modules[name]
        while hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module  # DDP / accelerate wrappers
        return getattr(module, "_orig_mod", module)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Every rank: inside, rank 0 reads the trained modules' full (unsharded) weights, e.g. to
        write the user-facing files. FSDP2: the full state dict is gathered to rank 0's CPU memory
        and served by the modules' `state_dict()` (what peft / diffusers save from) and by
        `trainable_state_dict()`; DeepSpeed ZeRO-3: the engine's parameters gathered. Otherwise
        nothing changes."""
        from torch.distributed.tensor import DTensor

        patched = []
        with contextlib.ExitStack() as stack:
            for name in self.trained:
                module = self.unwrapped(name)
                if any(isinstance(p, DTensor) for p in module.parameters()):
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                    # Collective; rank 0 gets the tensors (on CPU), the other ranks an empty dict.
                    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
                    module.state_dict = lambda *args, _full=full, **kwargs: dict(_full)
                    patched.append(module)
                    continue
                params = [p for p in module.parameters() if hasattr(p, "ds_id")]  # ZeRO-3 partitioned
                if params:
                    import deepspeed

                    stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            try:
                yield
            finally:
                for module in patched:
                    del module.state_dict  # the class's state_dict (FSDP's sharded one) again

    def lora_targets(self, component: str) -> list[str]:
        override = self.cfg.lora.components.get(component)
        if override is not None and override.target_modules:
            return override.target_modules
        if component.startswith("text_encoder"):
            return self.cfg.lora.text_encoder_target_modules
        return self.cfg.lora.target_modules or self.default_lora_targets[component]

    def component_lora(self, component: str) -> dict[str, Any]:
        """LoRA settings of one component: `lora.components.<component>` over the global `lora` values."""
        lora = self.cfg.lora
        unknown = sorted(set(lora.components) - set(self.component_choices))
        if unknown:
            raise ConfigError(f"lora.components: {unknown} are not components of {self.name}; "
                              f"use {list(self.component_choices)}.")
        override = lora.components.get(component)
        settings = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "init": lora.init,
                    "pretrained_weight": lora.pretrained_weight}
        if override is not None:
            settings.update({k: getattr(override, k) for k in settings if getattr(override, k) is not None})
        settings["target_modules"] = self.lora_targets(component)
        return settings

    def setup_training(self) -> None:
        """Freeze everything, then make the selected components trainable (LoRA or full)."""
        from peft import LoraConfig as PeftLoraConfig

        for module in self.modules.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
                module.eval()
        lora = self.cfg.lora
        for name in self.trained:
            module = self.modules[name]
            if lora.enabled:
                settings = self.component_lora(name)  # global lora values, per-component overrides
                targets = settings["target_modules"]
                peft_config = PeftLoraConfig(
                    r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                    init_lora_weights=True if settings["init"] == "default" else settings["init"],
                    target_modules=targets)
                # Checked before add_adapter: peft's own error names neither the config key nor the modules.
                from peft.tuners.tuners_utils import check_target_module_exists

                module_names = [n for n, _ in module.named_modules() if n]
                if not any(check_target_module_exists(peft_config, n) for n in module_names):
                    override = lora.components.get(name)
                    key = (f"lora.components.{name}.target_modules" if override is not None and override.target_modules
                           else "lora.text_encoder_target_modules" if name.startswith("text_encoder")
                           else "lora.target_modules" if lora.target_modules
                           else f"the default LoRA targets of {self.name}")
                    import collections

                    # The most repeated layer names first: those are the usual LoRA targets (to_q, ...).
                    leaves = collections.Counter(".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit()
                                                 else n.split(".")[-1] for n, m in module.named_modules()
                                                 if n and isinstance(m, (nn.Linear, nn.Conv2d)))
                    raise ConfigError(f"{key}: {targets} match no module of {name}; name the last part(s) of its "
                                      f"Linear/Conv layer names, e.g. {[n for n, _ in leaves.most_common(12)]}.")
                module.add_adapter(peft_config)
                if not any(p.requires_grad for p in module.parameters()):
                    raise ConfigError(f"lora.target_modules {targets} matched no module of {name}.")
                # Trainable LoRA weights in fp32 even when the base is fp16/bf16 (stable updates).
                for p in module.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
            else:
                module.to(torch.float32)
                module.requires_grad_(True)
            module.train()
            if self.cfg.model.gradient_checkpointing:
                self.enable_gradient_checkpointing(module)
        if lora.enabled and lora.pretrained_weight:
            self.load_adapter_weights(lora.pretrained_weight)
        if self.cfg.model.block_swap:
            self.setup_block_swap()

    def enable_gradient_checkpointing(self, module: nn.Module) -> None:
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable()
        else:
            raise ConfigError(f"model.gradient_checkpointing: {type(module).__name__} does not support it.")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, as `component.parameter_name` (what a checkpoint stores)."""
        state = {}
        for name in self.trained:
            module = self.unwrapped(name)
            full = module.state_dict() if "state_dict" in vars(module) else None  # inside full_weights (FSDP)
            for pname, p in module.named_parameters():
                if p.requires_grad:
                    state[f"{name}.{pname}"] = full[pname] if full is not None else p.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                "the checkpoint does not match the trainable parameters of this config "
                f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:3]}). Was it written with the same model.component and lora settings "
                "(lora.target_modules, lora.components)?")
        wrong = [(key, tuple(state[key].shape), tuple(tensor.shape)) for key, tensor in expected.items()
                 if tuple(state[key].shape) != tuple(tensor.shape)]
        if wrong:
            lora_shaped = all(".lora_A." in k or ".lora_B." in k for k, _, _ in wrong)
            ranks = {saved[0] if ".lora_A." in k else saved[-1] for k, saved, _ in wrong if lora_shaped and saved}
            changed = (f"lora.rank (or lora.components.<name>.rank) changed: the checkpoint was trained with rank "
                       f"{sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)}, this config asks for "
                       f"{self.cfg.lora.rank}" if lora_shaped else
                       "the model (model.pretrained_model_name_or_path) or its trained components differ")
            listing = "; ".join(f"{k}: saved {list(a)}, expected {list(b)}" for k, a, b in wrong[:3])
            raise ConfigError(f"{len(wrong)} tensor(s) of the checkpoint have other shapes than this config's "
                              f"({listing}{'; ...' if len(wrong) > 3 else ''}): {changed}. Resume with the "
                              "settings the checkpoint was written with (its run folder's config.yaml), or "
                              "start a new run.")
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(state[key].to(tensor.device, tensor.dtype))

    def snapshot_reference(self) -> None:
        """Full fine-tuning: keep a frozen copy of the trained components as the reference (DPO,
        GRPO's KL). Call it before the first optimizer step (trainers do, in setup); `reference()`
        takes the copy itself on first use otherwise. LoRA needs no copy (adapter disabled)."""
        if self.cfg.lora.enabled or getattr(self, "_reference_modules", None) is not None:
            return
        import copy
        import logging

        copies, size = {}, 0
        for name in self.trained:
            # Same dtype as the policy, so policy == reference holds exactly at step 0.
            frozen = copy.deepcopy(self.unwrapped(name)).eval().requires_grad_(False)
            size += sum(p.numel() * p.element_size() for p in frozen.parameters())
            copies[name] = frozen
        self._reference_modules = copies
        logging.getLogger(__name__).warning(
            "Full fine-tuning (lora.enabled: false): the frozen reference is a copy of %s holding %.2f GB "
            "more memory on %s. Use LoRA (its reference is the base with the adapter disabled) to avoid it.",
            ", ".join(self.trained), size / 1024**3, self.device)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the frozen reference: LoRA adapters disabled, or (full fine-tuning) the frozen copy
        of the trained components taken by `snapshot_reference()` swapped in."""
        if not self.cfg.lora.enabled:
            self.snapshot_reference()
            saved = {name: self.modules[name] for name in self._reference_modules}
            self.modules.update(self._reference_modules)
            try:
                yield
            finally:
                self.modules.update(saved)
            return
        modules = [self.unwrapped(name) for name in self.trained]
        for module in modules:
            module.disable_adapters()
        try:
            yield
        finally:
            for module in modules:
                module.enable_adapters()

    @contextlib.contextmanager
    def old_policy(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Run DiffusionNFT's old policy, which samples the rollouts and trails the trained one
        (`algorithms.nft.update_old_policy`). LoRA: a second peft adapter "old" on each trained
        module (set active here, "default" again on exit); full fine-tuning: a frozen copy of the
        trained components swapped in, as `reference()` does. Both start equal to the trained
        weights and are kept in float32 (a bf16 copy would round small EMA updates away); the
        first call creates them, so call it once before the optimizer is built. Yields the old
        tensors paired with the trained ones by `component.parameter` name (EMA, checkpoints)."""
        import copy
        import warnings

        from peft.tuners.tuners_utils import BaseTunerLayer

        if getattr(self, "_old_policy_pairs", None) is None:
            pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            if not self.cfg.lora.enabled:
                self._old_modules = {}
                for name in self.trained:
                    trained = self.unwrapped(name)
                    frozen = copy.deepcopy(trained).eval().requires_grad_(False).float()
                    self._old_modules[name] = frozen
                    old_params = dict(frozen.named_parameters())
                    pairs.update({f"{name}.{pname}": (old_params[pname], p)
                                  for pname, p in trained.named_parameters() if p.requires_grad})
            else:
                for name in self.trained:
                    module = self.unwrapped(name)
                    if "old" not in getattr(module, "peft_config", {}):
                        layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
                        active = [list(layer.active_adapters) for layer in layers]
                        with warnings.catch_warnings():  # peft warns that a second adapter is added: wanted
                            warnings.simplefilter("ignore", UserWarning)
                            module.add_adapter(copy.deepcopy(module.peft_config["default"]), adapter_name="old")
                        for layer, names in zip(layers, active):  # add_adapter may activate "old"
                            layer.set_adapter(names)
                    for mname, layer in module.named_modules():
                        if not isinstance(layer, BaseTunerLayer):
                            continue
                        for attr in layer.adapter_layer_names:
                            adapters = getattr(layer, attr)
                            if "old" not in adapters:
                                continue
                            current = dict(adapters["default"].named_parameters())
                            for pname, old in adapters["old"].named_parameters():
                                old.requires_grad_(False)
                                old.data = current[pname].detach().float().clone()
                                # Named as the trained tensor (trainable_state_dict), "default" included.
                                pairs[f"{name}.{mname}.{attr}.default.{pname}"] = (old, current[pname])
            if not pairs:
                raise ConfigError(f"training.method nft: no trained weights of {', '.join(self.trained)} to keep an "
                                  "old policy of.")
            self._old_policy_pairs = pairs
        if not self.cfg.lora.enabled:
            saved = {name: self.modules[name] for name in self._old_modules}
            self.modules.update(self._old_modules)
            try:
                yield self._old_policy_pairs
            finally:
                self.modules.update(saved)
            return
        layers = [m for name in self.trained for m in self.unwrapped(name).modules() if isinstance(m, BaseTunerLayer)]
        active = [list(layer.active_adapters) for layer in layers]
        for layer in layers:
            layer.set_adapter("old", inference_mode=True)
        try:
            yield self._old_policy_pairs
        finally:
            for layer, names in zip(layers, active):
                layer.set_adapter(names)  # the trained adapter active (and trainable) again

    # ------------------------------------------------------------------------------------------
    # Saving what users load elsewhere

    @abstractmethod
    def save_adapter(self, out_dir: Path) -> list[Path]:
        """Write the trained weights where users load them (diffusers LoRA layout, ComfyUI,
        or full component folders); return the files written."""

    @abstractmethod
    def load_adapter_weights(self, path: str) -> None:
        """Initialise the trained adapters from a file written by `save_adapter` (or compatible)."""

    def load_run_state(self, folder: Path) -> None:
        """On resume, every rank: what the family itself keeps of a run (e.g. counters it writes
        with `save_adapter`), read back from the checkpoint `folder`."""

    def predict_images(self, prompt: str, controls: list, *, height: int, width: int, steps: int,
                       guidance: float, seed: int) -> list:
        """`glm_training.predict`: the images of one prompt (and its control / source images) as a
        user of the family's diffusers pipeline gets them at this seed; by default `sample`."""
        control = [controls[0] if len(controls) == 1 else list(controls)] if controls else None
        return self.sample([prompt], height=height, width=width, num_inference_steps=steps,
                           guidance_scale=guidance, seed=seed, control_images=control)

    def cache_identity(self) -> str:
        """What identifies the frozen encoders for the embedding cache (content, not path)."""
        from glm_training.data.cache import fingerprint_model_dir

        return fingerprint_model_dir(self.model_path, self.cfg.model.revision, self.cfg.model.variant)

    # ------------------------------------------------------------------------------------------
    # Trainable parts and what trainers ask of the family as a whole

    @abstractmethod
    def make_parts(self) -> list[Any]:
        """The trained parts of this run (`model.component`), each an instance of a kind from
        `glm_training.parts` (Denoiser, TokenPolicy) bound to this family's hooks."""

    def parts(self) -> list[Any]:
        """The trained parts (built once; they hold the run's encoder and sampler)."""
        if getattr(self, "_parts", None) is None:
            self._parts = self.make_parts()
        return self._parts

    def dataset(self, records: list, layout: str) -> torch.utils.data.Dataset:
        """The torch dataset of `records`: "images" (SFT targets), "pairs" (DPO) or "prompts"."""
        from glm_training.data import datasets as ds

        data, seed = self.cfg.data, self.cfg.training.seed
        if data.buckets and layout != "images":
            raise ConfigError(f"data.buckets: not supported by training.method {self.cfg.training.method} yet "
                              "(SFT only); set data.buckets: false.")
        if layout == "prompts":
            return ds.PromptDataset(records, data.resolution)
        if layout == "pairs":
            return ds.PreferenceDataset(records, data.resolution, data.center_crop, data.random_flip, seed=seed)
        buckets = None
        if data.buckets:
            try:
                buckets = ds.make_buckets(data.resolution, self.resolution_multiple, tuple(data.bucket_aspect_range),
                                          data.bucket_step)
            except ds.DataError as error:
                raise ConfigError(str(error)) from None
        return ds.ImageDataset(records, data.resolution, data.center_crop, data.random_flip, seed=seed,
                               buckets=buckets)

    def prepare(self, records: list, caption_dropout: float | None = None, use_cache: bool = True) -> None:
        """Bind the run's records to every part (and to helpers a family keeps, e.g. a frozen decoder)."""
        for part in self.parts():
            part.prepare(records, caption_dropout, use_cache)

    def setup_rollouts(self, steps: int, guidance_scale: float, noise_level: float,
                       sde_window: list[int] | None = None) -> None:
        """GRPO: the parts' rollout samplers (`grpo.sample_steps`, guidance, SDE noise level / window)."""
        for part in self.parts():
            part.setup_rollouts(steps, guidance_scale, noise_level, sde_window)

    def rollout(self, batch: dict[str, Any], group: int, seed: int, step: int) -> "Generation":
        """GRPO: `group` members per prompt of `batch` sampled with the current trained parts ->
        the images and each trained part's rollout record. A family with one trained denoiser
        needs nothing more; families whose parts chain (GLM-Image: AR tokens -> DiT) override it."""
        from glm_training.parts.common import SALT_ROLLOUT, member_generators

        (part,) = self.parts()
        generators = member_generators(seed, step, batch["index"], group, SALT_ROLLOUT)
        record, images = part.rollout(batch, group, generators)
        return Generation(images, {part.name: record})

    def on_scored(self, generation: "Generation", totals: dict[str, torch.Tensor],
                  per_reward: dict[str, torch.Tensor], step: int) -> None:
        """Called with every rollout's rewards (e.g. to log completions next to their rewards)."""

    def rollout_captions(self, generation: "Generation") -> list[str] | None:
        """Captions of the rollout grid's images (None: each member's prompt), e.g. a rewrite."""
        return None

    def eval_images(self, batch: dict[str, Any], records: list, seed: int, steps: int,
                    guidance_scale: float) -> "Generation":
        """Deterministic samples (ODE, fixed seeds) of every prompt of `batch` for evaluation."""
        (part,) = self.parts()
        return Generation(part.decode(batch, 1, part.eval_noise(len(batch["prompt"]), seed), steps,
                                      guidance_scale, records), {})


class Generation:
    """What a rollout or an evaluation produced: images in [0, 1] (B*G, 3, H, W), each trained
    part's record, and per-member metadata for rewards (e.g. the sampled image tokens)."""

    def __init__(self, images: torch.Tensor, records: dict[str, Any], metadata: list[dict] | None = None):
        self.images, self.records, self.metadata = images, records, metadata


@runtime_checkable
class DenoiserHooks(Protocol):
    """What a family gives its denoiser part (`glm_training.parts.Denoiser`): the shared code builds
    the SFT loss, Diffusion-DPO, the ODE/SDE/DDIM sampler, Flow-GRPO / DDPO and DiffusionNFT from it."""

    objective: Any  # EpsilonObjective or FlowMatchingObjective: noise, target, loss weights, schedule

    def encode_prompt(self, prompts: list[str], control_images: list | None = None) -> dict[str, torch.Tensor]: ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def condition(self, prompt_embeds: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]: ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: dict[str, Any]
                ) -> torch.Tensor: ...


@runtime_checkable
class TokenPolicyHooks(Protocol):
    """What a token-policy part (`glm_training.parts.TokenPolicy`) implements: teacher-forced
    per-token log-probs, and sampling with the log-probs of the distribution sampled from. From
    these the shared code builds token CE, token DPO and token GRPO."""

    def token_logprobs(self, prompts: list[str], *, tokens: torch.Tensor | None = None,
                       target_pixels: torch.Tensor | None = None, controls: list | None = None,
                       temperature: float = 1.0) -> torch.Tensor: ...

    def sample_tokens(self, prompts: list[str], *, seed: int, temperature: float = 1.0,
                      controls: list | None = None) -> dict[str, torch.Tensor]: ...


class DiffusionFamily(ModelFamily):
    """A family trained with a denoising objective on latents."""

    #: Whether the prompt encoding depends on the control images (Qwen-Image-Edit's VL encoder).
    prompt_uses_images: ClassVar[bool] = False
    #: Image sides must be multiples of this (VAE factor x patch size); buckets round to it.
    resolution_multiple: ClassVar[int] = 8
    methods: ClassVar[tuple[str, ...]] = ("sft", "dpo", "grpo", "nft")  # nft: DiffusionNFT on the denoiser

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(cfg, device, weight_dtype)
        if cfg.data.resolution % self.resolution_multiple:
            raise ConfigError(f"data.resolution: {cfg.data.resolution} must be a multiple of "
                              f"{self.resolution_multiple} for {self.name} (VAE downsampling x patch size).")

    objective: Any  # EpsilonObjective or FlowMatchingObjective, set by load()

    def make_parts(self) -> list[Any]:
        """One denoiser named after `model.component` (its text encoders, when trained, train
        through the denoiser's loss)."""
        from glm_training.parts import Denoiser

        return [Denoiser(self, self.component_group)]

    def load_autoencoder(self, cls: Any) -> Any:
        """The VAE on the device, in float32 unless its config says half precision is safe
        (`force_upcast: false`): the SDXL / FLUX VAEs overflow in fp16."""
        vae = self.from_pretrained(cls, "vae", torch.float32)
        if not vae.config.get("force_upcast", True):
            vae.to(self.weight_dtype)
        return self.place_frozen("vae", vae)

    def flow_matching_objective(self, scheduler_config: dict, patch_size: int = 2):
        """Flow matching with the scheduler's shift (static, or resolution-dependent as the
        pipelines' `calculate_shift`) and the timestep density of `training.weighting_scheme`."""
        from glm_training.algorithms.objectives import FlowMatchingObjective, FlowShift

        config = scheduler_config
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ConfigError(f"{self.model_path}/scheduler: time_shift_type {config['time_shift_type']!r} "
                              "is not supported (only 'exponential').")
        if config.get("use_dynamic_shifting", False):
            shift = FlowShift(dynamic=True, base_shift=config.get("base_shift", 0.5),
                              max_shift=config.get("max_shift", 1.15),
                              base_image_seq_len=config.get("base_image_seq_len", 256),
                              max_image_seq_len=config.get("max_image_seq_len", 4096))
        else:
            shift = FlowShift(shift=float(config.get("shift", 1.0)))
        training = self.cfg.training
        return FlowMatchingObjective(shift, training.weighting_scheme, training.logit_mean, training.logit_std,
                                     training.mode_scale, patch_size=patch_size)

    @abstractmethod
    def encode_prompt(self, prompts: list[str], control_images: list[list[torch.Tensor]] | None = None
                      ) -> dict[str, torch.Tensor]:
        """Prompt embeddings, batch first, one entry per prompt (cacheable per sample)."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> normalised latents (cacheable per sample)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1]."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents (no batch dim) for an image of this size."""

    def collate_prompt_embeds(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack per-sample prompt embeddings (families with variable lengths pad here)."""
        return {key: torch.cat([item[key] for item in items]) for key in items[0]}

    @abstractmethod
    def condition(self, prompt_embeds: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Everything `predict` needs besides the noisy latents (cheap to build per step)."""

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                condition: dict[str, Any]) -> torch.Tensor:
        """The network's prediction (epsilon, v or velocity, per `objective`), in latent layout."""

    @abstractmethod
    def sample(self, prompts: list[str], *, height: int, width: int, num_inference_steps: int,
               guidance_scale: float, seed: int, control_images: list | None = None,
               prompt_embeds: dict | None = None, negative_prompt_embeds: dict | None = None) -> list:
        """Generate PIL images with the current weights through the family's diffusers pipeline.
        Given `prompt_embeds` (from the cache), the text encoders are not needed."""


_FAMILIES = {
    "sdxl": "glm_training.models.sdxl:SDXLFamily",
    "flux_kontext": "glm_training.models.flux_kontext:FluxKontextFamily",
    "qwen_image": "glm_training.models.qwen_image:QwenImageFamily",
    "qwen_image_edit": "glm_training.models.qwen_image:QwenImageEditFamily",
    "qwen_image_edit_plus": "glm_training.models.qwen_image:QwenImageEditPlusFamily",
    "glm_image": "glm_training.models.glm_image:GlmImageFamily",
    "bagel": "glm_training.models.bagel.family:BagelFamily",
    "prompt_policy": "glm_training.models.prompt_policy:PromptPolicyFamily",
}


def register_family(name: str, cls_or_path: type[ModelFamily] | str) -> None:
    """Make `model.family: name` select this class (or "module:Class", imported on first use),
    e.g. a family defined outside glm_training, or a throwaway one in a test."""
    _FAMILIES[name] = cls_or_path


def family_names() -> list[str]:
    return list(_FAMILIES)


def family_class(name: str) -> type[ModelFamily]:
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, list(_FAMILIES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.family: unknown family {name!r}.{hint} Available: {sorted(_FAMILIES)}.")
    if not isinstance(_FAMILIES[name], str):
        return _FAMILIES[name]
    module_name, class_name = _FAMILIES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("glm_training"):
            raise ConfigError(f"model.family: {name} is not available in this version "
                              f"({module_name} is missing).") from None
        raise
    return getattr(module, class_name)


def build_family(cfg: Config, device: torch.device | str = "cpu", load: bool = True) -> ModelFamily:
    """The family of `model.family`; with `load=False` only its declarations and parts (no weight read)."""
    cls = family_class(cfg.model.family)
    family = cls(cfg, torch.device(device), resolve_weight_dtype(cfg))
    if load:
        family.load()
    return family
