"""The BAGEL model: a Mixture-of-Transformers Qwen2 LM, a SigLIP NaViT encoder with an MLP
connector (understanding), and FLUX-VAE latent tokens with flow matching (generation).

Facts from the official repository github.com/ByteDance-Seed/Bagel (our own code; parameter
names are kept identical so that the official `ema.safetensors` loads strictly):

- `modeling/bagel/qwen2_navit.py`: `Qwen2MoTDecoderLayer` / `PackedAttentionMoT`. Every layer has
  two experts: `q/k/v/o_proj`, `q_norm/k_norm` (QK RMSNorm over head_dim), `mlp`,
  `input_layernorm`, `post_attention_layernorm` for understanding tokens (text and ViT), and the
  same names with the suffix `_moe_gen` for generation tokens (VAE latents). Attention is shared:
  queries, keys and values of both streams attend together. q/k/v have biases, o_proj has none;
  the final norm is `norm` / `norm_moe_gen`. RoPE (Qwen2, rotate-half) is applied after QK-norm;
  keys/values are repeated per group for GQA.
- `modeling/bagel/siglip_navit.py`: `SiglipVisionModel.vision_model` with `embeddings`
  (`patch_embedding` converted to a Linear over (p, p, c)-ordered patches by
  `convert_conv2d_to_linear`, learned `position_embedding` when rope=False), `encoder.layers[i]`
  (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1/fc2`) and
  `post_layernorm`; attention stays within each image.
- `modeling/bagel/modeling_utils.py`: `TimestepEmbedder` (`mlp.0`, SiLU, `mlp.2`; 256 sinusoidal
  frequencies, cos first), `MLPconnector` (`fc1`, act, `fc2`), `PositionEmbedding` (a frozen
  2-D sin-cos table `pos_embed` of max_side**2 rows, stored in the checkpoint).
- `modeling/bagel/bagel.py`: `vae2llm` / `llm2vae` (Linear patch_latent_dim <-> hidden), latent
  tokens = vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos); ViT tokens =
  connector(vit(x)) + vit_pos_embed(pos); timesteps t = sigmoid(logit) shifted by
  shift * t / (1 + (shift - 1) * t); x_t = (1 - t) x_0 + t * noise; the velocity target is
  noise - x_0; CE on `lm_head` outputs at the loss positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm_training.models.bagel.autoencoder import FluxAutoEncoder
from glm_training.models.bagel.config import BagelConfig, LLMConfig, ViTConfig

if TYPE_CHECKING:
    from glm_training.models.bagel.packing import PackedBatch

COMPONENTS = ("und", "gen", "both")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, scale by `weight` in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2 default RoPE tables for 1-D `positions`: (N, head_dim) cos and sin."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, head_dim); cos/sin: (N, head_dim)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class ExpertRoute:
    """Splits the tokens of a sequence between the understanding and the generation expert."""

    def __init__(self, is_gen: torch.Tensor):
        self.is_gen = is_gen
        self.und_index = torch.nonzero(~is_gen).squeeze(1)
        self.gen_index = torch.nonzero(is_gen).squeeze(1)
        order = torch.cat([self.und_index, self.gen_index])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=order.device)

    def __call__(self, x: torch.Tensor, und: Callable[[torch.Tensor], torch.Tensor],
                 gen: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.gen_index.numel() == 0:
            return und(x)
        if self.und_index.numel() == 0:
            return gen(x)
        out = torch.cat([und(x[self.und_index]), gen(x[self.gen_index])])
        return out[self.inverse]


@dataclass
class AttentionLayout:
    """Who attends to whom in one LM forward.

    The sequence is split into independent samples (`sample_lens`); `sample_masks[i]` is a
    boolean (L_i, P + L_i) matrix, True where query row attends to key column, P being the
    number of cached context keys (only with a single sample, at inference).
    """

    sample_lens: list[int]
    sample_masks: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.sample_lens) != len(self.sample_masks):
            raise ValueError("AttentionLayout: one mask per sample is required.")
        for length, mask in zip(self.sample_lens, self.sample_masks):
            if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != length:
                raise ValueError(f"AttentionLayout: mask {tuple(mask.shape)} ({mask.dtype}) does not fit a "
                                 f"sample of {length} tokens; expected a bool ({length}, keys) matrix.")


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------
# The Mixture-of-Transformers Qwen2 language model


class MoTAttention(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.rope_theta = config.rope_theta
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, self.num_heads * head_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, self.num_kv_heads * head_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, self.num_kv_heads * head_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(self.num_heads * head_dim, hidden, bias=False))
            norm = (lambda: RMSNorm(head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
            setattr(self, f"q_norm{suffix}", norm())
            setattr(self, f"k_norm{suffix}", norm())

    def forward(self, x: torch.Tensor, route: ExpertRoute, cos: torch.Tensor, sin: torch.Tensor,
                layout: AttentionLayout, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n = x.shape[0]
        q = route(x, lambda t: self.q_norm(self.q_proj(t).view(-1, self.num_heads, self.head_dim)),
                  lambda t: self.q_norm_moe_gen(self.q_proj_moe_gen(t).view(-1, self.num_heads, self.head_dim)))
        k = route(x, lambda t: self.k_norm(self.k_proj(t).view(-1, self.num_kv_heads, self.head_dim)),
                  lambda t: self.k_norm_moe_gen(self.k_proj_moe_gen(t).view(-1, self.num_kv_heads, self.head_dim)))
        v = route(x, self.v_proj, self.v_proj_moe_gen).view(n, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        new_kv = (k, v)
        if past is not None:
            if len(layout.sample_lens) != 1:
                raise ValueError("Cached attention supports a single sample.")
            k = torch.cat([past[0], k])
            v = torch.cat([past[1], v])
        groups = self.num_heads // self.num_kv_heads
        outputs = []
        start = 0
        for length, mask in zip(layout.sample_lens, layout.sample_masks):
            rows = slice(start, start + length)
            keys = k if past is not None else k[rows]
            values = v if past is not None else v[rows]
            out = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],
                keys.repeat_interleave(groups, dim=1).transpose(0, 1)[None],
                values.repeat_interleave(groups, dim=1).transpose(0, 1)[None],
                attn_mask=mask[None, None].to(q.device))
            outputs.append(out[0].transpose(0, 1).reshape(length, self.num_heads * self.head_dim))
            start += length
        attn = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return route(attn, self.o_proj, self.o_proj_moe_gen), new_kv


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.mlp_moe_gen = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(config.hidden_size, config.rms_norm_eps))
            setattr(self, f"{name}_moe_gen", RMSNorm(config.hidden_size, config.rms_norm_eps))

    def forward(self, x: torch.Tensor, route: ExpertRoute, cos: torch.Tensor, sin: torch.Tensor,
                layout: AttentionLayout, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen)
        attn, kv = self.self_attn(h, route, cos, sin, layout, past)
        x = x + attn
        mlp = route(x, lambda t: self.mlp(self.post_attention_layernorm(t)),
                    lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + mlp, kv


class Qwen2MoTModel(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, is_gen: torch.Tensor,
                layout: AttentionLayout, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Packed forward. Returns the final hidden states and each layer's (key, value)."""
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"KV cache has {len(past)} layers, the model {len(self.layers)}.")
        route = ExpertRoute(is_gen)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        hidden = embeds
        cache: KVCache = []
        for index, layer in enumerate(self.layers):
            layer_past = past[index] if past is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, kv = checkpoint(layer, hidden, route, cos, sin, layout, layer_past, use_reentrant=False)
            else:
                hidden, kv = layer(hidden, route, cos, sin, layout, layer_past)
            cache.append(kv)
        return route(hidden, self.norm, self.norm_moe_gen), cache


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ----------------------------------------------------------------------------------------------
# SigLIP NaViT encoder


class SiglipAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (proj(x).view(n, self.num_heads, self.head_dim).transpose(0, 1)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        outputs = []
        start = 0
        for length in seqlens:  # full attention within each image only
            cols = slice(start, start + length)
            outputs.append(F.scaled_dot_product_attention(q[None, :, cols], k[None, :, cols], v[None, :, cols])[0])
            start += length
        out = torch.cat(outputs, dim=1).transpose(0, 1).reshape(n, -1)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_model_layers))


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        patch_dim = config.num_channels * config.patch_size ** 2
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches_per_side ** 2, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = self.embeddings(patches, position_ids)
        for layer in self.encoder.layers:
            x = layer(x, seqlens)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        return self.vision_model(patches, position_ids, seqlens)


# ----------------------------------------------------------------------------------------------
# Embedders


class MLPConnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    FREQUENCIES = 256

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @classmethod
    def sinusoidal(cls, t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        half = cls.FREQUENCIES // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t).to(self.mlp[0].weight.dtype))


def sincos_2d_table(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) table: row r*side+c is [emb_1d(c) | emb_1d(r)], emb_1d = [sin | cos]."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class PositionEmbedding(nn.Module):
    """A frozen 2-D sin-cos table indexed by flattened (row * max_side + col) positions."""

    def __init__(self, max_side: int, hidden: int):
        super().__init__()
        self.max_side = max_side
        self.pos_embed = nn.Parameter(sincos_2d_table(max_side, hidden), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


# ----------------------------------------------------------------------------------------------
# BAGEL


def token_weights(text_tokens: int, image_tokens: int, micro_batches: int = 1) -> tuple[float, float]:
    """The factors that turn a micro-batch's summed text CE and image MSE into its share of the
    per-token means over one optimizer step: `micro_batches` x processes / (the step's loss tokens,
    counted over every process). The trainer averages gradients over the accumulation window and
    DDP over processes, so after both every loss token weighs the same whichever micro-batch or
    rank it is in: the official recipe's normalisation. A collective when distributed (every rank
    calls it); on one process with one micro-batch, the plain per-token means."""
    import torch.distributed as dist

    counts, share = torch.tensor([float(text_tokens), float(image_tokens)], dtype=torch.float64), micro_batches
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            counts = counts.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(counts)
        share *= dist.get_world_size()
    text, image = counts.tolist()
    return share / max(text, 1.0), share / max(image, 1.0)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


class BagelModel(nn.Module):
    """BAGEL with its autoencoder (`vae`, saved apart as ae.safetensors, always frozen)."""

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.bagel_config = config
        hidden = config.hidden_size
        self.language_model = Qwen2MoTForCausalLM(config.llm)
        # generation side
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)
        # understanding side
        self.vit_model = SiglipVisionModel(config.vit)
        self.connector = MLPConnector(config.vit.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        # the autoencoder
        self.vae = FluxAutoEncoder(config.ae)
        self.vae.requires_grad_(False)

    # -- small helpers -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def enable_gradient_checkpointing(self) -> None:
        self.language_model.model.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.language_model.model.gradient_checkpointing = False

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(token_ids)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        features = self.vit_model(patches.to(self.dtype), position_ids, seqlens)
        return self.connector(features) + self.vit_pos_embed(position_ids).to(self.dtype)

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Generation tokens: vae2llm(x_t) + time_embedder(t) + latent_pos_embed(pos)."""
        return (self.vae2llm(x_t.to(self.dtype)) + self.time_embedder(t)
                + self.latent_pos_embed(position_ids).to(self.dtype))

    def patchify_latent(self, latent: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(C, >=h*p, >=w*p) latent -> (h*w, p*p*C) tokens, (p, q, c) ordered as the official code."""
        p, c = self.bagel_config.latent_patch_size, self.bagel_config.latent_channels
        latent = latent[:, :h * p, :w * p].reshape(c, h, p, w, p)
        return latent.permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)

    def unpatchify_latent(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.bagel_config.latent_patch_size, self.bagel_config.latent_channels
        latent = tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3)
        return latent.reshape(c, h * p, w * p)

    @torch.no_grad()
    def encode_image_latents(self, images: list[torch.Tensor], sample: bool = True,
                             generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Images (3, H, W) in [-1, 1] -> normalised VAE latents, one image at a time."""
        return [self.vae.encode(image[None].to(self.device), sample=sample, generator=generator)[0]
                for image in images]

    # -- training ------------------------------------------------------------------------------

    def forward(self, batch: PackedBatch, **kwargs) -> dict[str, torch.Tensor]:
        """`forward_losses`, so that DDP / accelerate wrappers route training through it."""
        return self.forward_losses(batch, **kwargs)

    def forward_losses(self, batch: PackedBatch, *, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None, text_loss_weight: float | None = None,
                       image_loss_weight: float | None = None) -> dict[str, torch.Tensor]:
        """Losses of a packed batch, normalised per token as the official training script does.

        text_ce: sum of token CE / number of CE tokens; image_mse: sum over generation tokens of the
        channel-mean squared error of the velocity / number of generation tokens. Per-sample sums and
        counts are returned too (for DPO / GRPO). `noise` (one row per VAE token of the pack) and
        `generator` make the flow side reproducible; with both loss weights given, `loss` is their
        weighted sum. `text_token_ce` holds each CE token's loss (its sample: `batch.ce_sample_ids`),
        i.e. minus the token log-probabilities.
        """
        device = self.device
        batch = batch.to(device)
        sequence = self.embed_packed_inputs(batch, generator=generator, noise=noise)
        hidden, _ = self.language_model.model(sequence.embeds, batch.packed_position_ids, sequence.is_gen,
                                              batch.attention_layout())
        zero = hidden.sum() * 0.0
        out: dict[str, torch.Tensor] = {}
        num_samples = len(batch.sample_lens)

        n_text = int(batch.ce_loss_indexes.numel())
        if n_text:
            logits = self.language_model.lm_head(hidden[batch.ce_loss_indexes])
            ce = F.cross_entropy(logits.float(), batch.packed_label_ids, reduction="none")
            out["text_ce"] = ce.sum() / n_text
            out["text_token_ce"] = ce
            out["text_ce_per_sample"] = torch.zeros(num_samples, device=device).index_add(0, batch.ce_sample_ids, ce)
        else:
            out["text_ce"] = zero
            out["text_token_ce"] = zero.reshape(1)[:0]
            out["text_ce_per_sample"] = torch.zeros(num_samples, device=device)
        out["text_tokens_per_sample"] = torch.bincount(batch.ce_sample_ids, minlength=num_samples)

        n_image = int(batch.mse_loss_indexes.numel())
        if n_image:
            prediction = self.llm2vae(hidden[batch.mse_loss_indexes]).float()
            target = (sequence.noise - sequence.clean_latents)[batch.vae_token_has_loss].float()
            mse = (prediction - target).pow(2).mean(dim=-1)
            out["image_mse"] = mse.sum() / n_image
            out["image_mse_per_sample"] = torch.zeros(num_samples, device=device).index_add(
                0, batch.mse_sample_ids, mse)
        else:
            out["image_mse"] = zero
            out["image_mse_per_sample"] = torch.zeros(num_samples, device=device)
        out["image_tokens_per_sample"] = torch.bincount(batch.mse_sample_ids, minlength=num_samples)
        out["n_text_tokens"] = torch.tensor(n_text, device=device)
        out["n_image_tokens"] = torch.tensor(n_image, device=device)
        if text_loss_weight is not None and image_loss_weight is not None:
            out["loss"] = text_loss_weight * out["text_ce"] + image_loss_weight * out["image_mse"]
        return out

    def embed_packed_inputs(self, batch: PackedBatch, *, generator: torch.Generator | None = None,
                            noise: torch.Tensor | None = None) -> PackedInputs:
        """Input embeddings of a packed batch: text, ViT and (noised) latent tokens in place."""
        config = self.bagel_config
        text = self.embed_text(batch.packed_text_ids)
        embeds = text.new_zeros(batch.sequence_length, config.hidden_size)
        embeds = embeds.index_copy(0, batch.packed_text_indexes, text)
        is_gen = torch.zeros(batch.sequence_length, dtype=torch.bool, device=embeds.device)
        clean = noise_used = None
        if batch.packed_vit_tokens is not None:
            vit = self.embed_vit(batch.packed_vit_tokens, batch.packed_vit_position_ids, batch.vit_token_seqlens)
            embeds = embeds.index_copy(0, batch.packed_vit_token_indexes, vit.to(embeds.dtype))
        if batch.vae_images:
            latents = self.encode_image_latents(batch.vae_images, generator=generator)
            clean = torch.cat([self.patchify_latent(latent, h, w)
                               for latent, (h, w) in zip(latents, batch.vae_latent_shapes)]).float()
            if noise is None:
                noise = torch.randn(clean.shape, generator=generator, device=clean.device)
            elif noise.shape != clean.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, "
                                 f"the pack's latent tokens {tuple(clean.shape)}.")
            noise_used = noise.to(clean.device, torch.float32)
            t = shift_timesteps(torch.sigmoid(batch.packed_timesteps.float()), config.timestep_shift)
            x_t = (1 - t[:, None]) * clean + t[:, None] * noise_used
            latent_embeds = self.embed_latents(x_t, t, batch.packed_latent_position_ids)
            embeds = embeds.index_copy(0, batch.packed_vae_token_indexes, latent_embeds.to(embeds.dtype))
            is_gen[batch.packed_vae_token_indexes] = True
        return PackedInputs(embeds=embeds, is_gen=is_gen, clean_latents=clean, noise=noise_used)

    # -- trainable parts -----------------------------------------------------------------------

    def component_parameters(self, component: str) -> dict[str, nn.Parameter]:
        """Parameters fully fine-tuned for `component`.

        und: the understanding expert of the LM (every LM tensor without `_moe_gen`, with the
        token embeddings and lm_head), the ViT and the connector. gen: every `_moe_gen` tensor,
        the timestep embedder, vae2llm and llm2vae. both: the union. The autoencoder and the
        sin-cos position tables are never trained.
        """
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}.")
        selected = {}
        for name, param in self.named_parameters():
            if name.startswith("vae.") or name.endswith("pos_embed") or "lora_" in name:
                continue
            is_gen_part = "_moe_gen" in name or name.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae")
            if component == "both" or (component == "gen") == is_gen_part:
                selected[name] = param
        return selected

    def set_trainable(self, component: str) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze `component_parameters(component)`; returns them."""
        self.requires_grad_(False)
        params = list(self.component_parameters(component).values())
        for param in params:
            param.requires_grad_(True)
        return params

    def trainable_parameters(self, component: str | None = None) -> list[nn.Parameter]:
        """With a component: its full fine-tuning parameters (made trainable). Without: what is
        trainable now (e.g. the LoRA weights after `add_adapter`)."""
        if component is not None:
            return self.set_trainable(component)
        return [p for p in self.parameters() if p.requires_grad]

    # -- LoRA (peft), the API the family interface uses ------------------------------------------

    def add_adapter(self, lora_config, adapter_name: str = "default") -> None:
        from glm_training.models.bagel.lora import add_lora

        add_lora(self, lora_config, adapter_name)

    def disable_adapters(self) -> None:
        from glm_training.models.bagel.lora import set_adapters_enabled

        set_adapters_enabled(self, False)

    def enable_adapters(self) -> None:
        from glm_training.models.bagel.lora import set_adapters_enabled

        set_adapters_enabled(self, True)


@dataclass
class PackedInputs:
    embeds: torch.Tensor
    is_gen: torch.Tensor
    clean_latents: torch.Tensor | None
    noise: torch.Tensor | None
