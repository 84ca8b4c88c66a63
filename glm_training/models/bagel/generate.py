"""Text-to-image and editing with BAGEL: flow ODE with classifier-free guidance on text and image.

Facts from the official repository github.com/ByteDance-Seed/Bagel (our own code):

- `inferencer.py` (`interleave_inference`, `gen_image`): three contexts are kept. The full one
  (input images then the prompt); the text-unconditional one (the context before the prompt:
  the input images, or nothing for text-to-image); the image-unconditional one (the prompt
  alone). An input image enters the context twice, as clean VAE latents (generation expert,
  timestep 0) and through the ViT, after being resized with the VAE transform; its size is the
  output size.
- `modeling/bagel/bagel.py` (`prepare_vae_latent`, `generate_image`, `_forward_flow`): the
  generated image is `<|vision_start|>`, h*w latent tokens, `<|vision_end|>` at the context's next
  RoPE position, attending fully to the context and to itself. Timesteps
  t = linspace(1, 0, N), shifted by s*t / (1 + (s - 1)*t); N - 1 Euler steps
  x <- x - v(x, t) * (t_i - t_{i+1}). Guidance applies when cfg_interval[0] < t <= cfg_interval[1]:
  v_text = v_tu + s_text (v - v_tu), then v' = v_iu + s_img (v_text - v_iu) and renormalisation:
  "global" / "channel" scale v' by clamp(|v| / |v'|, renorm_min, 1) (whole tensor / per token);
  "text_channel" renormalises v_text per token before the image guidance.
- `inference.ipynb` / `app.py` defaults: text-to-image cfg_text 4.0, cfg_img 1.0, interval
  [0.4, 1.0], renorm "global"; editing cfg_text 4.0, cfg_img 2.0, interval [0.0, 1.0], renorm
  "text_channel"; timestep_shift 3.0, 50 timesteps; images resized with (1024, 512, stride 16)
  for the VAE and (980, 224, stride 14) for the ViT.
- `bagel.py` (`prepare_start_tokens`, `generate_text`, `chat`): understanding decodes from
  `<|im_start|>` at the context's next RoPE position, one token at a time with the KV cache, until
  `<|im_end|>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from glm_training.models.bagel.model import AttentionLayout, BagelModel, KVCache, shift_timesteps
from glm_training.models.bagel.packing import (
    BagelSample,
    ImageResize,
    ImageSource,
    PackingConfig,
    SequenceItem,
    SpecialTokens,
    TextItem,
    VaeImageItem,
    VitImageItem,
    flattened_position_ids,
    load_rgb,
    pack_samples,
    resize_image,
    tensor_to_image,
)

RENORM_TYPES = ("global", "channel", "text_channel")
#: The official sampling shift (inference.ipynb / app.py), `BagelSampler.generate`'s default. The
#: config's `timestep_shift` is the training-time shift (1.0 in the released config).
SAMPLING_TIMESTEP_SHIFT = 3.0


def official_guidance(editing: bool) -> dict:
    """The official notebook's guidance settings besides cfg_text_scale, per task (what `generate`
    defaults to): image guidance, the interval of t where guidance applies, renormalisation."""
    return {"cfg_img_scale": 2.0 if editing else 1.0, "cfg_interval": (0.0, 1.0) if editing else (0.4, 1.0),
            "cfg_renorm_type": "text_channel" if editing else "global", "cfg_renorm_min": 0.0}


def inference_packing(model: BagelModel) -> PackingConfig:
    """The official inference image sizes (app.py / inference.ipynb)."""
    return PackingConfig.for_model(model.bagel_config, vae_max_size=1024, vae_min_size=512,
                                   vit_max_size=980, vit_min_size=224, vit_max_pixels=14 * 14 * 9 * 1024)


@dataclass
class Context:
    """A prefilled context: each layer's keys and values, its length and next RoPE position."""

    cache: KVCache | None
    length: int
    next_position: int


@dataclass
class GenerationCondition:
    full: Context
    text_uncond: Context
    image_uncond: Context
    height: int
    width: int
    latent_h: int
    latent_w: int
    latent_position_ids: torch.Tensor


class BagelSampler:
    """Builds the guidance contexts and evaluates guided velocities; `generate` runs the ODE.

    `prepare` and `velocity` keep autograd on (policy-gradient methods can call them under grad);
    `generate` runs without it.
    """

    def __init__(self, model: BagelModel, tokenizer, special: SpecialTokens | None = None,
                 packing: PackingConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.special = special or SpecialTokens.from_tokenizer(tokenizer)
        self.packing = (packing or inference_packing(model)).without_dropout()

    # -- contexts ------------------------------------------------------------------------------

    def build_context(self, items: list[SequenceItem], generator: torch.Generator | None = None) -> Context:
        model = self.model
        sample = BagelSample(items)
        batch = pack_samples([sample], self.tokenizer, self.special, model.bagel_config, self.packing,
                             train=False).to(model.device) if _has_tokens(sample, self.tokenizer) else None
        if batch is None:
            return Context(cache=None, length=0, next_position=0)
        inputs = model.embed_packed_inputs(batch, generator=generator)
        _, cache = model.language_model.model(inputs.embeds, batch.packed_position_ids, inputs.is_gen,
                                              batch.attention_layout())
        return Context(cache=cache, length=batch.sequence_length, next_position=batch.next_positions[0])

    def prepare(self, prompt: str, input_image: ImageSource | None = None, *, height: int | None = None,
                width: int | None = None, generator: torch.Generator | None = None) -> GenerationCondition:
        config = self.model.bagel_config
        down = config.latent_downsample
        prompt_item = TextItem(prompt)
        if input_image is None:
            full = self.build_context([prompt_item], generator)
            text_uncond = Context(cache=None, length=0, next_position=0)
            image_uncond = full
            height = height or self.packing.vae_resize.max_size
            width = width or self.packing.vae_resize.max_size
        else:
            image = input_image
            if not isinstance(image, torch.Tensor):
                image = resize_image(load_rgb(image), self.packing.vae_resize)
            vit_image = _vit_ready(image, self.packing.vit_resize)
            image_items: list[SequenceItem] = [VaeImageItem(image), VitImageItem(vit_image)]
            text_uncond = self.build_context(image_items, generator)
            full = self.build_context(image_items + [prompt_item], generator)
            image_uncond = self.build_context([prompt_item], generator)
            if isinstance(image, torch.Tensor):
                image_h, image_w = image.shape[1:]
            else:
                image_w, image_h = image.size
            height, width = height or image_h, width or image_w
        if height % down or width % down:
            raise ValueError(f"height and width must be multiples of {down} (latent downsample), got {height}x{width}.")
        latent_h, latent_w = height // down, width // down
        positions = flattened_position_ids(height, width, down, config.max_latent_size, config.interpolate_pos)
        return GenerationCondition(full, text_uncond, image_uncond, height, width, latent_h, latent_w,
                                   positions.to(self.model.device))

    # -- velocities ----------------------------------------------------------------------------

    def raw_velocity(self, context: Context, x_t: torch.Tensor, t: float, positions: torch.Tensor) -> torch.Tensor:
        """The model's velocity for latent tokens x_t at time t, given one context."""
        model = self.model
        n = x_t.shape[0]
        device = model.device
        marks = model.embed_text(torch.tensor([self.special.start_of_image, self.special.end_of_image], device=device))
        latents = model.embed_latents(x_t, torch.full((n,), float(t), device=device), positions)
        embeds = torch.cat([marks[:1], latents.to(marks.dtype), marks[1:]])
        is_gen = torch.zeros(n + 2, dtype=torch.bool, device=device)
        is_gen[1:n + 1] = True
        position_ids = torch.full((n + 2,), context.next_position, dtype=torch.long, device=device)
        mask = torch.ones(n + 2, context.length + n + 2, dtype=torch.bool, device=device)
        hidden, _ = model.language_model.model(embeds, position_ids, is_gen, AttentionLayout([n + 2], [mask]),
                                               past=context.cache)
        return model.llm2vae(hidden[1:n + 1]).float()

    def velocity(self, cond: GenerationCondition, x_t: torch.Tensor, t: float, *, cfg_text_scale: float = 1.0,
                 cfg_img_scale: float = 1.0, cfg_renorm_min: float = 0.0,
                 cfg_renorm_type: str = "global") -> torch.Tensor:
        """Guided velocity (official `_forward_flow`)."""
        if cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {cfg_renorm_type!r}.")
        positions = cond.latent_position_ids
        v = self.raw_velocity(cond.full, x_t, t, positions)
        if cfg_text_scale <= 1.0:
            return v
        v_text_uncond = self.raw_velocity(cond.text_uncond, x_t, t, positions)
        v_img_uncond = self.raw_velocity(cond.image_uncond, x_t, t, positions) if cfg_img_scale > 1.0 else None
        v_text = v_text_uncond + cfg_text_scale * (v - v_text_uncond)
        if cfg_renorm_type == "text_channel":
            scale = (v.norm(dim=-1, keepdim=True) / (v_text.norm(dim=-1, keepdim=True) + 1e-8))
            v_text = v_text * scale.clamp(min=cfg_renorm_min, max=1.0)
            return v_img_uncond + cfg_img_scale * (v_text - v_img_uncond) if v_img_uncond is not None else v_text
        guided = v_img_uncond + cfg_img_scale * (v_text - v_img_uncond) if v_img_uncond is not None else v_text
        if cfg_renorm_type == "global":
            scale = v.norm() / (guided.norm() + 1e-8)
        else:
            scale = v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
        return guided * scale.clamp(min=cfg_renorm_min, max=1.0)

    def interval_velocity(self, cond: GenerationCondition, x_t: torch.Tensor, t: float, *, cfg_text_scale: float,
                          cfg_img_scale: float, cfg_interval: tuple[float, float], cfg_renorm_min: float = 0.0,
                          cfg_renorm_type: str = "global") -> torch.Tensor:
        """The velocity `generate` steps with at time t: guided inside `cfg_interval`, plain outside."""
        guided = cfg_interval[0] < t <= cfg_interval[1]
        return self.velocity(cond, x_t, t, cfg_text_scale=cfg_text_scale if guided else 1.0,
                             cfg_img_scale=cfg_img_scale if guided else 1.0, cfg_renorm_min=cfg_renorm_min,
                             cfg_renorm_type=cfg_renorm_type)

    # -- sampling ------------------------------------------------------------------------------

    @staticmethod
    def timesteps(num_timesteps: int, timestep_shift: float) -> torch.Tensor:
        if num_timesteps < 2:
            raise ValueError("num_timesteps must be at least 2 (the official schedule has N - 1 steps).")
        return shift_timesteps(torch.linspace(1, 0, num_timesteps), timestep_shift)

    def initial_noise(self, cond: GenerationCondition, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (cond.latent_h * cond.latent_w, self.model.bagel_config.patch_latent_dim)
        return torch.randn(shape, generator=generator).to(self.model.device)

    def decode(self, cond: GenerationCondition, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens -> image tensor (3, H, W) in [-1, 1]."""
        latent = self.model.unpatchify_latent(tokens, cond.latent_h, cond.latent_w)
        return self.model.vae.decode(latent[None])[0].float().clamp(-1, 1)

    @torch.no_grad()
    def generate(self, prompt: str, input_image: ImageSource | None = None, *, height: int | None = None,
                 width: int | None = None, num_timesteps: int = 50, timestep_shift: float = 3.0,
                 cfg_text_scale: float = 4.0, cfg_img_scale: float | None = None,
                 cfg_interval: tuple[float, float] | None = None, cfg_renorm_min: float = 0.0,
                 cfg_renorm_type: str | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, output_type: str = "pil") -> Image.Image | torch.Tensor:
        """One image: text-to-image, or an edit of `input_image`. Defaults follow the official
        notebook for each task. output_type "pil" or "pt" ((3, H, W) in [-1, 1])."""
        editing = input_image is not None
        cfg_img_scale = cfg_img_scale if cfg_img_scale is not None else (2.0 if editing else 1.0)
        cfg_interval = cfg_interval if cfg_interval is not None else ((0.0, 1.0) if editing else (0.4, 1.0))
        cfg_renorm_type = cfg_renorm_type or ("text_channel" if editing else "global")
        if generator is None:
            generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        was_training = self.model.training
        self.model.eval()
        try:
            cond = self.prepare(prompt, input_image, height=height, width=width, generator=generator)
            x = self.initial_noise(cond, generator)
            schedule = self.timesteps(num_timesteps, timestep_shift)
            for t, t_next in zip(schedule[:-1].tolist(), schedule[1:].tolist()):
                guided = cfg_interval[0] < t <= cfg_interval[1]
                v = self.velocity(cond, x, t, cfg_text_scale=cfg_text_scale if guided else 1.0,
                                  cfg_img_scale=cfg_img_scale if guided else 1.0,
                                  cfg_renorm_min=cfg_renorm_min, cfg_renorm_type=cfg_renorm_type)
                x = x - v * (t - t_next)
            image = self.decode(cond, x)
        finally:
            self.model.train(was_training)
        return tensor_to_image(image) if output_type == "pil" else image


    @torch.no_grad()
    def generate_text(self, prompt: str, images: list[ImageSource] | tuple = (), *, max_new_tokens: int = 64,
                      do_sample: bool = False, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> str:
        """Understanding: answer `prompt` about `images` (official `chat`: images through the ViT,
        then the prompt, then decoding from <|im_start|> until <|im_end|>)."""
        return self.answer_context([VitImageItem(image) for image in images] + [TextItem(prompt)],
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   generator=generator)

    @torch.no_grad()
    def answer_context(self, items: list[SequenceItem], *, max_new_tokens: int = 64, do_sample: bool = False,
                       temperature: float = 1.0, generator: torch.Generator | None = None) -> str:
        """The next assistant text after a context of sequence items (a conversation up to the
        answer: system/user text, ViT images, clean VAE images), decoded as `generate_text` does.
        Learned items of the plan (earlier answers, generated images) are given as plain context."""
        model = self.model
        device = model.device
        was_training = model.training
        model.eval()
        try:
            context = self.build_context([as_context(item) for item in items])
            cache, length, position = context.cache, context.length, context.next_position
            token = self.special.bos_token_id
            generated: list[int] = []
            for _ in range(max_new_tokens):
                embeds = model.embed_text(torch.tensor([token], device=device))
                mask = torch.ones(1, length + 1, dtype=torch.bool, device=device)
                hidden, new_kv = model.language_model.model(
                    embeds, torch.tensor([position], device=device), torch.zeros(1, dtype=torch.bool, device=device),
                    AttentionLayout([1], [mask]), past=cache)
                cache = new_kv if cache is None else [(torch.cat([pk, k]), torch.cat([pv, v]))
                                                      for (pk, pv), (k, v) in zip(cache, new_kv)]
                length, position = length + 1, position + 1
                logits = model.language_model.lm_head(hidden[-1]).float()
                if do_sample:
                    probs = torch.softmax(logits / temperature, dim=-1).cpu()
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(logits.argmax())
                if token == self.special.eos_token_id:
                    break
                generated.append(token)
        finally:
            model.train(was_training)
        return self.tokenizer.decode(generated)


def as_context(item: SequenceItem) -> SequenceItem:
    """An item of a training plan as context: no loss, no CFG dropout (an earlier answer is text
    the model reads; an earlier generated image is a clean VAE image)."""
    if isinstance(item, TextItem):
        return TextItem(item.text)
    if isinstance(item, VaeImageItem):
        return VaeImageItem(item.image)
    return VitImageItem(item.image)


def _vit_ready(image: Image.Image | torch.Tensor, resize: ImageResize) -> Image.Image | torch.Tensor:
    """The ViT copy of an input image, resized with the ViT rule."""
    if isinstance(image, torch.Tensor):
        image = tensor_to_image(image)
    return resize_image(image, resize)


def _has_tokens(sample: BagelSample, tokenizer) -> bool:
    return any(not isinstance(item, TextItem) or tokenizer.encode(item.text, add_special_tokens=False)
               for item in sample.items)


def generate_image(model: BagelModel, tokenizer, prompt: str, input_image: ImageSource | None = None,
                   **kwargs) -> Image.Image | torch.Tensor:
    """Convenience wrapper: `BagelSampler(model, tokenizer).generate(prompt, input_image, **kwargs)`.
    `packing` and `special` keyword arguments go to the sampler."""
    sampler = BagelSampler(model, tokenizer, special=kwargs.pop("special", None), packing=kwargs.pop("packing", None))
    return sampler.generate(prompt, input_image, **kwargs)
