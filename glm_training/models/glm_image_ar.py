"""GLM-Image's autoregressive generator: sequence layout, teacher forcing, log-probs, generation.

The AR model (`GlmImageForConditionalGeneration`) reads the prompt as the GLM-Image processor builds
it (`GlmImagePipeline.generate_prior_tokens`): the chat template with any source images as
`<start><|image|>...<end>` (placeholders replaced by each image's VQ tokens), the text, the target
grid(s) `<sop>h w<eop>` and the image-start token. It then generates image tokens directly as ids
(token id == codebook index):

- text-to-image: the compact preview grid first (about 16x16 tokens), then the full grid
  (H/32 x W/32), then one more (stop) token;
- image-to-image: only the full grid, then the stop token.

Decode positions are not text positions: the model gives each generated grid 3-D rope positions
(`GlmImageModel.get_rope_index` stores them in `_cached_decode_position_ids`). Teacher forcing here
uses exactly those positions, so the training forward equals the generation forward.

Targets for SFT are the target image's own VQ tokens (`image_tokens_per_image`), at the preview
grid (the target resized to the preview size) and at the full grid. The loss is next-token
cross-entropy on those image tokens only: prompt positions carry the ignore label -100.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from glm_training.models.glm_image_support import image_tokens_per_image

IGNORE_INDEX = -100
#: The AR grid is one token per 32x32 pixels (the processor's `_get_target_shape` factor).
AR_PIXELS_PER_TOKEN = 32


# ------------------------------------------------------------------------------------------------
# Pure functions (no model): the loss and the log-probs from logits and labels.


def next_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probs of the next token, in float32.

    `logits` (B, L, V) at position i predict `labels[:, i + 1]`. Returns (logprobs, mask), both
    (B, L - 1); positions whose label is IGNORE_INDEX have mask False and log-prob 0.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def masked_next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (image) tokens of each sample: shape (B,)."""
    logprobs, mask = next_token_logprobs(logits, labels)
    count = mask.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError("A sample has no labelled tokens: nothing to train on (check the image tokens).")
    return -logprobs.sum(dim=1) / count


# ------------------------------------------------------------------------------------------------
# Inputs


def pixels_to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB PIL (exact inverse of the dataset's `to_tensor`)."""
    array = ((pixels.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


@dataclass
class ArPrompt:
    """The prompt side of a batch, as the AR model reads it before generating."""

    input_ids: torch.Tensor            # (B, P), left-padded, source-image placeholders replaced
    attention_mask: torch.Tensor       # (B, P)
    image_grid_thw: torch.Tensor       # every grid (sources and targets), processor order
    images_per_sample: torch.Tensor    # (B,)
    decode_grids: list[tuple[int, int]]  # generated grids in generation order, e.g. [preview, full]

    @property
    def num_image_tokens(self) -> int:
        return sum(h * w for h, w in self.decode_grids)

    def generate_kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "image_grid_thw": self.image_grid_thw, "images_per_sample": self.images_per_sample}


def build_ar_prompt(ar_model: Any, processor: Any, prompts: list[str], height: int, width: int,
                    control_images: list[list[Image.Image]] | None = None,
                    device: torch.device | str = "cpu") -> ArPrompt:
    """Tokenise prompts (and source images) exactly as `GlmImagePipeline.generate_prior_tokens`
    does (same chat messages, processor call and padding); source placeholders get each source
    image's VQ tokens, which is what the model's forward substitutes for them."""
    if height % AR_PIXELS_PER_TOKEN or width % AR_PIXELS_PER_TOKEN:
        raise ValueError(f"GLM-Image needs height and width divisible by 32, got {height}x{width} "
                         "(set data.resolution to a multiple of 32).")
    batch_size = len(prompts)
    num_sources = len(control_images[0]) if control_images else 0
    messages = []
    for index, text in enumerate(prompts):
        content = [{"type": "image", "image": image} for image in (control_images[index] if num_sources else [])]
        messages.append([{"role": "user", "content": content + [{"type": "text", "text": text}]}])
    inputs = processor.apply_chat_template(
        messages, tokenize=True, padding=batch_size > 1, target_h=height, target_w=width,
        return_dict=True, return_tensors="pt")
    if getattr(processor.tokenizer, "padding_side", "left") != "left" and batch_size > 1:
        raise ValueError("The GLM-Image tokenizer must pad on the left (generation continues after the prompt).")
    input_ids, grids = inputs["input_ids"], inputs["image_grid_thw"]
    images_per_sample = inputs["images_per_sample"]
    per_sample = int(images_per_sample[0])
    if num_sources:
        source_index = [s * per_sample + i for s in range(batch_size) for i in range(num_sources)]
        tokens = image_tokens_per_image(ar_model, inputs["pixel_values"], grids[source_index])
        placeholders = input_ids == processor.image_token_id
        input_ids = input_ids.masked_scatter(placeholders, torch.cat(tokens).to(input_ids.dtype))
    # The model decodes the target grids last-to-first (get_rope_index): preview, then full.
    decode = [(int(g[1]), int(g[2])) for g in reversed(grids[num_sources:per_sample].tolist())]
    return ArPrompt(input_ids.to(device), inputs["attention_mask"].to(device), grids.to(device),
                    images_per_sample.to(device), decode)


class TargetTokenCache:
    """VQ tokens of target images at a grid size. Deterministic for fixed pixels and a frozen image
    tokenizer, so they are computed once per (pixels, grid)."""

    def __init__(self, max_entries: int = 100_000):
        self.entries: dict[str, torch.Tensor] = {}
        self.max_entries = max_entries

    @staticmethod
    def key(pixels: torch.Tensor, grid: tuple[int, int]) -> str:
        data = ((pixels.detach().float().cpu() + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()
        return f"{hashlib.sha1(data).hexdigest()}-{grid[0]}x{grid[1]}"

    def tokens(self, ar_model: Any, processor: Any, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        key = self.key(pixels, grid)
        if key not in self.entries:
            image = pixels_to_pil(pixels)
            size = (grid[1] * AR_PIXELS_PER_TOKEN, grid[0] * AR_PIXELS_PER_TOKEN)  # PIL: (w, h)
            if image.size != size:  # the preview grid: the target at the preview's size
                image = image.resize(size, Image.Resampling.BICUBIC)
            tokens = image_tokens_per_image(ar_model, processor, [image])[0].cpu()
            if tokens.numel() != grid[0] * grid[1]:
                raise ValueError(f"The GLM-Image image tokenizer gave {tokens.numel()} tokens for a {size} image; "
                                 f"the AR grid {grid} expects {grid[0] * grid[1]}. Check the processor's "
                                 "min_pixels/max_pixels: they must not resize target images.")
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = tokens
        return self.entries[key]


def target_image_tokens(ar_model: Any, processor: Any, pixel_values: torch.Tensor, prompt: ArPrompt,
                        cache: TargetTokenCache | None = None) -> torch.Tensor:
    """(B, N) target token sequence in generation order (preview grid then full grid, or full only)."""
    cache = cache or TargetTokenCache()
    rows = [torch.cat([cache.tokens(ar_model, processor, pixels, grid) for grid in prompt.decode_grids])
            for pixels in pixel_values]
    return torch.stack(rows).to(prompt.input_ids.device)


# ------------------------------------------------------------------------------------------------
# Teacher forcing and generation


def teacher_forced_inputs(ar_model: Any, prompt: ArPrompt, image_tokens: torch.Tensor
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs for prompt + image tokens with the positions generation uses, and the labels
    (IGNORE_INDEX on the prompt, the image tokens after it)."""
    base = getattr(ar_model, "model", ar_model)  # GlmImageForConditionalGeneration -> GlmImageModel
    if image_tokens.shape[1] != prompt.num_image_tokens:
        raise ValueError(f"Expected {prompt.num_image_tokens} image tokens per sample (grids "
                         f"{prompt.decode_grids}), got {image_tokens.shape[1]}.")
    prefill, _ = base.get_rope_index(prompt.input_ids, image_grid_thw=prompt.image_grid_thw,
                                     images_per_sample=prompt.images_per_sample,
                                     attention_mask=prompt.attention_mask)
    decode = base._cached_decode_position_ids[:, :, :image_tokens.shape[1]].permute(1, 0, 2)
    tokens = image_tokens.to(prompt.input_ids.device, prompt.input_ids.dtype)
    inputs = {
        "input_ids": torch.cat([prompt.input_ids, tokens], dim=1),
        "attention_mask": torch.cat([prompt.attention_mask, torch.ones_like(tokens)], dim=1),
        "position_ids": torch.cat([prefill, decode.to(prefill.dtype)], dim=-1),
    }
    labels = torch.cat([torch.full_like(prompt.input_ids, IGNORE_INDEX), tokens], dim=1)
    return inputs, labels


def image_token_logits(ar_forward: Any, ar_model: Any, prompt: ArPrompt, image_tokens: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one teacher-forced forward. `ar_forward` is the (possibly DDP-wrapped)
    module to call, `ar_model` the plain `GlmImageForConditionalGeneration`."""
    inputs, labels = teacher_forced_inputs(ar_model, prompt, image_tokens)
    return ar_forward(**inputs).logits, labels


@torch.no_grad()
def generate_image_tokens(ar_model: Any, prompt: ArPrompt, seed: int, temperature: float = 1.0,
                          **generate_kwargs: Any) -> dict[str, torch.Tensor]:
    """Sample the image tokens (as the pipeline does: `generate(do_sample=True)` after
    `torch.manual_seed(seed)`) and return `tokens` (B, N), per-token `logprobs` (B, N) and their
    sum `logprob` (B,). Log-probs are of the model's temperature-scaled distribution, float32:
    exactly what `image_token_logits` gives for the same tokens (teacher forcing)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    # The full softmax at `temperature`, whatever the checkpoint's generation config says (its
    # top_k / top_p would truncate the sampled distribution under the log-probs; TRL pins them too).
    generate_kwargs = {"top_k": 0, "top_p": 1.0, "min_p": None, **generate_kwargs}
    count = prompt.num_image_tokens
    output = ar_model.generate(**prompt.generate_kwargs(), max_new_tokens=count + 1, do_sample=True,
                               temperature=temperature, output_logits=True, return_dict_in_generate=True,
                               **generate_kwargs)
    start = prompt.input_ids.shape[1]
    tokens = output.sequences[:, start:start + count]
    if tokens.shape[1] != count:
        raise RuntimeError(f"The AR model stopped after {tokens.shape[1]} of {count} image tokens.")
    logits = torch.stack(output.logits[:count], dim=1).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return {"tokens": tokens, "logprobs": logprobs, "logprob": logprobs.sum(dim=1)}


def upsampled_full_grid_tokens(tokens: torch.Tensor, prompt: ArPrompt) -> torch.Tensor:
    """The DiT prior tokens from generated ones: the full grid (last decode grid), upsampled 2x, as
    `GlmImagePipeline._extract_large_image_tokens` + `_upsample_token_ids` do."""
    from glm_training.models.glm_image_support import upsample_image_tokens

    h, w = prompt.decode_grids[-1]
    large = tokens[:, tokens.shape[1] - h * w:]
    return torch.stack([upsample_image_tokens(row, h, w) for row in large])
