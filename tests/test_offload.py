"""models/offload.BlockSwap bookkeeping on CPU (device == offload device == cpu): forward and
backward through a swapped stack equal the resident one bitwise, swapped blocks point at their
offload copies outside their own forward/backward (the bookkeeping; on one device no bytes move),
LoRA weights never move; model.block_swap is
a logged no-op without CUDA; frozen-encoder placement keys."""

from __future__ import annotations

import logging

import pytest
import torch

from glm_training.config import ConfigError, config_from_dict
from glm_training.models.base import build_family
from glm_training.models.offload import BlockSwap


def lora_transformer(checkpointing: bool):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from glm_training.models.tiny import ensure_tiny

    model = FluxTransformer2DModel.from_pretrained(ensure_tiny("flux_kontext"), subfolder="transformer")
    model.requires_grad_(False)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B: every LoRA weight gets a gradient
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def step(model):
    generator = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, model.config.in_channels, generator=generator),
                  encoder_hidden_states=torch.randn(1, 8, model.config.joint_attention_dim, generator=generator),
                  pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=generator),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                  guidance=torch.tensor([1.0]) if model.config.guidance_embeds else None, return_dict=False)
    out = model(**inputs)[0]
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapped_stack_equals_the_resident_one_bitwise(checkpointing):
    resident = lora_transformer(checkpointing)
    swapped = lora_transformer(checkpointing)
    blocks = list(swapped.transformer_blocks) + list(swapped.single_transformer_blocks)
    swap = BlockSwap(swapped, blocks, len(blocks) - 1, "cpu")
    lora_before = {n: p.data_ptr() for n, p in swapped.named_parameters() if p.requires_grad}
    expected_out, expected_grads = step(resident)
    out, grads = step(swapped)
    assert torch.equal(out, expected_out)
    assert grads.keys() == expected_grads.keys() and all(torch.equal(grads[k], expected_grads[k]) for k in grads)
    # Each swapped block was copied in for its forward and again for its backward (or recompute).
    assert swap.transfers >= 2 * len(swap.swapped)
    # Outside their pass, swapped blocks are out again (the first swapped one stays in until the next pass).
    assert len(swap.resident) <= 1 and not swap.in_backward - swap.resident
    # LoRA weights are never swapped; DDP ignores the swapped frozen tensors; accelerate leaves the root in place.
    assert {n: p.data_ptr() for n, p in swapped.named_parameters() if p.requires_grad} == lora_before
    ignored = set(swapped._ddp_params_and_buffers_to_ignore)
    assert ignored and not any("lora_" in n for n in ignored)
    assert "single_transformer_blocks.0.attn.to_q.base_layer.weight" in ignored
    assert len(swapped.hf_device_map) > 1
    # A second step (a new root forward) gives the same again.
    out2, grads2 = step(swapped)
    assert torch.equal(out2, expected_out) and all(torch.equal(grads2[k], expected_grads[k]) for k in grads)


def flux(tmp_path, **model):
    return {"model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext", **model},
            "data": {"path": str(tmp_path), "resolution": 32}}


def test_block_swap_without_cuda_is_a_logged_no_op_and_checks_its_count(tmp_path, caplog):
    family = build_family(config_from_dict(flux(tmp_path, block_swap=2)))
    with caplog.at_level(logging.WARNING):
        family.setup_training()
    assert "model.block_swap: 2 ignored" in caplog.text
    assert not hasattr(family, "block_swapper")
    # On a GPU the count is checked against the blocks (2 must stay in: the computing and the prefetched one).
    family.device = torch.device("cuda")
    with pytest.raises(ConfigError, match=r"model.block_swap: 2, but transformer has 2 blocks; swap at most 0"):
        family.setup_block_swap()
    raw = flux(tmp_path, block_swap=1)
    raw["lora"] = {"enabled": False}
    with pytest.raises(ConfigError, match="model.block_swap: .*Use LoRA"):
        config_from_dict(raw)


def test_sdxl_unet_has_no_block_list_to_swap(tmp_path):
    raw = {"model": {"pretrained_model_name_or_path": "tiny:sdxl", "block_swap": 1},
           "data": {"path": str(tmp_path), "resolution": 32}}
    family = build_family(config_from_dict(raw))
    with pytest.raises(ConfigError, match="model.block_swap: unet of sdxl has no transformer block list"):
        family.setup_training()


def test_frozen_encoders_go_to_their_device_and_outputs_come_back(tmp_path):
    """text_encoder_device / vae_device: the modules sit there, and an align-devices hook returns
    outputs on the caller's device (cpu -> cpu here; the same path moves cuda:0 <-> cuda:1)."""
    family = build_family(config_from_dict(flux(tmp_path, text_encoder_device="cpu", vae_device="cpu")))
    family._load_text_encoders()
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert next(family.modules[name].parameters()).device == torch.device("cpu")
    cfg = config_from_dict(flux(tmp_path, text_encoder_device="cuda:1"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.text_encoder_device: cuda:1 asked for, but no CUDA"):
            build_family(cfg)._load_text_encoders()
