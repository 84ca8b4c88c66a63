"""models/offload.BlockSwap bookkeeping on CPU (device == offload device == cpu): forward and
backward through a swapped stack equal the resident one bitwise, swapped blocks point at their
offload copies outside their own forward/backward (the bookkeeping; on one device no bytes move),
LoRA weights never move; model.block_swap is
a logged no-op without CUDA; frozen-encoder placement keys. With real copies (the GPU's path on
one device): LoRA over a torchao int8 / fp8 base trains as without swap, and with 8-bit AdamW."""

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


# -- block swap with a quantized base and with 8-bit AdamW -----------------------------------------


def flux_lora_family(tmp_path, data, quantize=None, optimizer="adamw", rank=4):
    """The tiny FLUX family set up for LoRA (over a `quantize`d base) -> (family, cfg, batch draws)."""
    from glm_training.data.datasets import collate
    from glm_training.trainers.sft import build_diffusion_data

    raw = {"model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext",
                     **({"quantize": quantize} if quantize else {})},
           "data": {"path": str(data), "resolution": 32},
           "training": {"batch_size": 2, "seed": 0, "learning_rate": 1e-2},
           "optimizer": {"name": optimizer}, "lora": {"rank": rank, "alpha": rank},
           "logging": {"output_dir": str(tmp_path / "output"), "report_to": []}}
    cfg = config_from_dict(raw)
    family = build_family(cfg)  # may build the tiny model first, which draws from the global RNG
    torch.manual_seed(0)  # the LoRA's initial weights
    family.setup_training()
    dataset, encoder = build_diffusion_data(cfg, family)
    with torch.no_grad():
        latents, condition = encoder(collate([dataset[i] for i in range(2)]), 0)
    generator = torch.Generator().manual_seed(0)
    draws = [(torch.randn(latents.shape, generator=generator),
              family.objective.sample_timesteps(len(latents), latents, generator)) for _ in range(3)]
    return family, cfg, (latents, condition, draws)


def lora_steps(family, cfg, data, steps=6):
    """`steps` optimizer steps of the configured optimizer -> (held-out loss before, after, LoRA weights)."""
    from conftest import fit_fixed_draws
    from glm_training.trainers.optim import build_optimizer

    latents, condition, draws = data
    module = family.unwrapped("transformer")
    optimizer = build_optimizer(cfg, {"transformer": [p for p in module.parameters() if p.requires_grad]})

    before, after = fit_fixed_draws(family, latents, condition, draws, optimizer, steps)
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return before, after, lora, optimizer


def swap_every_block(family):
    """Every transformer block swapped, with real copies (the path a GPU takes, on one device)."""
    blocks = family.transformer_blocks("transformer")
    return BlockSwap(family.unwrapped("transformer"), blocks, len(blocks), "cpu", copy_on_same_device=True)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_block_swap_over_a_quantized_base_trains_as_the_resident_one(tmp_path, shapes_data, kind):
    """LoRA over a torchao int8 / fp8 base: the swapped blocks' quantized weights move as their own
    subclass (qdata + scale copied), the loss falls, and the LoRA equals the resident run's: the
    copies hold the same bytes, so the tolerance is float32 rounding (measured: bitwise equal)."""
    from torchao.utils import TorchAOBaseTensor

    resident, cfg, data = flux_lora_family(tmp_path / "resident", shapes_data, kind)
    expected_before, expected_after, expected, _ = lora_steps(resident, cfg, data)
    family, cfg, data = flux_lora_family(tmp_path / "swapped", shapes_data, kind)
    block = family.unwrapped("transformer").transformer_blocks[0]
    weight = block.attn.to_q.base_layer.weight
    loaded = weight.qdata.data_ptr()
    swap = swap_every_block(family)
    host = next(h for t, h in swap.tensors[swap.swapped[0]] if t is weight)
    assert isinstance(weight, TorchAOBaseTensor) and type(host) is type(weight)
    # Swapped out, the weight's own int8 data is its offload copy; in its forward, another copy.
    assert host.qdata.data_ptr() == weight.qdata.data_ptr() != loaded
    in_forward = []
    block.register_forward_pre_hook(lambda *_: in_forward.append(weight.qdata.data_ptr()))
    before, after, lora, _ = lora_steps(family, cfg, data)
    assert after < before and before == pytest.approx(expected_before, rel=1e-6)
    assert swap.transfers >= 2 * len(swap.swapped) * 6  # forward and backward of every step
    assert in_forward and host.qdata.data_ptr() not in in_forward
    assert lora.keys() == expected.keys()
    for name in lora:
        torch.testing.assert_close(lora[name], expected[name], rtol=1e-5, atol=1e-6)
    assert after == pytest.approx(expected_after, rel=1e-5)
    # Between passes the swapped weights point at their offload copies again.
    from glm_training.models.offload import _plain_tensors

    def storages(tensor):
        return [inner.data_ptr() for inner in _plain_tensors(tensor)]

    out = [b for b in swap.swapped if b not in swap.resident]
    assert out and all(storages(t) == storages(h) for b in out for t, h in swap.tensors[b])


def test_block_swap_with_8bit_adamw_on_cpu(tmp_path, shapes_data):
    """optimizer.name: adamw8bit runs on CPU (torchao's AdamW8bit, eager step) with block swap over
    an int8 base: 8-bit moments for the LoRA matrices of >= 4096 elements, the loss falls, and the
    LoRA stays close to fp32 AdamW's (measured after 6 steps at lr 1e-2: max |diff| 5.1e-3 on weights
    that moved by up to 5.9e-2; the bound is 1e-2)."""
    from torchao.optim.subclass_8bit import OptimState8bit

    family, cfg, data = flux_lora_family(tmp_path / "8bit", shapes_data, "int8", optimizer="adamw8bit", rank=128)
    swap = swap_every_block(family)
    initial = {n: p.detach().clone() for n, p in family.unwrapped("transformer").named_parameters() if p.requires_grad}
    before, after, lora, optimizer = lora_steps(family, cfg, data)
    assert type(optimizer).__name__ == "TorchaoAdamW8bit"
    states = [state["exp_avg"] for state in optimizer.state.values()]
    assert any(isinstance(s, OptimState8bit) for s in states)
    assert after < before and swap.transfers > 0
    assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)  # schedulers / logs
    reference, cfg, data = flux_lora_family(tmp_path / "fp32", shapes_data, "int8", rank=128)
    _, _, expected, _ = lora_steps(reference, cfg, data)
    moved = max((expected[n] - initial[n]).abs().max().item() for n in expected)
    gap = max((lora[n] - expected[n]).abs().max().item() for n in expected)
    print(f"8-bit vs fp32 AdamW: max |LoRA diff| {gap:.2e}, max LoRA change {moved:.2e}")
    assert gap < 1e-2 < moved


def test_8bit_adamw_trains_and_resumes_exactly_through_the_trainer(tmp_path, shapes_data):
    """optimizer.name: adamw8bit in the trainer on CPU: the schedulers and logs keep float lrs, the
    8-bit moments go through accelerate's checkpoint and come back as 8-bit state, and a run
    stopped at step 2 and resumed ends with the uninterrupted run's LoRA (bitwise)."""
    from torchao.optim.subclass_8bit import OptimState8bit

    from conftest import sdxl_config, train_sft

    def raw(out):
        config = sdxl_config(out, shapes_data, optimizer={"name": "adamw8bit"}, lora={"rank": 128, "alpha": 128})
        config["training"].update(max_train_steps=3, checkpointing_steps=1)
        return config

    full = train_sft(raw(tmp_path / "full"))
    train_sft(raw(tmp_path / "part"), stop_at=2)
    again = raw(tmp_path / "part")
    again["training"]["resume_from_checkpoint"] = "latest"
    resumed = train_sft(again)
    assert resumed.global_step == 3
    assert any(isinstance(v, OptimState8bit) for state in resumed.optimizer.state.values() for v in state.values())
    expected = {n: p for n, p in full.family.unwrapped("unet").named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.family.unwrapped("unet").named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
