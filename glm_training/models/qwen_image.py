"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509): a flow-matching MMDiT on 2x2-packed
latents of a video-style VAE, conditioned on the last hidden states of Qwen2.5-VL.

Everything the transformer sees is built as the diffusers pipelines build it, with their own helpers:
- text: the pipeline's `encode_prompt` (its prompt template; the first 34 (t2i) or 64 (edit) template
  tokens dropped; variable length per prompt, so a mask comes with the embeddings).
- edit: the control image also goes through the VL encoder (Edit: the image in the template's
  vision slot; Edit-Plus: "Picture N:" slots, each image first resized to 384x384 area), and its VAE
  latents are packed and appended to the target tokens; `img_shapes` lists target + controls.
- latents: `AutoencoderKLQwenImage` with one frame, normalised with `latents_mean` / `latents_std`.
- timestep: the sigma in [0, 1] (the pipeline passes `t / 1000` with `t = 1000 sigma`); the
  scheduler's resolution-dependent shift (`mu` from the packed image token count) for training.

Control images are used at the size the data gives them. The edit pipelines rescale every control
image to about 1 Mpx (hard-coded in diffusers 0.42); `sample()` keeps it at the sampling size
instead, so sampling conditions the way training did (identical at 1024 px, the real models' size).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch

from glm_training.config import ConfigError
from glm_training.models.base import DiffusionFamily
from glm_training.models.lora_io import load_lora_into_modules, save_transformer_lora

# Attention projections of the image stream and of the text stream (add_*_proj / to_add_out), as
# diffusers' Qwen-Image LoRA script and musubi-tuner's attention-only recipes adapt them.
QWEN_ATTENTION_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

#: The area (pixels) the edit pipelines rescale control images to before the VAE (and, for Edit,
#: the VL encoder); `sample()` replaces it with the sampling size.
PIPELINE_CONTROL_AREA = 1024 * 1024


def pixels_to_pil(pixels: torch.Tensor):
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> PIL RGB (exact for images read from 8-bit files)."""
    from PIL import Image

    if pixels.ndim == 4:
        if pixels.shape[0] != 1:
            raise ValueError(f"expected one control image, got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
    array = ((pixels.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


class QwenImageFamily(DiffusionFamily):
    name = "qwen_image"
    component_choices = ("transformer",)
    component_groups = {"transformer": ("transformer",)}
    default_component = "transformer"
    quantizable = ("transformer", "text_encoder")
    gguf_component = "transformer"
    fsdp_blocks = {"transformer": ("QwenImageTransformerBlock",)}
    default_lora_targets = {"transformer": QWEN_ATTENTION_TARGETS}
    default_dpo_beta = 1000.0  # flow-matching DPO (ALGORITHMS.md: ~100-2000)
    resolution_multiple = 16  # VAE 8x, then 2x2 packing
    pipeline_class_name: ClassVar[str] = "QwenImagePipeline"
    #: Text tokens kept per prompt (after the template drop): QwenImagePipeline.__call__'s default.
    max_sequence_length: ClassVar[int] = 512
    #: Control images a sample may have (None = no limit).
    max_controls: ClassVar[int | None] = 0
    max_control_images = 0

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        if self.max_controls == 1 and cfg.data.control_dropout > 0:
            raise ConfigError(f"data.control_dropout: {self.name}'s prompt template needs its control image, so "
                              "it cannot train without one; set it to 0 or use qwen_image_edit_plus.")

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> None:
        import diffusers
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

        transformer = self.from_pretrained(QwenImageTransformer2DModel, "transformer",
                                            self.weight_dtype).to(self.device)
        # Same dtype as the text encoder: the edit pipelines feed the VAE in the prompt embeddings' dtype.
        vae = self.place_frozen("vae", self.from_pretrained(AutoencoderKLQwenImage, "vae", self.weight_dtype)).eval()
        self.modules = {"transformer": transformer, "vae": vae}
        self.pipeline_class = getattr(diffusers, self.pipeline_class_name)
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        z_dim = vae.config.z_dim
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z_dim, 1, 1)
        self.latents_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z_dim, 1, 1)
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            self.model_path, subfolder="scheduler", revision=self.cfg.model.revision)
        # shift_terminal (0.02 for Qwen-Image) only stretches the inference schedule's end; training
        # draws sigmas in (0, 1) and shifts them with the pipeline's calculate_shift mu.
        self.objective = self.flow_matching_objective(self.scheduler_config)

    def _load_text_encoder(self) -> None:
        """Loaded on first use, so runs from a filled cache never instantiate Qwen2.5-VL."""
        if "text_encoder" in self.modules:
            return
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        module = self.from_pretrained(Qwen2_5_VLForConditionalGeneration, "text_encoder", self.weight_dtype)
        self.modules["text_encoder"] = self.place_frozen("text_encoder", module).eval().requires_grad_(False)
        revision = self.cfg.model.revision
        self.tokenizer = Qwen2Tokenizer.from_pretrained(self.model_path, subfolder="tokenizer", revision=revision)
        self.processor = None
        if self.max_controls != 0:
            from transformers import Qwen2VLProcessor

            self.processor = Qwen2VLProcessor.from_pretrained(self.model_path, subfolder="processor",
                                                              revision=revision)

    def pipeline(self, with_text_encoder: bool = False) -> Any:
        """The real diffusers pipeline around the current (unwrapped, LoRA-carrying) weights."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if with_text_encoder:
            self._load_text_encoder()
        has_text = "text_encoder" in self.modules
        kwargs = {}
        if self.max_controls != 0:
            kwargs["processor"] = self.processor if has_text else None
        return self.pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.modules["vae"], transformer=self.unwrapped("transformer"),
            text_encoder=self.modules["text_encoder"] if has_text else None,
            tokenizer=self.tokenizer if has_text else None, **kwargs)

    # -- packing (the pipeline's own static helpers) ---------------------------------------------

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens."""
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"Qwen-Image latents need even height and width, got {h}x{w}; image sides must be "
                             f"multiples of {self.resolution_multiple}.")
        return self.pipeline_class._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, tokens, 4C) -> (B, C, height, width) latents (latent-space sides)."""
        f = self.vae_scale_factor
        return self.pipeline_class._unpack_latents(tokens, height * f, width * f, f).squeeze(2)

    def img_shapes(self, batch_size: int, latent_sizes: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
        """RoPE shapes as the pipelines build them: (frames, h/2, w/2) of the target, then each control."""
        return [[(1, h // 2, w // 2) for h, w in latent_sizes]] * batch_size

    # -- diffusion interface ----------------------------------------------------------------------

    def _masked(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # The pipelines drop an all-ones mask; keep one per sample so variable lengths can be padded.
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_prompt(self, prompts, control_images=None):
        self._load_text_encoder()
        pipe = self.pipeline()
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(list(prompts), device=self.device,
                                              max_sequence_length=self.max_sequence_length)
        return self._masked(embeds, mask)

    def collate_prompt_embeds(self, items):
        """Each sample trimmed to its own tokens, then zero-padded to the longest (mask 0), as
        `_get_qwen_prompt_embeds` pads: cached and freshly encoded batches give the same tensors."""
        trimmed = []
        for item in items:
            for j in range(item["prompt_embeds"].shape[0]):
                length = int(item["prompt_embeds_mask"][j].sum())
                trimmed.append(item["prompt_embeds"][j, :length])
        longest = max(t.shape[0] for t in trimmed)
        embeds = torch.stack([torch.cat([t, t.new_zeros(longest - t.shape[0], t.shape[1])]) for t in trimmed])
        mask = torch.stack([torch.arange(longest) < t.shape[0] for t in trimmed]).long()
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.to(embeds.device)}

    def encode_images(self, pixel_values):
        vae = self.modules["vae"]
        # One frame; the mode (the pipeline's "argmax"), so cached and uncached runs train the same.
        latents = vae.encode(pixel_values.to(self.device, vae.dtype).unsqueeze(2)).latent_dist.mode()
        latents = latents.squeeze(2).float()
        return (latents - self.latents_mean.to(latents.device)) / self.latents_std.to(latents.device)

    def decode_latents(self, latents):
        vae = self.modules["vae"]
        latents = latents.to(self.device).float() * self.latents_std.to(self.device) + self.latents_mean.to(self.device)
        return vae.decode(latents.to(vae.dtype).unsqueeze(2)).sample[:, :, 0]

    def latent_shape(self, height, width):
        if height % self.resolution_multiple or width % self.resolution_multiple:
            raise ValueError(f"{self.name}: image sides must be multiples of {self.resolution_multiple}, "
                             f"got {height}x{width}.")
        return (self.modules["vae"].config.z_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _check_controls(self, count: int) -> None:
        high = self.max_controls
        if high is not None and count > high:
            if high == 0:
                raise ConfigError(f"{self.name} is text-to-image and takes no control images, the data gives "
                                  f"{count}; use model.family: qwen_image_edit (one) or qwen_image_edit_plus "
                                  f"(several), or drop control_images.")
            raise ConfigError(f"{self.name} takes {high} control image per sample, the data gives {count}; "
                              f"use model.family: qwen_image_edit_plus for several.")

    def condition(self, prompt_embeds, batch):
        embeds = prompt_embeds["prompt_embeds"].to(self.device)
        mask = prompt_embeds.get("prompt_embeds_mask")
        if mask is not None:
            mask = mask.to(self.device)
            # As the pipelines do: no mask when nothing is padded (the attention then needs none).
            if bool(mask.all()):
                mask = None
        controls = [c.to(self.device) for c in (batch.get("control_latents") or [])]
        self._check_controls(len(controls))
        for control in controls[1:]:
            if control.shape[0] != controls[0].shape[0]:
                raise ValueError("control_latents: every control slot needs the same batch size.")
        for control in controls:
            if control.shape[0] != embeds.shape[0]:
                raise ValueError(f"control_latents has batch {control.shape[0]}, the prompts {embeds.shape[0]}.")
        return {
            "encoder_hidden_states": embeds,
            "encoder_hidden_states_mask": mask,
            "control_tokens": torch.cat([self.pack(c) for c in controls], dim=1) if controls else None,
            "control_sizes": [tuple(c.shape[-2:]) for c in controls],
        }

    def predict(self, noisy_latents, timesteps, condition):
        transformer = self.modules["transformer"]
        dtype = self.unwrapped("transformer").dtype
        batch_size, _, height, width = noisy_latents.shape
        tokens = self.pack(noisy_latents.to(self.device, dtype))
        num_target = tokens.shape[1]
        if condition["control_tokens"] is not None:
            tokens = torch.cat([tokens, condition["control_tokens"].to(dtype)], dim=1)
        sigmas = timesteps.to(self.device, dtype).reshape(-1).expand(batch_size)
        output = transformer(
            hidden_states=tokens, timestep=sigmas,
            encoder_hidden_states=condition["encoder_hidden_states"].to(dtype),
            encoder_hidden_states_mask=condition["encoder_hidden_states_mask"],
            img_shapes=self.img_shapes(batch_size, [(height, width), *condition["control_sizes"]]),
            return_dict=False)[0]
        return self.unpack(output[:, :num_target], height, width)

    @torch.no_grad()
    def sample(self, prompts, *, height, width, num_inference_steps, guidance_scale, seed,
               control_images=None, prompt_embeds=None, negative_prompt_embeds=None):
        """`guidance_scale` is Qwen-Image's true CFG (`true_cfg_scale`, negative prompt ""); 1 disables it."""
        pipe = self.pipeline(with_text_encoder=prompt_embeds is None)
        generator = torch.Generator("cpu").manual_seed(seed)
        cfg = guidance_scale > 1
        kwargs: dict[str, Any] = {}
        if prompt_embeds is not None:
            kwargs.update(prompt_embeds=prompt_embeds["prompt_embeds"].to(self.device),
                          prompt_embeds_mask=prompt_embeds["prompt_embeds_mask"].to(self.device))
            if cfg:
                if negative_prompt_embeds is None:
                    raise ValueError("sample: guidance_scale > 1 with prompt_embeds needs negative_prompt_embeds.")
                kwargs.update(negative_prompt_embeds=negative_prompt_embeds["prompt_embeds"].to(self.device),
                              negative_prompt_embeds_mask=negative_prompt_embeds["prompt_embeds_mask"].to(self.device))
        else:
            kwargs["prompt"] = list(prompts)
            if cfg:
                kwargs["negative_prompt"] = [""] * len(prompts)
        if control_images:
            raise ConfigError(f"logging.sample_control_images: {self.name} is text-to-image; use "
                              f"qwen_image_edit / qwen_image_edit_plus for edits.")
        return pipe(height=height, width=width, num_inference_steps=num_inference_steps,
                    true_cfg_scale=guidance_scale, max_sequence_length=self.max_sequence_length,
                    generator=generator, **kwargs).images

    # -- saving ------------------------------------------------------------------------------------

    def save_adapter(self, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        transformer = self.unwrapped("transformer")
        if not self.cfg.lora.enabled:
            target = out_dir / "transformer"
            transformer.save_pretrained(target, safe_serialization=True)
            return [target]
        return save_transformer_lora(self.pipeline_class, transformer, out_dir, self.cfg.lora.save_format,
                                     "lora_unet", QWEN_ATTENTION_TARGETS)

    def cache_identity(self) -> str:
        # The family decides the template (t2i / edit / Picture N) and the kept text length.
        return f"{super().cache_identity()}+{self.name}+len{self.max_sequence_length}"

    def load_adapter_weights(self, path: str) -> None:
        load_lora_into_modules({"transformer": self.unwrapped("transformer")}, path)


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: one control image, seen by the VL encoder and appended as latent tokens."""

    name = "qwen_image_edit"
    pipeline_class_name = "QwenImageEditPipeline"
    prompt_uses_images = True
    #: One control image (training.mode: i2i and the data checks require it; none would only come
    #: from data.control_dropout, which this template cannot encode).
    max_controls = 1
    modes = ("i2i",)
    max_control_images = 1
    #: The edit pipelines do not truncate the text (the vision tokens are part of it).
    max_sequence_length = 1024

    @property
    def pipeline_module(self):
        return importlib.import_module(self.pipeline_class.__module__)

    def _vl_images(self, pipe, pils: list) -> list:
        """Control images as the pipeline hands them to the VL processor. Edit: the same image the
        VAE sees (training: the data's size; `sample()` keeps the sampling size the same way)."""
        return pils

    def _controls_per_sample(self, control_images, count: int) -> list[list]:
        """`control_images`: per control slot, the batch's images ((B,3,H,W) or a list of (1,3,H,W)
        / (3,H,W)) -> per sample, its list of PIL images."""
        if not control_images:
            return [[] for _ in range(count)]
        per_sample = [[pixels_to_pil(group[j]) for group in control_images] for j in range(count)]
        return per_sample

    def encode_prompt(self, prompts, control_images=None):
        self._load_text_encoder()
        pipe = self.pipeline()
        per_sample = self._controls_per_sample(control_images, len(prompts))
        for images in per_sample:
            if images:
                self._check_controls(len(images))
        if not per_sample or not per_sample[0]:
            return self._encode_without_images(pipe, list(prompts))
        return self._encode_with_images(pipe, list(prompts), per_sample)

    def _encode_without_images(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise ConfigError(f"{self.name} encodes every prompt together with its control image (its template has "
                          f"an image slot the VL processor refuses to leave empty) and got prompts {prompts[:2]} "
                          f"without one: keep data.control_dropout at 0 (or use model.family: "
                          f"qwen_image_edit_plus, whose prompts also work without images).")

    def _encode_with_images(self, pipe, prompts: list[str], per_sample: list[list]) -> dict[str, torch.Tensor]:
        images = [self._vl_images(pipe, s)[0] for s in per_sample]
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(prompts, image=images, device=self.device)
        return self._masked(embeds, mask)

    @contextlib.contextmanager
    def _control_size(self, width: int, height: int):
        """Make the pipeline rescale control images to the sampling size instead of ~1 Mpx (the size
        training used): only the module's calculate_dimensions calls for the 1 Mpx area change (Plus
        keeps its 384x384-area VL images)."""
        module = self.pipeline_module
        original = module.calculate_dimensions

        def dimensions(target_area, ratio):
            if target_area != PIPELINE_CONTROL_AREA:
                return original(target_area, ratio)
            result = original(target_area, ratio)
            return (width, height, *result[2:])

        module.calculate_dimensions = dimensions
        try:
            yield
        finally:
            module.calculate_dimensions = original

    @torch.no_grad()
    def sample(self, prompts, *, height, width, num_inference_steps, guidance_scale, seed,
               control_images=None, prompt_embeds=None, negative_prompt_embeds=None):
        """One pipeline call per prompt (controls may differ in number and size); `control_images`:
        per prompt a PIL image, or a list of them (Edit-Plus). `guidance_scale` is `true_cfg_scale`."""
        if not control_images or len(control_images) != len(prompts):
            raise ConfigError(f"logging.sample_control_images: {self.name} needs control images, one entry per "
                              f"sample prompt ({len(prompts)} prompts, {len(control_images or [])} entries).")
        pipe = self.pipeline(with_text_encoder=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        images = []
        for prompt, controls in zip(prompts, control_images):
            controls = list(controls) if isinstance(controls, (list, tuple)) else [controls]
            if not controls:
                raise ConfigError(f"logging.sample_control_images: {self.name} samples need a control image.")
            self._check_controls(len(controls))
            # At the sampling size, as in training (the dataset resizes controls to data.resolution).
            controls = [c.convert("RGB").resize((width, height)) for c in controls]
            kwargs: dict[str, Any] = {"negative_prompt": ""} if guidance_scale > 1 else {}
            with self._control_size(width, height):
                images += pipe(image=controls if len(controls) > 1 else controls[0], prompt=prompt,
                               height=height, width=width, num_inference_steps=num_inference_steps,
                               true_cfg_scale=guidance_scale, generator=generator, **kwargs).images
        return images

    def predict_images(self, prompt: str, controls: list, *, height: int, width: int, steps: int,
                       guidance: float, seed: int) -> list:
        """The edit pipeline called as a diffusers user calls it: the source images as given (the
        pipeline resizes them by its own rule: about 1 Mpx; Plus: 384x384 for the VL encoder), not
        at the sampling size as `sample` gives them for training-time samples."""
        if not controls:
            return super().predict_images(prompt, controls, height=height, width=width, steps=steps,
                                          guidance=guidance, seed=seed)
        self._check_controls(len(controls))
        kwargs: dict[str, Any] = {"negative_prompt": ""} if guidance > 1 else {}
        return self.pipeline(with_text_encoder=True)(
            image=controls if len(controls) > 1 else controls[0], prompt=prompt, height=height, width=width,
            num_inference_steps=steps, true_cfg_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
            **kwargs).images


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-2509 ("Plus"): one or more control images, "Picture N:" slots in the prompt,
    each image resized to 384x384 area for the VL encoder."""

    name = "qwen_image_edit_plus"
    pipeline_class_name = "QwenImageEditPlusPipeline"
    max_controls = None
    max_control_images = None

    def _vl_images(self, pipe, pils: list) -> list:
        module = self.pipeline_module
        out = []
        for image in pils:
            w, h = module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, image.width / image.height)
            out.append(pipe.image_processor.resize(image, h, w))
        return out

    def _encode_without_images(self, pipe, prompts):
        # Micro-batches without controls (data.control_dropout): the pipeline's encoding without
        # "Picture N:" slots.
        with torch.no_grad():
            return self._masked(*pipe.encode_prompt(prompts, device=self.device))

    def _encode_with_images(self, pipe, prompts, per_sample):
        # The Plus template puts all of a prompt's images before it ("Picture 1: ... Picture N:"), so
        # a batch call would give every prompt every image: encode one sample at a time.
        items = []
        for prompt, images in zip(prompts, per_sample):
            with torch.no_grad():
                embeds, mask = pipe.encode_prompt([prompt], image=self._vl_images(pipe, images), device=self.device)
            items.append(self._masked(embeds, mask))
        return self.collate_prompt_embeds(items)
