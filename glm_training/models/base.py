"""The model-family interface: what trainers need from a model, and nothing more.

Trainers (SFT, DPO, GRPO) are written once against this interface. A family is one file that
loads its checkpoint, names its trainable components, and implements either the diffusion side
(`encode_prompt`, `encode_images`, `condition`, `predict`, `objective`, `sample`) or the token
side (`token_logprobs`, `generate`), or both (BAGEL).

LoRA, full fine-tuning, per-component learning rates, the frozen reference (adapter disabled)
and checkpoint state are handled here generically, on the modules `components()` returns.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator

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
    #: What DPO trains on pairs, when it is not the SFT terms: "errors" = the family computes
    #: per-sample flow errors itself (`preference_errors`, BAGEL's packed sequences).
    preference_terms: ClassVar[tuple[str, ...] | None] = None

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
        if cfg.model.max_sequence_length is not None:
            if not hasattr(self, "max_sequence_length"):
                raise ConfigError(f"model.max_sequence_length: {self.name} has no text length to set; remove it.")
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
        """`cls.from_pretrained` of one subfolder of the checkpoint, with `model.revision` / `variant`."""
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        return cls.from_pretrained(self.model_path, subfolder=subfolder, revision=self.cfg.model.revision,
                                   variant=self.cfg.model.variant, **kwargs)

    def components(self) -> dict[str, nn.Module]:
        """The trainable parts by name."""
        return {name: self.modules[name] for name in self.trained}

    def unwrapped(self, name: str) -> nn.Module:
        module = self.modules[name]
        while hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module  # DDP / accelerate wrappers
        return getattr(module, "_orig_mod", module)

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
                module.add_adapter(PeftLoraConfig(
                    r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                    init_lora_weights=True if settings["init"] == "default" else settings["init"],
                    target_modules=targets))
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
            for pname, p in self.unwrapped(name).named_parameters():
                if p.requires_grad:
                    state[f"{name}.{pname}"] = p.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                "Checkpoint does not match the trainable parameters of this config "
                f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:3]}). Was it written with the same model.component and lora settings?")
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

    # ------------------------------------------------------------------------------------------
    # Saving what users load elsewhere

    @abstractmethod
    def save_adapter(self, out_dir: Path) -> list[Path]:
        """Write the trained weights where users load them (diffusers LoRA layout, ComfyUI,
        or full component folders); return the files written."""

    @abstractmethod
    def load_adapter_weights(self, path: str) -> None:
        """Initialise the trained adapters from a file written by `save_adapter` (or compatible)."""

    def cache_identity(self) -> str:
        """What identifies the frozen encoders for the embedding cache (content, not path)."""
        from glm_training.data.cache import fingerprint_model_dir

        return fingerprint_model_dir(self.model_path, self.cfg.model.revision, self.cfg.model.variant)


class DiffusionFamily(ModelFamily):
    """A family trained with a denoising objective on latents."""

    #: Whether the prompt encoding depends on the control images (Qwen-Image-Edit's VL encoder).
    prompt_uses_images: ClassVar[bool] = False
    #: Image sides must be multiples of this (VAE factor x patch size); buckets round to it.
    resolution_multiple: ClassVar[int] = 8
    #: Losses of the trained components, summed by SFT (and used by DPO / GRPO): "denoising" (the
    #: objective on latents) and, for families with a token side (GLM-Image's AR), "tokens"
    #: (`token_sft_loss`, `image_token_logprobs`).
    sft_loss_terms: tuple[str, ...] = ("denoising",)
    #: Whether `model.train_text_encoder` is supported (SDXL); the others keep their encoders frozen.
    text_encoder_trainable: ClassVar[bool] = False

    def __init__(self, cfg: Config, device: torch.device, weight_dtype: torch.dtype):
        super().__init__(cfg, device, weight_dtype)
        if cfg.model.train_text_encoder and not self.text_encoder_trainable:
            raise ConfigError(f"model.train_text_encoder: not supported for {self.name} (its text encoder stays "
                              "frozen); set it to false.")
        if cfg.data.resolution % self.resolution_multiple:
            raise ConfigError(f"data.resolution: {cfg.data.resolution} must be a multiple of "
                              f"{self.resolution_multiple} for {self.name} (VAE downsampling x patch size).")

    objective: Any  # EpsilonObjective or FlowMatchingObjective, set by load()

    def load_autoencoder(self, cls: Any) -> Any:
        """The VAE on the device, in float32 unless its config says half precision is safe
        (`force_upcast: false`): the SDXL / FLUX VAEs overflow in fp16."""
        vae = self.from_pretrained(cls, "vae", torch.float32)
        if not vae.config.get("force_upcast", True):
            vae.to(self.weight_dtype)
        return vae.to(self.device)

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
}


def family_class(name: str) -> type[ModelFamily]:
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, list(_FAMILIES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.family: unknown family {name!r}.{hint} Available: {sorted(_FAMILIES)}.")
    module_name, class_name = _FAMILIES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("glm_training"):
            raise ConfigError(f"model.family: {name} is not available in this version "
                              f"({module_name} is missing).") from None
        raise
    return getattr(module, class_name)


def build_family(cfg: Config, device: torch.device | str = "cpu") -> ModelFamily:
    cls = family_class(cfg.model.family)
    family = cls(cfg, torch.device(device), resolve_weight_dtype(cfg))
    family.load()
    return family
