"""FLUX.1 Kontext: a flow-matching transformer on 2x2-packed VAE latents, CLIP + T5 text encoders.

Everything the transformer sees is built as `FluxKontextPipeline` builds it, with its own helpers:
- text: the pipeline's `encode_prompt` (CLIP pooled output + T5 sequence, `max_sequence_length`
  tokens); `txt_ids` are zeros.
- image: latents normalised with the VAE's shift and scaling factors, packed 2x2 into tokens
  (`_pack_latents`); `img_ids` = (0, row, col) from `_prepare_latent_image_ids`.
- edit (i2i): the control image's latents are packed the same way and appended after the target
  tokens, with ids whose first channel is 1; only the target tokens' output is kept.
- timestep: the sigma in [0, 1] (the pipeline passes `t / 1000` with `t = 1000 sigma`);
  guidance: `model.guidance_scale` through the guidance embedding of guidance-distilled checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from glm_training.config import ConfigError
from glm_training.models.base import DiffusionFamily
from glm_training.models.lora_io import load_lora_into_modules, save_transformer_lora

# Attention projections of the double-stream (image + context) and single-stream blocks, as
# diffusers' FLUX LoRA scripts target them; these are also the keys ComfyUI maps for FLUX.
FLUX_ATTENTION_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                          "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]


class FluxKontextFamily(DiffusionFamily):
    name = "flux_kontext"
    component_choices = ("transformer",)
    component_groups = {"transformer": ("transformer",)}
    default_component = "transformer"
    quantizable = ("transformer", "text_encoder", "text_encoder_2")
    gguf_component = "transformer"
    fsdp_blocks = {"transformer": ("FluxTransformerBlock", "FluxSingleTransformerBlock")}
    default_lora_targets = {"transformer": FLUX_ATTENTION_TARGETS}
    default_dpo_beta = 1000.0  # flow-matching DPO (ALGORITHMS.md: ~100-2000; FLUX LoRA spiked at 500)
    resolution_multiple = 16  # VAE 8x, then 2x2 packing
    modes = ("t2i", "i2i")
    max_control_images = 1
    guidance_distilled = True  # model.guidance_scale feeds the guidance embedding
    #: T5 tokens per prompt: what FLUX.1 Kontext dev was trained with and the pipeline's default.
    max_sequence_length = 512

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        targets = cfg.lora.target_modules or FLUX_ATTENTION_TARGETS
        if cfg.lora.enabled and cfg.lora.save_format != "diffusers" and any("attn." not in t for t in targets):
            raise ConfigError(f"lora.save_format: {cfg.lora.save_format} - the kohya/ComfyUI FLUX layout holds "
                              f"attention projections only, lora.target_modules has {targets}; use "
                              f"{FLUX_ATTENTION_TARGETS} or lora.save_format: diffusers.")
        self.guidance_value = 1.0 if cfg.model.guidance_scale is None else float(cfg.model.guidance_scale)

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

        transformer = self.from_pretrained(FluxTransformer2DModel, "transformer", self.weight_dtype).to(self.device)
        vae = self.load_autoencoder(AutoencoderKL)
        self.modules = {"transformer": transformer, "vae": vae}
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.pipeline_class = FluxKontextPipeline
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            self.model_path, subfolder="scheduler", revision=self.cfg.model.revision)
        self.objective = self.flow_matching_objective(self.scheduler_config)

    def _load_text_encoders(self) -> None:
        """Loaded on first use, so runs from a filled cache never instantiate them."""
        if "text_encoder" in self.modules:
            return
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):
            module = self.place_frozen(name, self.from_pretrained(cls, name, self.weight_dtype)).eval()
            module.requires_grad_(False)
            self.modules[name] = module
        revision = self.cfg.model.revision
        self.tokenizers = [CLIPTokenizer.from_pretrained(self.model_path, subfolder="tokenizer", revision=revision),
                           T5TokenizerFast.from_pretrained(self.model_path, subfolder="tokenizer_2",
                                                           revision=revision)]

    def pipeline(self, with_text_encoders: bool = False) -> Any:
        """The real diffusers pipeline around the current (unwrapped, LoRA-carrying) weights."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if with_text_encoders:
            self._load_text_encoders()
        has_text = "text_encoder" in self.modules
        return self.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.modules["vae"], transformer=self.unwrapped("transformer"),
            text_encoder=self.modules["text_encoder"] if has_text else None,
            tokenizer=self.tokenizers[0] if has_text else None,
            text_encoder_2=self.modules["text_encoder_2"] if has_text else None,
            tokenizer_2=self.tokenizers[1] if has_text else None)

    # -- packing (the pipeline's own static helpers) ---------------------------------------------

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens."""
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even height and width, got {h}x{w}; image sides must be "
                             f"multiples of {self.resolution_multiple}.")
        return self.pipeline_class._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, tokens, 4C) -> (B, C, height, width) latents (latent-space sides)."""
        f = self.vae_scale_factor
        return self.pipeline_class._unpack_latents(tokens, height * f, width * f, f)

    def image_ids(self, height: int, width: int, device, dtype, control: bool = False) -> torch.Tensor:
        """Position ids of a (height, width) latent, as the pipeline builds them; control images
        get 1 in the first channel (Kontext's marker for context tokens)."""
        ids = self.pipeline_class._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
        if control:
            ids[..., 0] = 1
        return ids

    # -- diffusion interface ----------------------------------------------------------------------

    def encode_prompt(self, prompts, control_images=None):
        self._load_text_encoders()
        pipe = self.pipeline()
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                   max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_images(self, pixel_values):
        vae = self.modules["vae"]
        # The mode (the pipeline's "argmax"), not a sample: cached and uncached runs train the same.
        latents = vae.encode(pixel_values.to(self.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, latents):
        vae = self.modules["vae"]
        latents = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents).sample

    def latent_shape(self, height, width):
        if height % self.resolution_multiple or width % self.resolution_multiple:
            raise ValueError(f"flux_kontext: image sides must be multiples of {self.resolution_multiple}, "
                             f"got {height}x{width}.")
        vae = self.modules["vae"]
        return (vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def condition(self, prompt_embeds, batch):
        embeds = prompt_embeds["prompt_embeds"].to(self.device)
        batch_size = embeds.shape[0]
        transformer = self.unwrapped("transformer")
        condition: dict[str, Any] = {
            "encoder_hidden_states": embeds,
            "pooled_projections": prompt_embeds["pooled_prompt_embeds"].to(self.device),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=self.device),
            "guidance": (torch.full((batch_size,), self.guidance_value, device=self.device, dtype=torch.float32)
                         if transformer.config.guidance_embeds else None),
            "control_tokens": None, "control_ids": None,
        }
        controls = batch.get("control_latents") or []
        if len(controls) > 1:
            raise ConfigError(f"flux_kontext conditions on one control image per sample, the data gives "
                              f"{len(controls)}; keep one entry in each sample's control_images "
                              f"(or use qwen_image_edit_plus for several).")
        if controls:
            control = controls[0].to(self.device)
            if control.shape[0] != batch_size:
                raise ValueError(f"control_latents has batch {control.shape[0]}, the prompts {batch_size}.")
            condition["control_tokens"] = self.pack(control)
            condition["control_ids"] = self.image_ids(control.shape[-2], control.shape[-1], self.device,
                                                      torch.float32, control=True)
        return condition

    def predict(self, noisy_latents, timesteps, condition):
        transformer = self.modules["transformer"]
        dtype = self.unwrapped("transformer").dtype
        _, _, height, width = noisy_latents.shape
        tokens = self.pack(noisy_latents.to(self.device, dtype))
        num_target = tokens.shape[1]
        ids = self.image_ids(height, width, self.device, torch.float32)
        if condition["control_tokens"] is not None:
            tokens = torch.cat([tokens, condition["control_tokens"].to(dtype)], dim=1)
            ids = torch.cat([ids, condition["control_ids"]], dim=0)
        sigmas = timesteps.to(self.device, dtype).reshape(-1).expand(noisy_latents.shape[0])
        output = transformer(
            hidden_states=tokens, timestep=sigmas, guidance=condition["guidance"],
            pooled_projections=condition["pooled_projections"].to(dtype),
            encoder_hidden_states=condition["encoder_hidden_states"].to(dtype),
            txt_ids=condition["txt_ids"], img_ids=ids, return_dict=False)[0]
        return self.unpack(output[:, :num_target], height, width)

    @torch.no_grad()
    def sample(self, prompts, *, height, width, num_inference_steps, guidance_scale, seed,
               control_images=None, prompt_embeds=None, negative_prompt_embeds=None):
        """`guidance_scale` is Kontext's distilled guidance (the guidance embedding), not CFG."""
        pipe = self.pipeline(with_text_encoders=prompt_embeds is None)
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs: dict[str, Any] = {}
        if prompt_embeds is not None:
            kwargs.update(prompt_embeds=prompt_embeds["prompt_embeds"].to(self.device),
                          pooled_prompt_embeds=prompt_embeds["pooled_prompt_embeds"].to(self.device))
        else:
            kwargs["prompt"] = list(prompts)
        if control_images:
            if len(control_images) != len(prompts):
                raise ValueError(f"sample: {len(control_images)} control images for {len(prompts)} prompts.")
            # Control images at the sampling size, as in training (the dataset resizes them too).
            kwargs["image"] = [image.convert("RGB").resize((width, height)) for image in control_images]
        return pipe(height=height, width=width, max_area=height * width, _auto_resize=False,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    max_sequence_length=self.max_sequence_length, generator=generator, **kwargs).images

    # -- saving ------------------------------------------------------------------------------------

    def save_adapter(self, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        if not self.cfg.lora.enabled:
            target = out_dir / "transformer"
            self.unwrapped("transformer").save_pretrained(target, safe_serialization=True)
            return [target]
        return save_transformer_lora(self.pipeline_class, self.unwrapped("transformer"), out_dir,
                                     self.cfg.lora.save_format, "lora_transformer", FLUX_ATTENTION_TARGETS)

    def cache_identity(self) -> str:
        # Cached T5 embeddings have max_sequence_length tokens: a different length is a different entry.
        return f"{super().cache_identity()}+t5len{self.max_sequence_length}"

    def load_adapter_weights(self, path: str) -> None:
        load_lora_into_modules({"transformer": self.unwrapped("transformer")}, path)
