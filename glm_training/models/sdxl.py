"""Stable Diffusion XL: UNet epsilon/v-prediction on VAE latents, two CLIP text encoders.

Conditioning is built exactly as `StableDiffusionXLPipeline` builds it: the pipeline's own
`encode_prompt` (penultimate hidden states of both encoders, concatenated; pooled output of the
second) plus `add_time_ids` = original size + crop top-left + target size of each image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from glm_training.algorithms.objectives import EpsilonObjective
from glm_training.config import ConfigError
from glm_training.models.base import DiffusionFamily
from glm_training.models.lora_io import save_diffusers_lora, load_lora_into_modules


class SDXLFamily(DiffusionFamily):
    name = "sdxl"
    component_choices = ("unet", "text_encoder", "text_encoder_2")
    component_groups = {"unet": ("unet",)}
    default_component = "unet"
    quantizable = ("unet", "text_encoder", "text_encoder_2")
    fsdp_blocks = {"unet": ("BasicTransformerBlock", "ResnetBlock2D")}
    default_lora_targets = {"unet": ["to_k", "to_q", "to_v", "to_out.0"]}
    default_dpo_beta = 5000.0
    text_encoder_trainable = True
    objective_kind = "epsilon"  # DDPM noise (or v) prediction

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        if cfg.model.train_text_encoder:
            if cfg.cache.enabled:
                raise ConfigError("cache.enabled cannot be combined with model.train_text_encoder: "
                                  "prompt embeddings change while the text encoders train.")
            self.trained += ["text_encoder", "text_encoder_2"]

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        unet = self.from_pretrained(UNet2DConditionModel, "unet", self.weight_dtype).to(self.device)
        vae = self.load_autoencoder(AutoencoderKL)
        self.modules = {"unet": unet, "vae": vae}
        scheduler = DDPMScheduler.from_pretrained(self.model_path, subfolder="scheduler",
                                                  revision=self.cfg.model.revision)
        prediction_type = self.cfg.model.prediction_type or scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"model.prediction_type: SDXL supports epsilon or v_prediction, "
                              f"the scheduler says {prediction_type!r}.")
        config = scheduler.config
        self.objective = EpsilonObjective(scheduler.alphas_cumprod, prediction_type,
                                          snr_gamma=self.cfg.training.snr_gamma,
                                          timestep_spacing=config.get("timestep_spacing", "leading"),
                                          steps_offset=config.get("steps_offset", 0),
                                          set_alpha_to_one=config.get("set_alpha_to_one", False))
        self.pipeline_class = StableDiffusionXLPipeline
        # The sampling scheduler's config as the checkpoint wrote it, read once (pipeline() runs per encode).
        self.scheduler_config = DDPMScheduler.load_config(self.model_path, subfolder="scheduler",
                                                          revision=self.cfg.model.revision)
        if self.cfg.model.train_text_encoder:
            self._load_text_encoders()

    def _load_text_encoders(self) -> None:
        """Loaded on first use, so runs from a filled cache never instantiate them."""
        if "text_encoder" in self.modules:
            return
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            self.modules[name] = self.place_frozen(name, self.from_pretrained(cls, name, self.weight_dtype)).eval()
            self.modules[name].requires_grad_(False)
        self.tokenizers = [CLIPTokenizer.from_pretrained(self.model_path, subfolder=sub,
                                                         revision=self.cfg.model.revision)
                           for sub in ("tokenizer", "tokenizer_2")]

    def pipeline(self, with_text_encoders: bool = False) -> Any:
        """The real diffusers pipeline around the current (unwrapped) weights."""
        from diffusers import EulerDiscreteScheduler

        if with_text_encoders:
            self._load_text_encoders()
        has_text = "text_encoder" in self.modules
        scheduler = EulerDiscreteScheduler.from_config(self.scheduler_config)
        return self.pipeline_class(
            vae=self.modules["vae"], unet=self.unwrapped("unet"), scheduler=scheduler,
            text_encoder=self.unwrapped("text_encoder") if has_text else None,
            text_encoder_2=self.unwrapped("text_encoder_2") if has_text else None,
            tokenizer=self.tokenizers[0] if has_text else None,
            tokenizer_2=self.tokenizers[1] if has_text else None)

    # -- diffusion interface ----------------------------------------------------------------------

    def encode_prompt(self, prompts, control_images=None):
        self._load_text_encoders()
        pipe = self.pipeline()
        with torch.set_grad_enabled(self.cfg.model.train_text_encoder and torch.is_grad_enabled()):
            embeds, _, pooled, _ = pipe.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def encode_images(self, pixel_values):
        vae = self.modules["vae"]
        # The mode, not a sample: deterministic, so cached and uncached runs train the same.
        latents = vae.encode(pixel_values.to(self.device, vae.dtype)).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def decode_latents(self, latents):
        vae = self.modules["vae"]
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    def latent_shape(self, height, width):
        vae = self.modules["vae"]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return (self.unwrapped("unet").config.in_channels, height // scale, width // scale)

    def condition(self, prompt_embeds, batch):
        # add_time_ids: (original h, w) + (crop top, left) + (target h, w), per sample.
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        return {
            "encoder_hidden_states": prompt_embeds["prompt_embeds"].to(self.device),
            "added_cond_kwargs": {
                "text_embeds": prompt_embeds["pooled_prompt_embeds"].to(self.device),
                "time_ids": time_ids.to(self.device, torch.float32),
            },
        }

    def predict(self, noisy_latents, timesteps, condition):
        unet = self.modules["unet"]
        dtype = self.unwrapped("unet").dtype
        added = {k: v.to(dtype) for k, v in condition["added_cond_kwargs"].items()}
        return unet(noisy_latents.to(dtype), timesteps.to(self.device),
                    encoder_hidden_states=condition["encoder_hidden_states"].to(dtype),
                    added_cond_kwargs=added).sample

    @torch.no_grad()
    def sample(self, prompts, *, height, width, num_inference_steps, guidance_scale, seed,
               control_images=None, prompt_embeds=None, negative_prompt_embeds=None):
        pipe = self.pipeline(with_text_encoders=prompt_embeds is None)
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs: dict[str, Any] = {}
        if prompt_embeds is not None:
            kwargs.update(prompt_embeds=prompt_embeds["prompt_embeds"],
                          pooled_prompt_embeds=prompt_embeds["pooled_prompt_embeds"])
            if guidance_scale > 1:
                kwargs.update(negative_prompt_embeds=negative_prompt_embeds["prompt_embeds"],
                              negative_pooled_prompt_embeds=negative_prompt_embeds["pooled_prompt_embeds"])
        else:
            kwargs["prompt"] = list(prompts)
        return pipe(height=height, width=width, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=generator, **kwargs).images

    # -- saving ------------------------------------------------------------------------------------

    def save_adapter(self, out_dir: Path) -> list[Path]:
        if not self.cfg.lora.enabled:
            return self.save_full_components(out_dir)
        modules = {name: self.unwrapped(name) for name in self.trained}
        return save_diffusers_lora(self.pipeline_class, modules, Path(out_dir), self.cfg.lora.save_format)

    def save_full_components(self, out_dir: Path) -> list[Path]:
        written = []
        for name in self.trained:
            target = Path(out_dir) / name
            self.unwrapped(name).save_pretrained(target, safe_serialization=True)
            written.append(target)
        return written

    def load_adapter_weights(self, path: str) -> None:
        load_lora_into_modules({name: self.unwrapped(name) for name in self.trained}, path)
