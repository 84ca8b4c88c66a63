"""Packed sequences for BAGEL: samples -> one token sequence with indexes, labels and masks.

Rules from the official repository github.com/ByteDance-Seed/Bagel (our own code):

- `data/dataset_base.py` (`PackedDataset.pack_sequence`): a sample is a plan of items.
  * text: `[<|im_start|>] + ids` then `<|im_end|>`; with loss, the CE labels of the first
    len(ids) + 1 positions are `ids + [<|im_end|>]` (next-token prediction); one "causal" split;
    RoPE positions advance by the split length.
  * ViT image: `<|vision_start|>`, the image's 14x14 patches, `<|vision_end|>`; one "full" split;
    all its tokens share one RoPE position, which then advances by 1.
  * VAE image: `<|vision_start|>`, the (H/16)*(W/16) latent tokens, `<|vision_end|>`, one RoPE
    position; with loss (generation target) the split is "noise", its timestep logit is drawn
    from N(0, 1) and the position does not advance; without loss (a conditioning image) the split
    is "full", the timestep is -inf (clean latent, t = 0) and the position advances by 1.
  * items marked `enable_cfg` are dropped with the conditioning-dropout probabilities (text 0.1,
    ViT 0.3, VAE 0.3 in train/pretrain_unified_navit.py); a dropped image still advances RoPE.
- `data/data_utils.py` (`prepare_attention_mask_per_sample`): a causal split sees itself causally
  and every earlier split; a full or noise split sees itself fully and every earlier split; then
  no token outside a noise split may see it. Samples never see each other (one mask per sample).
  `patchify` orders patch values (p, q, c); flattened positions are row * max_side + col
  (extrapolate) or bucketised fractions (interpolate).
- `data/transforms.py` (`MaxLongEdgeMinShortEdgeResize`, `ImageTransform`): resize so the long
  side <= max and the short side >= min, sides rounded to the stride, capped by max_pixels;
  normalise to [-1, 1] (mean = std = 0.5).
- `train/pretrain_unified_navit.py`: CE summed and divided by the number of CE tokens; MSE
  averaged over channels, summed and divided by the number of generation tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from glm_training.models.bagel.config import BagelConfig

ImageSource = Union[str, Path, Image.Image, torch.Tensor]

SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


# ----------------------------------------------------------------------------------------------
# Sample plans


@dataclass
class TextItem:
    text: str
    loss: bool = False
    #: May be dropped for classifier-free guidance training (official `enable_cfg`).
    cfg: bool = False


@dataclass
class VitImageItem:
    """An image seen by the understanding encoder (SigLIP)."""

    image: ImageSource
    cfg: bool = False


@dataclass
class VaeImageItem:
    """An image as VAE latents: a generation target (loss) or a clean conditioning image."""

    image: ImageSource
    loss: bool = False
    cfg: bool = False


SequenceItem = Union[TextItem, VitImageItem, VaeImageItem]


@dataclass
class BagelSample:
    items: list[SequenceItem]
    #: Where the sample comes from ("file:line"), for error messages.
    source: str = ""


@dataclass
class SpecialTokens:
    bos_token_id: int
    eos_token_id: int
    start_of_image: int
    end_of_image: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """The ids BAGEL uses (official `add_special_tokens`); they must already exist, since adding
        tokens would resize the embeddings of a strictly loaded checkpoint."""
        ids = {}
        for key, token in SPECIAL_TOKENS.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
                raise ValueError(f"The tokenizer has no {token} token; BAGEL needs {list(SPECIAL_TOKENS.values())}.")
            ids[key] = int(token_id)
        return cls(**ids)


# ----------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageResize:
    """Official `MaxLongEdgeMinShortEdgeResize` settings."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        def divisible(value: float) -> int:
            return max(self.stride, int(round(value / self.stride) * self.stride))

        def apply(w: float, h: float, scale: float) -> tuple[int, int]:
            return divisible(round(w * scale)), divisible(round(h * scale))

        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        new_w, new_h = apply(width, height, scale)
        if new_w * new_h > self.max_pixels / img_num:
            # The official transform scales the sides by the area ratio here; kept as is.
            new_w, new_h = apply(new_w, new_h, self.max_pixels / img_num / (new_w * new_h))
        if max(new_w, new_h) > self.max_size:
            new_w, new_h = apply(new_w, new_h, self.max_size / max(new_w, new_h))
        return new_w, new_h


def load_rgb(source: str | Path | Image.Image) -> Image.Image:
    """Open an image as RGB; transparency is composited on white (official `pil_img2rgb`)."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def resize_image(image: Image.Image, resize: ImageResize, img_num: int = 1) -> Image.Image:
    width, height = resize.target_size(*image.size, img_num=img_num)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.BICUBIC)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).sub(0.5).div(0.5).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image."""
    array = ((tensor.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def prepare_image(source: ImageSource, resize: ImageResize, img_num: int = 1) -> torch.Tensor:
    """Load, resize (official rule) and normalise an image; a tensor must already fit the stride."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 3 or source.shape[0] != 3:
            raise ValueError(f"An image tensor must be (3, H, W) in [-1, 1], got {tuple(source.shape)}.")
        if source.shape[1] % resize.stride or source.shape[2] % resize.stride:
            raise ValueError(f"Image tensor {tuple(source.shape)} is not a multiple of the stride {resize.stride}.")
        return source.float()
    return image_to_tensor(resize_image(load_rgb(source), resize, img_num))


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, p * p * C), values ordered (p, q, c) per patch."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"Image {h}x{w} is not a multiple of the patch size {patch}.")
    return image.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0).reshape(-1, patch * patch * c)


def flattened_position_ids(height: int, width: int, patch: int, max_side: int, interpolate: bool) -> torch.Tensor:
    """Position of each patch in a max_side x max_side table (official extrapolate / interpolate)."""
    rows, cols = height // patch, width // patch
    if interpolate:
        boundaries = torch.arange(1 / max_side, 1.0, 1 / max_side)
        row_ids = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / rows), boundaries, right=True)
        col_ids = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / cols), boundaries, right=True)
    else:
        if rows > max_side or cols > max_side:
            raise ValueError(f"An image of {rows}x{cols} patches exceeds the position table ({max_side} per side); "
                             "use smaller images or interpolate_pos.")
        row_ids, col_ids = torch.arange(rows), torch.arange(cols)
    return (row_ids[:, None] * max_side + col_ids[None, :]).flatten()


# ----------------------------------------------------------------------------------------------
# Attention masks


def build_sample_attention_mask(split_lens: list[int], attn_modes: list[str]) -> torch.Tensor:
    """Boolean (L, L) mask of one sample, True where row attends to column (official rules)."""
    total = sum(split_lens)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length, mode in zip(split_lens, attn_modes):
        if mode not in ("causal", "full", "noise"):
            raise ValueError(f"Unknown attention mode {mode!r}.")
        end = start + length
        mask[start:end, :start] = True
        if mode == "causal":
            mask[start:end, start:end] = torch.ones(length, length, dtype=torch.bool).tril()
        else:
            mask[start:end, start:end] = True
        start = end
    start = 0
    for length, mode in zip(split_lens, attn_modes):
        end = start + length
        if mode == "noise":
            mask[:, start:end] = False
            mask[start:end, start:end] = True
        start = end
    return mask


def build_pack_attention_mask(split_lens: list[list[int]], attn_modes: list[list[str]]) -> torch.Tensor:
    """Block-diagonal (N, N) mask of a whole pack: no attention across samples."""
    return torch.block_diag(*[build_sample_attention_mask(s, m) for s, m in zip(split_lens, attn_modes)])


# ----------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackingConfig:
    """Image sizes and conditioning dropout. Defaults: the official training recipe."""

    vae_resize: ImageResize = field(default_factory=lambda: ImageResize(1024, 512, 16))
    vit_resize: ImageResize = field(default_factory=lambda: ImageResize(980, 378, 14, max_pixels=2_007_040))
    text_cond_dropout: float = 0.1
    vit_cond_dropout: float = 0.3
    vae_cond_dropout: float = 0.3

    @classmethod
    def for_model(cls, config: BagelConfig, *, vae_max_size: int = 1024, vae_min_size: int = 512,
                  vit_max_size: int = 980, vit_min_size: int = 378, vit_max_pixels: int = 2_007_040,
                  **dropouts: float) -> PackingConfig:
        """Strides come from the model (latent_downsample, ViT patch size)."""
        return cls(vae_resize=ImageResize(vae_max_size, vae_min_size, config.latent_downsample),
                   vit_resize=ImageResize(vit_max_size, vit_min_size, config.vit_patch_size, vit_max_pixels),
                   **dropouts)

    def without_dropout(self) -> PackingConfig:
        return replace(self, text_cond_dropout=0.0, vit_cond_dropout=0.0, vae_cond_dropout=0.0)


@dataclass
class PackedBatch:
    """One packed sequence (several samples). Index tensors point into the sequence."""

    sequence_length: int
    sample_lens: list[int]
    split_lens: list[list[int]]
    attn_modes: list[list[str]]
    packed_text_ids: torch.Tensor
    packed_text_indexes: torch.Tensor
    packed_position_ids: torch.Tensor
    # text loss
    packed_label_ids: torch.Tensor
    ce_loss_indexes: torch.Tensor
    ce_sample_ids: torch.Tensor
    # understanding images
    packed_vit_tokens: torch.Tensor | None
    packed_vit_position_ids: torch.Tensor | None
    packed_vit_token_indexes: torch.Tensor | None
    vit_token_seqlens: list[int]
    # generation images
    vae_images: list[torch.Tensor]
    vae_latent_shapes: list[tuple[int, int]]
    packed_latent_position_ids: torch.Tensor
    packed_vae_token_indexes: torch.Tensor
    packed_timesteps: torch.Tensor
    vae_token_has_loss: torch.Tensor
    mse_loss_indexes: torch.Tensor
    mse_sample_ids: torch.Tensor
    #: RoPE position after each sample (where a continuation would start).
    next_positions: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {}
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif name == "vae_images":
                value = [image.to(device) for image in value]
            moved[name] = value
        return PackedBatch(**moved)

    def sample_attention_masks(self) -> list[torch.Tensor]:
        return [build_sample_attention_mask(s, m) for s, m in zip(self.split_lens, self.attn_modes)]

    def attention_mask(self) -> torch.Tensor:
        """The whole pack's boolean mask (for inspection; the model attends per sample)."""
        return build_pack_attention_mask(self.split_lens, self.attn_modes)

    def attention_layout(self):
        from glm_training.models.bagel.model import AttentionLayout

        return AttentionLayout(list(self.sample_lens), self.sample_attention_masks())

    @property
    def n_text_tokens(self) -> int:
        return int(self.ce_loss_indexes.numel())

    @property
    def n_image_tokens(self) -> int:
        return int(self.mse_loss_indexes.numel())


class _Builder:
    def __init__(self) -> None:
        self.curr = 0
        self.text_ids: list[int] = []
        self.text_indexes: list[int] = []
        self.position_ids: list[int] = []
        self.label_ids: list[int] = []
        self.ce_indexes: list[int] = []
        self.ce_sample: list[int] = []
        self.vit_tokens: list[torch.Tensor] = []
        self.vit_positions: list[torch.Tensor] = []
        self.vit_indexes: list[int] = []
        self.vit_seqlens: list[int] = []
        self.vae_images: list[torch.Tensor] = []
        self.vae_shapes: list[tuple[int, int]] = []
        self.latent_positions: list[torch.Tensor] = []
        self.vae_indexes: list[int] = []
        self.timesteps: list[float] = []
        self.vae_has_loss: list[bool] = []
        self.mse_indexes: list[int] = []
        self.mse_sample: list[int] = []
        self.sample_lens: list[int] = []
        self.split_lens: list[list[int]] = []
        self.attn_modes: list[list[str]] = []
        self.next_positions: list[int] = []

    def add_text_token(self, token_id: int) -> None:
        self.text_ids.append(token_id)
        self.text_indexes.append(self.curr)
        self.curr += 1


def pack_samples(samples: list[BagelSample], tokenizer, special: SpecialTokens, config: BagelConfig,
                 packing: PackingConfig | None = None, *, rng: random.Random | None = None,
                 train: bool = True) -> PackedBatch:
    """Pack `samples` into one sequence following the official plan rules (see module doc).

    `rng` draws the conditioning dropout and the timestep logits; with `train=False` nothing is
    dropped (inference contexts).
    """
    packing = packing or PackingConfig.for_model(config)
    if packing.vae_resize.stride % config.latent_downsample or packing.vit_resize.stride % config.vit_patch_size:
        raise ValueError(f"PackingConfig strides (vae {packing.vae_resize.stride}, vit {packing.vit_resize.stride}) "
                         f"must be multiples of the model's ({config.latent_downsample}, {config.vit_patch_size}).")
    rng = rng or random.Random()
    if not train:
        packing = packing.without_dropout()
    b = _Builder()
    for sample_id, sample in enumerate(samples):
        try:
            _pack_one(b, sample, sample_id, tokenizer, special, config, packing, rng)
        except (OSError, ValueError) as error:
            where = f" ({sample.source})" if sample.source else ""
            raise ValueError(f"Cannot pack sample {sample_id}{where}: {error}") from error

    def longs(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    has_vit = bool(b.vit_tokens)
    return PackedBatch(
        sequence_length=b.curr,
        sample_lens=b.sample_lens,
        split_lens=b.split_lens,
        attn_modes=b.attn_modes,
        packed_text_ids=longs(b.text_ids),
        packed_text_indexes=longs(b.text_indexes),
        packed_position_ids=longs(b.position_ids),
        packed_label_ids=longs(b.label_ids),
        ce_loss_indexes=longs(b.ce_indexes),
        ce_sample_ids=longs(b.ce_sample),
        packed_vit_tokens=torch.cat(b.vit_tokens) if has_vit else None,
        packed_vit_position_ids=torch.cat(b.vit_positions) if has_vit else None,
        packed_vit_token_indexes=longs(b.vit_indexes) if has_vit else None,
        vit_token_seqlens=b.vit_seqlens,
        vae_images=b.vae_images,
        vae_latent_shapes=b.vae_shapes,
        packed_latent_position_ids=torch.cat(b.latent_positions) if b.latent_positions else longs([]),
        packed_vae_token_indexes=longs(b.vae_indexes),
        packed_timesteps=torch.tensor(b.timesteps, dtype=torch.float32),
        vae_token_has_loss=torch.tensor(b.vae_has_loss, dtype=torch.bool),
        mse_loss_indexes=longs(b.mse_indexes),
        mse_sample_ids=longs(b.mse_sample),
        next_positions=b.next_positions,
    )


def _pack_one(b: _Builder, sample: BagelSample, sample_id: int, tokenizer, special: SpecialTokens,
              config: BagelConfig, packing: PackingConfig, rng: random.Random) -> None:
    start = b.curr
    rope = 0
    split_lens: list[int] = []
    attn_modes: list[str] = []
    num_vit_images = sum(isinstance(item, VitImageItem) for item in sample.items)
    for item in sample.items:
        split_start = b.curr
        if isinstance(item, TextItem):
            ids = list(tokenizer.encode(item.text, add_special_tokens=False))
            if not ids:
                continue
            if item.cfg and rng.random() < packing.text_cond_dropout:
                continue
            shifted = [special.bos_token_id] + ids
            if item.loss:
                b.ce_indexes.extend(range(b.curr, b.curr + len(shifted)))
                b.label_ids.extend(ids + [special.eos_token_id])
                b.ce_sample.extend([sample_id] * len(shifted))
            for token in shifted + [special.eos_token_id]:
                b.add_text_token(token)
            length = b.curr - split_start
            b.position_ids.extend(range(rope, rope + length))
            rope += length
            split_lens.append(length)
            attn_modes.append("causal")
        elif isinstance(item, VitImageItem):
            image = prepare_image(item.image, packing.vit_resize, img_num=num_vit_images)
            if item.cfg and rng.random() < packing.vit_cond_dropout:
                rope += 1
                continue
            patch = config.vit_patch_size
            b.add_text_token(special.start_of_image)
            tokens = patchify(image, patch)
            b.vit_indexes.extend(range(b.curr, b.curr + tokens.shape[0]))
            b.curr += tokens.shape[0]
            b.vit_tokens.append(tokens)
            b.vit_seqlens.append(tokens.shape[0])
            b.vit_positions.append(flattened_position_ids(image.shape[1], image.shape[2], patch,
                                                          config.vit_max_num_patch_per_side, config.interpolate_pos))
            b.add_text_token(special.end_of_image)
            length = b.curr - split_start
            b.position_ids.extend([rope] * length)
            rope += 1
            split_lens.append(length)
            attn_modes.append("full")
        elif isinstance(item, VaeImageItem):
            image = prepare_image(item.image, packing.vae_resize)
            if item.cfg and rng.random() < packing.vae_cond_dropout:
                rope += 1
                continue
            down = config.latent_downsample
            h, w = image.shape[1] // down, image.shape[2] // down
            b.add_text_token(special.start_of_image)
            b.vae_images.append(image)
            b.vae_shapes.append((h, w))
            b.latent_positions.append(flattened_position_ids(image.shape[1], image.shape[2], down,
                                                             config.max_latent_size, config.interpolate_pos))
            count = h * w
            b.vae_indexes.extend(range(b.curr, b.curr + count))
            b.vae_has_loss.extend([item.loss] * count)
            if item.loss:
                b.mse_indexes.extend(range(b.curr, b.curr + count))
                b.mse_sample.extend([sample_id] * count)
                b.timesteps.extend([rng.gauss(0.0, 1.0)] * count)
            else:
                b.timesteps.extend([float("-inf")] * count)
            b.curr += count
            b.add_text_token(special.end_of_image)
            length = b.curr - split_start
            b.position_ids.extend([rope] * length)
            if not item.loss:
                rope += 1
            split_lens.append(length)
            attn_modes.append("noise" if item.loss else "full")
        else:
            raise ValueError(f"Unknown sequence item {type(item).__name__}.")
    if b.curr == start:
        raise ValueError("the sample packs to no token (every item empty or dropped).")
    b.sample_lens.append(b.curr - start)
    b.split_lens.append(split_lens)
    b.attn_modes.append(attn_modes)
    b.next_positions.append(rope)
