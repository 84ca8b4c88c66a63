"""BAGEL training and sampling on the tiny model: SFT, loss weights, components, LoRA, generation."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from glm_training.models.bagel.generate import BagelSampler
from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer, merge_lora
from glm_training.models.bagel.lora import load_lora, lora_target_modules, make_lora_config, save_lora
from glm_training.models.bagel.packing import (
    BagelSample,
    PackingConfig,
    TextItem,
    VaeImageItem,
    VitImageItem,
    pack_samples,
)
from glm_training.models.bagel.tiny import build_tiny_bagel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer_and_special(tiny_dir):
    return load_bagel_tokenizer(tiny_dir)


def gradient_image(seed: int, size: int = 16) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(3, 4, 4, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((size, size), Image.BILINEAR)


def packing_for(model) -> PackingConfig:
    return PackingConfig.for_model(model.bagel_config, vae_max_size=16, vae_min_size=16,
                                   vit_max_size=16, vit_min_size=16).without_dropout()


def training_samples() -> list[BagelSample]:
    source, target = gradient_image(1), gradient_image(2)
    return [
        BagelSample([VitImageItem(source), TextItem("what is in the picture?"),
                     TextItem("the cat sat on the mat", loss=True)]),
        BagelSample([TextItem("a red and blue pattern", cfg=True), VaeImageItem(target, loss=True)]),
        BagelSample([VaeImageItem(source, cfg=True), VitImageItem(source, cfg=True),
                     TextItem("turn it into the other one", cfg=True), VaeImageItem(target, loss=True)]),
    ]


def make_batch(model, tokenizer, special, seed: int):
    return pack_samples(training_samples(), tokenizer, special, model.bagel_config, packing_for(model),
                        rng=random.Random(seed))


def evaluate(model, batch) -> dict[str, float]:
    with torch.no_grad():
        out = model.forward_losses(batch, generator=torch.Generator().manual_seed(123))
    return {"text_ce": out["text_ce"].item(), "image_mse": out["image_mse"].item()}


def train(model, tokenizer, special, params, steps: int, lr: float, text_w: float = 1.0, image_w: float = 1.0):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = make_batch(model, tokenizer, special, seed=step)
        out = model.forward_losses(batch, generator=torch.Generator().manual_seed(step),
                                   text_loss_weight=text_w, image_loss_weight=image_w)
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()


def test_sft_full_finetune_lowers_both_losses(tiny_dir, tokenizer_and_special) -> None:
    tokenizer, special = tokenizer_and_special
    model = load_bagel(tiny_dir)
    eval_batch = make_batch(model, tokenizer, special, seed=999)
    assert eval_batch.n_text_tokens > 0 and eval_batch.n_image_tokens > 0
    before = evaluate(model, eval_batch)
    params = model.set_trainable("both")
    train(model, tokenizer, special, params, steps=20, lr=3e-3)
    after = evaluate(model, eval_batch)
    assert after["text_ce"] < 0.6 * before["text_ce"], (before, after)
    assert after["image_mse"] < 0.8 * before["image_mse"], (before, after)
    # Training and cached decoding agree (positions, masks, experts): the answer is reproduced.
    sampler = BagelSampler(model, tokenizer, special, packing_for(model))
    assert sampler.generate_text("what is in the picture?", [gradient_image(1)], max_new_tokens=12) == \
        "the cat sat on the mat"


def test_loss_weights_act_as_configured(tiny_dir, tokenizer_and_special) -> None:
    tokenizer, special = tokenizer_and_special
    model = load_bagel(tiny_dir)
    model.set_trainable("both")
    batch = make_batch(model, tokenizer, special, seed=0)

    def grads(text_w: float, image_w: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model.forward_losses(batch, generator=torch.Generator().manual_seed(0),
                                   text_loss_weight=text_w, image_loss_weight=image_w)
        assert torch.allclose(out["loss"], text_w * out["text_ce"] + image_w * out["image_mse"])
        out["loss"].backward()
        return ({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in model.named_parameters() if p.requires_grad}, out)

    text_only, out = grads(1.0, 0.0)
    text_double, _ = grads(2.0, 0.0)
    image_only, _ = grads(0.0, 1.0)
    image_half, _ = grads(0.0, 0.5)
    mixed, _ = grads(0.3, 0.7)
    assert text_only["language_model.lm_head.weight"].abs().sum() > 0
    assert text_only["llm2vae.weight"].abs().sum() == 0          # no image term, no image gradient
    assert image_only["language_model.lm_head.weight"].abs().sum() == 0
    assert image_only["llm2vae.weight"].abs().sum() > 0
    for name in text_only:
        assert torch.allclose(text_double[name], 2 * text_only[name], atol=1e-6), name
        assert torch.allclose(image_half[name], 0.5 * image_only[name], atol=1e-6), name
        assert torch.allclose(mixed[name], 0.3 * text_only[name] + 0.7 * image_only[name], atol=1e-5), name
    # Token-count normalisation: per-sample sums add up to the normalised totals.
    assert torch.isclose(out["text_ce_per_sample"].sum() / out["n_text_tokens"], out["text_ce"])
    assert torch.isclose(out["image_mse_per_sample"].sum() / out["n_image_tokens"], out["image_mse"])
    assert out["image_tokens_per_sample"].tolist() == [0, 16, 16]


def test_components_select_the_experts(tiny_dir) -> None:
    model = load_bagel(tiny_dir)
    und = set(model.component_parameters("und"))
    gen = set(model.component_parameters("gen"))
    both = set(model.component_parameters("both"))
    assert und.isdisjoint(gen) and both == und | gen
    assert not any("_moe_gen" in n for n in und)
    assert {"language_model.lm_head.weight", "connector.fc1.weight",
            "vit_model.vision_model.post_layernorm.weight"} <= und
    assert {"vae2llm.weight", "llm2vae.bias", "time_embedder.mlp.0.weight",
            "language_model.model.norm_moe_gen.weight"} <= gen
    assert not any(n.startswith("vae.") or n.endswith("pos_embed") for n in both)
    model.set_trainable("gen")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == gen

    names = [n for n, _ in model.named_modules()]
    for component, count in (("und", 14), ("gen", 14), ("both", 28)):
        matched = [n for n in names if re.fullmatch(lora_target_modules(component), n)]
        assert len(matched) == count, component
        assert all(("_moe_gen" in n) == (component == "gen") for n in matched) or component == "both"


def test_gradient_checkpointing_matches(tiny_dir, tokenizer_and_special) -> None:
    tokenizer, special = tokenizer_and_special
    model = load_bagel(tiny_dir)
    params = model.set_trainable("both")
    model.train()
    batch = make_batch(model, tokenizer, special, seed=0)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        out = model.forward_losses(batch, generator=torch.Generator().manual_seed(5),
                                   text_loss_weight=1.0, image_loss_weight=1.0)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in params]))
    assert torch.equal(results[0][0], results[1][0])
    for first, second in zip(results[0][1], results[1][1]):
        assert torch.allclose(first, second, atol=1e-6)


def test_lora_sft_then_generation(tiny_dir, tokenizer_and_special, tmp_path) -> None:
    tokenizer, special = tokenizer_and_special
    model = load_bagel(tiny_dir)
    packing = packing_for(model)
    edit_input = gradient_image(1)
    settings = dict(num_timesteps=4, seed=7, output_type="pt")

    def outputs(m) -> tuple[torch.Tensor, torch.Tensor]:
        sampler = BagelSampler(m, tokenizer, special, packing)
        return (sampler.generate("a red and blue pattern", height=16, width=16, **settings),
                sampler.generate("turn it into the other one", edit_input, **settings))

    base_t2i, base_edit = outputs(model)
    assert base_t2i.shape == (3, 16, 16) and base_edit.shape == (3, 16, 16)
    assert torch.equal(outputs(model)[0], base_t2i)  # fixed seed, deterministic

    eval_batch = make_batch(model, tokenizer, special, seed=999)
    before = evaluate(model, eval_batch)
    torch.manual_seed(0)  # LoRA A init
    model.add_adapter(make_lora_config("both", rank=4, alpha=8.0))
    params = model.trainable_parameters()
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    train(model, tokenizer, special, params, steps=15, lr=1e-2)
    after = evaluate(model, eval_batch)
    assert after["text_ce"] < 0.9 * before["text_ce"], (before, after)
    assert after["image_mse"] < 0.8 * before["image_mse"], (before, after)
    trained_t2i, trained_edit = outputs(model)
    files = save_lora(model, tmp_path / "adapter")
    assert {f.name for f in files} == {"adapter_model.safetensors", "adapter_config.json"}

    model.disable_adapters()
    assert torch.allclose(outputs(model)[0], base_t2i, atol=1e-6)
    model.enable_adapters()

    fresh = load_bagel(tiny_dir)
    load_lora(fresh, tmp_path / "adapter")
    loaded_t2i, loaded_edit = outputs(fresh)
    assert torch.allclose(loaded_t2i, trained_t2i, atol=1e-5)
    assert torch.allclose(loaded_edit, trained_edit, atol=1e-5)
    assert (loaded_t2i - base_t2i).abs().max() > 1e-3     # the adapter changes the image
    assert (loaded_edit - base_edit).abs().max() > 1e-3

    pil = BagelSampler(fresh, tokenizer, special, packing).generate("a red and blue pattern", height=16, width=16,
                                                                    num_timesteps=4, seed=7)
    assert isinstance(pil, Image.Image) and pil.size == (16, 16)
    merged = merge_lora(fresh)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(outputs(merged)[0], loaded_t2i, atol=1e-4)


def test_load_lora_rejects_a_mismatched_adapter(tiny_dir, tmp_path) -> None:
    model = load_bagel(tiny_dir)
    model.add_adapter(make_lora_config("gen", rank=2))
    save_lora(model, tmp_path / "gen")
    other = load_bagel(tiny_dir)
    other.add_adapter(make_lora_config("und", rank=2))
    with pytest.raises(ValueError, match="does not fit the model's LoRA layers"):
        load_lora(other, tmp_path / "gen")
