"""GLM-Image: the DiT decoder (flow matching) and the autoregressive generator, one family.

Modules: "ar" (`GlmImageForConditionalGeneration`: the AR generator with its vision tower and VQ
image tokenizer), "dit" (`GlmImageTransformer2DModel`), "vae", and the ByT5 glyph encoder
("text_encoder", loaded on first use). `model.component` picks what trains: dit (default), ar or both;
`optimizer.component_lr: {ar: ..., dit: ...}` gives each its learning rate.

DiT conditioning is built as `GlmImagePipeline.__call__` builds it:
- prior tokens: the AR-side VQ tokens of the *target* image (the pipeline's AR output stands in for
  them at inference), upsampled 2x to the DiT patch grid (`upsample_image_tokens`);
- glyph embeddings of the quoted text in the prompt (`GlmImagePipeline._get_glyph_embeds`);
- `target_size` (H, W) and `crop_coords` (the dataset's crop, SDXL-style; the pipeline passes (0, 0));
- image-to-image: each source image's normalised VAE latents and upsampled VQ tokens run through the
  DiT at timestep 0 with no text, writing its keys/values into a `GlmImageKVCache` that the target
  pass reads (the pipeline's step 6).
The flow schedule is the pipeline's: sigma shifted linearly with mu = sqrt(seq_len / base) *
max_shift + base_shift, and the DiT's timestep input is the *unshifted* time * 1000 - 1 (the
pipeline hands the scheduler unshifted timesteps and shifted sigmas, and the transformer `t - 1`).

The AR side (`glm_training.models.glm_image_ar`) trains with next-token cross-entropy on the target
image's tokens (preview grid + full grid for text-to-image, full grid for image-to-image).

Saved adapters (`final/`): the DiT LoRA as `pytorch_lora_weights.safetensors` with `transformer.`
keys (GlmImagePipeline has no LoRA loader mixin; `load_glm_image_lora(pipeline, dir)` or
`pipeline.transformer.load_lora_adapter(dir, prefix="transformer")` loads it) and the AR adapter in
peft layout under `ar_adapter/` (`PeftModel.from_pretrained(ar_model, dir)` or
`ar_model.load_adapter(dir)`). Full fine-tuning writes `transformer/` and `vision_language_encoder/`
folders that replace the pipeline's subfolders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm_training.algorithms.objectives import FlowMatchingObjective, FlowShift
from glm_training.config import ConfigError
from glm_training.data.datasets import sample_generator
from glm_training.models import glm_image_ar as ar_lib
from glm_training.models.base import DiffusionFamily, Generation
from glm_training.parts import Denoiser, TokenPolicy
from glm_training.parts.common import SALT_DECODE, SALT_ROLLOUT, member_generators, seeded_int
from glm_training.models.glm_image_support import (FixedGlmImagePipeline, image_tokens_per_image,
                                                   upsample_image_tokens)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
AR_ADAPTER_DIR = "ar_adapter"
#: Pipeline subfolder of each module (full fine-tuning saves under these names).
SUBFOLDERS = {"ar": "vision_language_encoder", "dit": "transformer"}


@dataclass
class GlmImageFlowShift(FlowShift):
    """The GLM-Image / CogView4 schedule: `mu = sqrt(seq_len / base_seq_len) * max_shift + base_shift`
    (the pipeline's `calculate_shift`) and the scheduler's time shift, linear (`mu / (mu + 1/t - 1)`)
    or exponential (`e^mu / (e^mu + 1/t - 1)`)."""

    linear: bool = True

    def _m(self, image_seq_len: int) -> float:
        mu = math.sqrt(image_seq_len / self.base_image_seq_len) * self.max_shift + self.base_shift
        return mu if self.linear else math.exp(mu)

    def __call__(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        if not self.dynamic:
            return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        m = self._m(image_seq_len)
        return m / (m + (1 / sigmas - 1))

    def unshift(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """Inverse of `__call__`: the unshifted time the pipeline feeds the transformer."""
        sigmas = sigmas.double()
        if not self.dynamic:
            return (sigmas / (self.shift - (self.shift - 1) * sigmas)).float()
        return (1 / (1 + self._m(image_seq_len) * (1 / sigmas - 1))).float()


def _is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


class GlmImageFamily(DiffusionFamily):
    name = "glm_image"
    component_choices = ("ar", "dit")
    component_groups = {"dit": ("dit",), "ar": ("ar",), "both": ("ar", "dit")}
    default_component = "dit"
    quantizable = ("transformer", "vision_language_encoder", "text_encoder")
    quantize_aliases = {"dit": "transformer", "ar": "vision_language_encoder"}
    fsdp_blocks = {"dit": ("GlmImageTransformerBlock",), "ar": ("GlmImageTextDecoderLayer",)}
    # Image tokens come from `get_image_features` / `vqmodel.encode`, outside the AR's forward.
    fsdp_unsharded = {"ar": r"(.*\.)?model\.(visual|vqmodel)"}
    default_lora_targets = {
        "dit": ["to_q", "to_k", "to_v", "to_out.0"],
        # Language-model attention only: the vision tower and VQ tokenizer make the targets.
        "ar": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    resolution_multiple = 32
    modes = ("t2i", "i2i")
    max_control_images = None  # one or more source images per sample
    #: Glyph-encoder token limit, the pipeline's default.
    max_sequence_length = 2048

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        self.target_tokens = ar_lib.TargetTokenCache()

    # -- loading --------------------------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        return {"revision": self.cfg.model.revision}

    def load(self) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
        from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

        path = self.model_path
        # Through ModelFamily.from_pretrained: clear errors, model.variant and model.quantize per folder.
        dit = self.from_pretrained(GlmImageTransformer2DModel, "transformer", self.weight_dtype)
        vae = self.from_pretrained(AutoencoderKL, "vae", torch.float32)
        ar = self.from_pretrained(GlmImageForConditionalGeneration, "vision_language_encoder", self.weight_dtype)
        self.processor = GlmImageProcessor.from_pretrained(path, subfolder="processor", **self._kwargs())
        self.modules = {"dit": dit.to(self.device), "vae": self.place_frozen("vae", vae).eval(),
                        "ar": ar.to(self.device).eval()}
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler",
                                                                            **self._kwargs())
        sched = self.scheduler_config
        shift = GlmImageFlowShift(
            shift=sched.get("shift", 1.0), dynamic=sched.get("use_dynamic_shifting", False),
            base_shift=sched.get("base_shift", 0.25), max_shift=sched.get("max_shift", 0.75),
            base_image_seq_len=sched.get("base_image_seq_len", 256),
            max_image_seq_len=sched.get("max_image_seq_len", 4096),
            linear=sched.get("time_shift_type", "exponential") == "linear")
        self.num_train_timesteps = sched.get("num_train_timesteps", 1000)
        t = self.cfg.training
        self.objective = FlowMatchingObjective(shift, t.weighting_scheme, t.logit_mean, t.logit_std,
                                               t.mode_scale, patch_size=dit.config.patch_size)
        vae_cfg = vae.config
        channels = vae_cfg.latent_channels
        if vae_cfg.get("latents_mean") is None or vae_cfg.get("latents_std") is None:
            raise ConfigError(f"{path}/vae/config.json lacks latents_mean/latents_std, which "
                              "GlmImagePipeline normalises latents with.")
        self.latents_mean = torch.tensor(vae_cfg.latents_mean).view(1, channels, 1, 1)
        self.latents_std = torch.tensor(vae_cfg.latents_std).view(1, channels, 1, 1)
        # Frozen components with weights from an earlier run (e.g. the AR-trained adapter for a DiT run).
        for name in self.component_choices:
            override = self.cfg.lora.components.get(name)
            if name not in self.trained and override is not None and override.pretrained_weight:
                self._load_frozen_weights(name, override.pretrained_weight)

    def _load_text_encoder(self) -> None:
        """The ByT5 glyph encoder, loaded on first use (a run from a filled cache never needs it)."""
        if "text_encoder" in self.modules:
            return
        from transformers import ByT5Tokenizer, T5EncoderModel

        encoder = self.from_pretrained(T5EncoderModel, "text_encoder", self.weight_dtype)
        self.modules["text_encoder"] = self.place_frozen("text_encoder", encoder).eval().requires_grad_(False)
        self.tokenizer = ByT5Tokenizer.from_pretrained(self.model_path, subfolder="tokenizer", **self._kwargs())

    def setup_training(self) -> None:
        super().setup_training()
        if "ar" in self.trained and not self.cfg.lora.enabled:
            # Full fine-tuning of the AR keeps its image tokenizer fixed: it makes the targets.
            ar = self.unwrapped("ar")
            for part in (ar.model.visual, ar.model.vqmodel):
                part.requires_grad_(False).eval()
        if self.cfg.lora.enabled:
            for name in self.trained:
                override = self.cfg.lora.components.get(name)
                if override is not None and override.pretrained_weight:
                    self._load_trained_adapter(name, Path(override.pretrained_weight))

    def pipeline(self) -> FixedGlmImagePipeline:
        """The diffusers pipeline around the current (unwrapped) weights; image-to-image works."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        self._load_text_encoder()
        pipe = FixedGlmImagePipeline(
            tokenizer=self.tokenizer, processor=self.processor, text_encoder=self.modules["text_encoder"],
            vision_language_encoder=self.unwrapped("ar"), vae=self.modules["vae"],
            transformer=self.unwrapped("dit"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- parts: [token policy "ar", denoiser "dit"]; the AR's tokens condition the DiT -----------

    def make_parts(self) -> list[Any]:
        self.ar_part, self.dit_part = GlmImageAr(self, "ar"), GlmImageDit(self, "dit")
        return [part for part in (self.ar_part, self.dit_part) if part.name in self.trained]

    def prepare(self, records: list, caption_dropout: float | None = None, use_cache: bool = True) -> None:
        self.parts()
        for part in (self.ar_part, self.dit_part):  # the untrained one still samples (GRPO)
            part.prepare(records, caption_dropout, use_cache)

    def setup_rollouts(self, steps: int, guidance_scale: float, noise_level: float,
                       sde_window: list[int] | None = None) -> None:
        if guidance_scale != 1.0:
            raise ConfigError("grpo.guidance_scale: GLM-Image decodes the AR's tokens without classifier-free "
                              "guidance; set grpo.guidance_scale: 1.0.")
        self.dit_part.setup_rollouts(steps, 1.0, noise_level, sde_window)

    def sample_decoded(self, batch: dict[str, Any], group: int, token_seed: int, seed: int, step: int,
                       steps: int, records: list | None = None, rollout: bool = True) -> Generation:
        """AR tokens (`token_seed`), decoded by the DiT: in a rollout of a trained DiT with the SDE
        and a record (own noise per member), else with the ODE (noise shared within a group, so
        rewards differ by the tokens only)."""
        tokens = self.ar_part.rollout(batch, group, token_seed)
        inputs = {"prior_token_ids": tokens.outputs["prior_token_ids"]}
        metadata = [{"image_tokens": row.tolist()} for row in tokens.tokens.cpu()]
        records_out: dict[str, Any] = {"ar": tokens} if "ar" in self.trained else {}
        if "dit" in self.trained and rollout:
            generators = member_generators(seed, step, batch["index"], group, SALT_DECODE)
            records_out["dit"], images = self.dit_part.rollout(batch, group, generators, inputs=inputs)
        else:
            size = self.cfg.data.resolution
            shape = self.latent_shape(size, size)
            noise = torch.stack([torch.randn(shape, generator=sample_generator(seed, token_seed, int(index), SALT_DECODE))
                                 for index in batch["index"]]).repeat_interleave(group, dim=0)
            images = self.dit_part.decode(batch, group, noise, steps, 1.0, records, inputs)
        return Generation(images, records_out, metadata)

    def rollout(self, batch: dict[str, Any], group: int, seed: int, step: int) -> Generation:
        token_seed = seeded_int(seed, step, int(batch["index"][0]), SALT_ROLLOUT)
        return self.sample_decoded(batch, group, token_seed, seed, step, self.cfg.grpo.sample_steps)

    def eval_images(self, batch: dict[str, Any], records: list, seed: int, steps: int,
                    guidance_scale: float) -> Generation:
        """Tokens sampled at `seed`, decoded with the ODE in `steps` steps (no CFG)."""
        generation = self.sample_decoded(batch, 1, seed, self.cfg.training.seed, 0, steps, records, rollout=False)
        return Generation(generation.images, {}, generation.metadata)

    # -- diffusion interface ----------------------------------------------------------------------

    def encode_prompt(self, prompts, control_images=None):
        """Glyph embeddings of each prompt's quoted text, as the pipeline computes them, left-padded
        with zeros to the longest (the pipeline's batch layout); lengths kept for re-collation."""
        pipe = self.pipeline()
        dtype = self.unwrapped("dit").dtype
        with torch.no_grad():
            embeds = [pipe._get_glyph_embeds([p], self.max_sequence_length, self.device, dtype) for p in prompts]
        lengths = torch.tensor([e.shape[1] for e in embeds])
        return {"prompt_embeds": self._left_pad([e[0] for e in embeds]), "prompt_embeds_length": lengths}

    @staticmethod
    def _left_pad(rows: list[torch.Tensor]) -> torch.Tensor:
        longest = max(r.shape[0] for r in rows)
        return torch.stack([torch.cat([r.new_zeros(longest - r.shape[0], r.shape[1]), r]) for r in rows])

    def collate_prompt_embeds(self, items):
        rows = [item["prompt_embeds"][0, item["prompt_embeds"].shape[1] - int(item["prompt_embeds_length"][0]):]
                for item in items]
        return {"prompt_embeds": self._left_pad(rows),
                "prompt_embeds_length": torch.cat([item["prompt_embeds_length"] for item in items])}

    def encode_images(self, pixel_values):
        vae = self.modules["vae"]
        # The mode (the pipeline's sample_mode="argmax"), normalised with latents_mean / latents_std.
        latents = vae.encode(pixel_values.to(self.device, vae.dtype)).latent_dist.mode()
        return (latents - self.latents_mean.to(latents)) / self.latents_std.to(latents)

    def decode_latents(self, latents):
        vae = self.modules["vae"]
        latents = latents.to(vae.dtype) * self.latents_std.to(self.device, vae.dtype) + \
            self.latents_mean.to(self.device, vae.dtype)
        return vae.decode(latents).sample

    def latent_shape(self, height, width):
        scale = 2 ** (len(self.modules["vae"].config.block_out_channels) - 1)
        return (self.unwrapped("dit").config.in_channels, height // scale, width // scale)

    def prior_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, (H/16)*(W/16)): each image's AR-grid VQ tokens upsampled 2x for the DiT (cached)."""
        _, _, height, width = pixel_values.shape
        self._check_size(height, width)
        grid = (height // ar_lib.AR_PIXELS_PER_TOKEN, width // ar_lib.AR_PIXELS_PER_TOKEN)
        ar = self.unwrapped("ar")
        rows = [upsample_image_tokens(self.target_tokens.tokens(ar, self.processor, pixels, grid), *grid)
                for pixels in pixel_values]
        return torch.stack(rows).to(self.device)

    def _check_size(self, height: int, width: int) -> None:
        if height % self.resolution_multiple or width % self.resolution_multiple:
            raise ConfigError(f"data.resolution: GLM-Image needs image sides divisible by "
                              f"{self.resolution_multiple}, got {height}x{width}.")

    def condition(self, prompt_embeds, batch):
        pixels = batch["pixel_values"]
        batch_size, _, height, width = pixels.shape
        embeds = prompt_embeds["prompt_embeds"].to(self.device)
        crop = batch.get("crop_top_left")
        crop = torch.zeros(batch_size, 2) if crop is None else torch.as_tensor(crop)
        condition: dict[str, Any] = {
            "encoder_hidden_states": embeds,
            "prior_token_id": self.prior_tokens(pixels),
            "target_size": torch.tensor([[height, width]] * batch_size, dtype=torch.float32, device=self.device),
            "crop_coords": crop.to(self.device, torch.float32),
        }
        controls = batch.get("control_pixel_values")
        if controls is not None:
            latents = batch.get("control_latents")
            if latents is None:
                with torch.no_grad():
                    latents = [self.encode_images(group) for group in controls]
            condition["controls"] = [
                {"latents": lat.to(self.device), "prior_token_id": self.prior_tokens(group),
                 "size": tuple(group.shape[-2:])}
                for lat, group in zip(latents, controls)]
        return condition

    def dit_timestep(self, sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input for noise level `sigmas` (see the module docstring)."""
        unshifted = self.objective.shift.unshift(sigmas.float().cpu(), self.objective.image_seq_len(latents))
        return (unshifted * self.num_train_timesteps - 1).to(self.device)

    def predict(self, noisy_latents, timesteps, condition):
        from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

        dit, plain = self.modules["dit"], self.unwrapped("dit")
        dtype = plain.dtype
        embeds = condition["encoder_hidden_states"].to(dtype)
        batch_size = noisy_latents.shape[0]
        kv_caches = None
        if condition.get("controls"):
            # Source images write their keys/values (timestep 0, no text), one cache slot per sample.
            kv_caches = GlmImageKVCache(num_layers=plain.config.num_layers)
            kv_caches.set_mode("write")
            for sample in range(batch_size):
                for control in condition["controls"]:
                    tokens = control["prior_token_id"][sample]
                    plain(hidden_states=control["latents"][sample:sample + 1].to(dtype),
                          encoder_hidden_states=embeds[:1, :0], prior_token_id=tokens,
                          prior_token_drop=torch.zeros_like(tokens, dtype=torch.bool),
                          timestep=torch.zeros((1,), device=self.device),
                          target_size=torch.tensor([control["size"]], device=self.device),
                          crop_coords=torch.zeros((1, 2), device=self.device), kv_caches=kv_caches)
                kv_caches.next_sample()
            kv_caches.set_mode("read")
        prior = condition["prior_token_id"]
        return dit(hidden_states=noisy_latents.to(dtype), encoder_hidden_states=embeds, prior_token_id=prior,
                   prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
                   timestep=self.dit_timestep(timesteps, noisy_latents),
                   target_size=condition["target_size"].to(dtype), crop_coords=condition["crop_coords"].to(dtype),
                   kv_caches=kv_caches, return_dict=False)[0]

    @torch.no_grad()
    def sample(self, prompts, *, height, width, num_inference_steps, guidance_scale, seed,
               control_images=None, prompt_embeds=None, negative_prompt_embeds=None):
        """AR prior tokens then DiT decoding with the current weights (FixedGlmImagePipeline). The AR
        needs the prompt text, so cached embeddings are not used here."""
        self._check_size(height, width)
        pipe = self.pipeline()
        kwargs: dict[str, Any] = {}
        if control_images:
            groups = [list(c) if isinstance(c, (list, tuple)) else [c] for c in control_images]
            kwargs["image"] = groups if len(prompts) > 1 else groups[0]
        training = {name: self.unwrapped(name).training for name in self.trained}
        for name in self.trained:
            self.unwrapped(name).eval()
        try:
            return pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                        max_sequence_length=self.max_sequence_length, **kwargs).images
        finally:
            for name, was_training in training.items():
                self.unwrapped(name).train(was_training)

    # -- AR (token) interface ---------------------------------------------------------------------

    def ar_prompt(self, prompts: list[str], height: int, width: int,
                  control_pixels: list[torch.Tensor] | None = None) -> ar_lib.ArPrompt:
        """The AR prompt of a batch; `control_pixels` is a list over control images of (B, 3, h, w)."""
        self._check_size(height, width)
        controls = None
        if control_pixels:
            controls = [[ar_lib.pixels_to_pil(group[i]) for group in control_pixels] for i in range(len(prompts))]
        return ar_lib.build_ar_prompt(self.unwrapped("ar"), self.processor, list(prompts), height, width,
                                      controls, self.device)

    def _batch_tokens(self, batch: dict[str, Any]) -> tuple[ar_lib.ArPrompt, torch.Tensor]:
        pixels = batch["pixel_values"]
        prompt = self.ar_prompt(batch["prompt"], pixels.shape[-2], pixels.shape[-1], batch.get("control_pixel_values"))
        tokens = batch.get("image_tokens")
        if tokens is None:  # the target image's own tokens (preview + full grid)
            tokens = ar_lib.target_image_tokens(self.unwrapped("ar"), self.processor, pixels, prompt,
                                                self.target_tokens)
        return prompt, tokens.to(self.device)

    def image_token_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        prompt, tokens = self._batch_tokens(batch)
        return ar_lib.image_token_logits(self.modules["ar"], self.unwrapped("ar"), prompt, tokens)

    def token_sft_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) mean next-token CE on the image tokens (target image's tokens unless
        `batch["image_tokens"]` gives them), prompt tokens masked."""
        return ar_lib.masked_next_token_ce(*self.image_token_logits(batch))

    def image_token_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B,) summed log-probs of the image tokens (for token DPO / GRPO). `batch`: prompt,
        pixel_values (sets the size; the targets unless image_tokens), control_pixel_values?, image_tokens?"""
        logprobs, _ = ar_lib.next_token_logprobs(*self.image_token_logits(batch))
        return logprobs.sum(dim=1)

    def generate_image_tokens(self, prompts: list[str], *, height: int, width: int, seed: int,
                              control_pixels: list[torch.Tensor] | None = None,
                              temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Sample image tokens with per-token log-probs (fixed seed); also `prior_token_ids`, the
        upsampled full grid the DiT takes."""
        prompt = self.ar_prompt(prompts, height, width, control_pixels)
        ar = self.unwrapped("ar")
        was_training = ar.training
        ar.eval()
        try:
            out = ar_lib.generate_image_tokens(ar, prompt, seed, temperature)
        finally:
            ar.train(was_training)
        out["prior_token_ids"] = ar_lib.upsampled_full_grid_tokens(out["tokens"], prompt)
        return out

    # -- token preference / policy training (DPO, GRPO on the AR) ---------------------------------

    def image_token_logprobs_per_token(self, batch: dict[str, Any], temperature: float = 1.0) -> torch.Tensor:
        """(B, N) float32 log-prob of each image token (generation order) under the model's
        distribution at `temperature` (the one `generate_image_tokens` samples from), with gradients.
        `batch` as for `image_token_logprobs`; with `image_tokens` given, `pixel_values` only sets the size."""
        logits, labels = self.image_token_logits(batch)
        if temperature != 1.0:
            logits = logits.float() / temperature
        logprobs, _ = ar_lib.next_token_logprobs(logits, labels)
        count = int((labels[0] != ar_lib.IGNORE_INDEX).sum())  # image tokens come last, after the prompt
        return logprobs[:, -count:]

    def condition_from_prior_tokens(self, prompt_embeds: dict[str, torch.Tensor], prior_token_ids: torch.Tensor,
                                    height: int, width: int,
                                    control_pixels: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """The DiT condition for decoding AR-generated tokens (`generate_image_tokens(...)["prior_token_ids"]`)
        instead of a target image's own tokens: what `condition` builds, as the pipeline does at inference."""
        self._check_size(height, width)
        count = prior_token_ids.shape[0]
        condition: dict[str, Any] = {
            "encoder_hidden_states": prompt_embeds["prompt_embeds"].to(self.device),
            "prior_token_id": prior_token_ids.to(self.device),
            "target_size": torch.tensor([[height, width]] * count, dtype=torch.float32, device=self.device),
            "crop_coords": torch.zeros(count, 2, dtype=torch.float32, device=self.device),
        }
        if control_pixels:
            with torch.no_grad():
                condition["controls"] = [
                    {"latents": self.encode_images(group).to(self.device), "prior_token_id": self.prior_tokens(group),
                     "size": tuple(group.shape[-2:])}
                    for group in control_pixels]
        return condition

    # -- saving and loading adapters --------------------------------------------------------------

    def save_adapter(self, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        if not self.cfg.lora.enabled:
            for name in self.trained:
                target = out_dir / SUBFOLDERS[name]
                self.unwrapped(name).save_pretrained(target, safe_serialization=True)
                written.append(target)
            return written
        if self.cfg.lora.save_format != "diffusers":
            raise ConfigError("lora.save_format: GLM-Image LoRA is saved in the diffusers/peft layout only; "
                              "set lora.save_format: diffusers.")
        if "dit" in self.trained:
            written.append(save_dit_lora(self.unwrapped("dit"), out_dir))
        if "ar" in self.trained:
            target = out_dir / AR_ADAPTER_DIR
            self.unwrapped("ar").save_pretrained(target, safe_serialization=True)  # peft adapter only
            written.append(target)
        return written

    def load_adapter_weights(self, path: str) -> None:
        """`lora.pretrained_weight`: a `final/` folder of an earlier run (or its files)."""
        for name in self.trained:
            self._load_trained_adapter(name, Path(path))

    def _load_trained_adapter(self, name: str, path: Path) -> None:
        from glm_training.models.lora_io import load_lora_into_modules

        if name == "dit":
            file = path / LORA_WEIGHT_NAME if path.is_dir() else path
            load_lora_into_modules({"transformer": self.unwrapped("dit")}, file)
        else:
            folder = path / AR_ADAPTER_DIR if (path / AR_ADAPTER_DIR).is_dir() else path
            load_peft_adapter_weights(self.unwrapped("ar"), folder)

    def _load_frozen_weights(self, name: str, weight: str) -> None:
        """Weights for a component this run does not train: a LoRA (applied, frozen) or a full folder."""
        path = Path(weight)
        key = f"lora.components.{name}.pretrained_weight"
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist.")
        module = self.modules[name]
        if name == "ar":
            folder = path / AR_ADAPTER_DIR if (path / AR_ADAPTER_DIR).is_dir() else path
            if _is_peft_dir(folder):
                module.load_adapter(str(folder))
            elif (folder / "config.json").is_file():
                self.modules["ar"] = type(module).from_pretrained(folder, dtype=self.weight_dtype).to(self.device)
            else:
                raise ConfigError(f"{key}: {folder} holds neither a peft adapter (adapter_config.json) "
                                  "nor a full model (config.json).")
        else:
            if (path / "config.json").is_file():
                self.modules["dit"] = type(module).from_pretrained(path, torch_dtype=self.weight_dtype).to(self.device)
            else:
                from glm_training.models.lora_io import load_lora_adapter_file

                # Through the file's metadata: its lora_alpha, not the rank (see load_lora_adapter_file).
                load_lora_adapter_file(module, path / LORA_WEIGHT_NAME if path.is_dir() else path, "transformer")
        self.modules[name].eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Adapter files


def save_dit_lora(transformer: torch.nn.Module, out_dir: Path) -> Path:
    """The DiT LoRA with `transformer.`-prefixed peft keys and the adapter config in the safetensors
    metadata (the layout diffusers' `load_lora_adapter(dir, weight_name=LORA_WEIGHT_NAME, prefix="transformer")`
    reads; without `weight_name` / `use_safetensors=True` diffusers ignores the metadata and the alpha)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    from glm_training.models.lora_io import peft_state_dict

    state = {f"transformer.{k}": v.float().cpu() for k, v in peft_state_dict(transformer).items()}
    config = transformer.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    metadata = {"format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                      indent=2, sort_keys=True, default=str)}
    path = Path(out_dir) / LORA_WEIGHT_NAME
    save_file(state, str(path), metadata=metadata)
    return path


def load_peft_adapter_weights(model: torch.nn.Module, folder: Path) -> None:
    """Copy a peft adapter folder's weights into `model`'s existing adapter (shapes must match)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"lora.pretrained_weight: {file} does not exist (expected a peft adapter folder).")
    from glm_training.models.lora_io import check_pretrained_alpha

    config_file = Path(folder) / "adapter_config.json"
    if config_file.is_file():
        check_pretrained_alpha(model, json.loads(config_file.read_text()).get("lora_alpha"), file, "ar")
    prefix = "base_model.model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in load_file(str(file)).items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"lora.pretrained_weight: {file} does not match the AR LoRA (unexpected e.g. "
                         f"{unexpected[:3]}); check lora.components.ar rank and target_modules.")


def load_glm_image_lora(pipeline: Any, path: str | Path, adapter_name: str = "default") -> list[str]:
    """Apply what a GLM-Image run saved in `path` (its `final/` folder) to a `GlmImagePipeline`:
    the DiT LoRA (`pytorch_lora_weights.safetensors`) into `pipeline.transformer` and the AR
    adapter (`ar_adapter/`, peft layout) into `pipeline.vision_language_encoder`. Returns the
    components loaded; raises if there is nothing to load."""
    path = Path(path)
    loaded = []
    dit_file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if dit_file.is_file():
        from glm_training.models.lora_io import load_lora_adapter_file

        load_lora_adapter_file(pipeline.transformer, dit_file, "transformer", adapter_name)
        loaded.append("dit")
    ar_dir = path / AR_ADAPTER_DIR
    if ar_dir.is_dir():
        pipeline.vision_language_encoder.load_adapter(str(ar_dir), adapter_name=adapter_name)
        loaded.append("ar")
    if not loaded:
        raise FileNotFoundError(f"{path}: no GLM-Image adapter found (expected {LORA_WEIGHT_NAME} "
                                f"and/or {AR_ADAPTER_DIR}/).")
    return loaded


__all__ = ["GlmImageFamily", "GlmImageFlowShift", "load_glm_image_lora", "save_dit_lora",
           "image_tokens_per_image"]


class GlmImageAr(TokenPolicy):
    """The AR generator as a token policy: image tokens (preview + full grid) after the prompt."""

    def token_logprobs(self, prompts, *, tokens=None, target_pixels=None, controls=None, temperature=1.0):
        return self.family.image_token_logprobs_per_token(self._batch(prompts, tokens, target_pixels, controls),
                                                          temperature=temperature)

    def token_ce(self, prompts, target_pixels, controls=None):
        return self.family.token_sft_loss(self._batch(prompts, None, target_pixels, controls))

    def sample_tokens(self, prompts, *, seed, temperature=1.0, controls=None):
        size = self.cfg.data.resolution
        out = self.family.generate_image_tokens(prompts, height=size, width=size, seed=seed,
                                                control_pixels=controls, temperature=temperature)
        return {"tokens": out["tokens"], "logprobs": out["logprobs"], "prior_token_ids": out["prior_token_ids"]}

    def _batch(self, prompts, tokens, target_pixels, controls) -> dict[str, Any]:
        """The family's AR batch: with `tokens` given, the pixels only set the size."""
        if target_pixels is None:
            size = self.cfg.data.resolution
            target_pixels = torch.zeros(len(prompts), 3, size, size)
        batch: dict[str, Any] = {"prompt": list(prompts), "pixel_values": target_pixels}
        if tokens is not None:
            batch["image_tokens"] = tokens
        if controls is not None:
            batch["control_pixel_values"] = controls
        return batch


class GlmImageDit(Denoiser):
    """The DiT decoder: its condition carries prior tokens, the target image's own (SFT, DPO) or
    the AR's samples (`inputs["prior_token_ids"]`, GRPO)."""

    def generation_conditions(self, batch, repeats, guidance_scale, records=None, inputs=None):
        if not inputs or "prior_token_ids" not in inputs:
            raise ConfigError("GLM-Image's DiT samples from prior tokens: decode the AR's tokens "
                              "(GlmImageFamily.sample_decoded).")
        size = self.cfg.data.resolution
        records = self.records if records is None else records
        prompts = [p for p in batch["prompt"] for _ in range(repeats)]
        controls = batch.get("control_pixel_values")
        if controls is not None:
            controls = [g.repeat_interleave(repeats, dim=0).to(self.device) for g in controls]
        control_paths = [records[i].controls for i in batch["index"] for _ in range(repeats)]
        embeds = self.encoder.encode_prompts(prompts, control_paths, controls)
        return self.family.condition_from_prior_tokens(embeds, inputs["prior_token_ids"], size, size, controls), None
