"""Saved LoRAs load at the trained scale and under keys other tools map, for every family.

Every LoRA here has rank 4 and alpha 1 (scale 1/4): a loader that falls back to alpha = rank
(diffusers' `load_lora_adapter` without the file's metadata) loads 4x the trained change.
The change a loaded layer applies is measured by its output on the identity matrix minus its base
layer's, and compared with (alpha / rank) * B @ A of the trained tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glm_training.config import ConfigError, config_from_dict
from glm_training.models.base import build_family

RANK, ALPHA = 4, 1.0

# -- ComfyUI's key mapping rules, as facts (comfy/lora.py, comfy/utils.py) ----------------------
# CLIP (model_lora_keys_clip): per encoder layer i, LORA_CLIP_MAP; SDXL's first encoder (clip_l)
# is `lora_te1_`, the second (clip_g) `lora_te2_`, both with the `text_model_` level; its diffusers
# form is `text_encoder(_2).text_model.encoder.layers.<i>.<module>`.
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
COMFY_CLIP_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# SDXL UNet (model_lora_keys_unet via unet_to_diffusers): `lora_unet_` + the diffusers module
# path with '.' -> '_'; inside each attention, these transformer-block modules and proj_in/proj_out.
COMFY_UNET_ATTENTION = re.compile(
    r"(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0|up_blocks\.\d+\.attentions\.\d+)\."
    r"(transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
    r"|proj_in|proj_out)")
# FLUX (flux_to_diffusers; keys `lora_transformer_<path_>` or `transformer.<path>`).
COMFY_FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "norm1.linear",
                     "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")
COMFY_FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
# Qwen-Image: ComfyUI's own module names are diffusers' (`lora_unet_<path_>` generic rule, or
# `transformer.<path>`); per block:
COMFY_QWEN_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                    "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1")


def comfy_key_map(family) -> dict[str, tuple[str, str]]:
    """kohya/ComfyUI key -> (component, module path as the family's module names it)."""
    keys: dict[str, tuple[str, str]] = {}
    if family.name == "sdxl":
        for component, prefix in COMFY_CLIP_PREFIX.items():
            encoder = family.unwrapped(component)
            level = "text_model." if hasattr(encoder, "text_model") else ""  # transformers 5 flattened CLIPTextModel
            for i in range(encoder.config.num_hidden_layers):
                for module, kohya in COMFY_CLIP_MAP.items():
                    keys[f"{prefix}_text_model_encoder_layers_{i}_{kohya}"] = (component,
                                                                                f"{level}encoder.layers.{i}.{module}")
        for path, _ in family.unwrapped("unet").named_modules():
            if COMFY_UNET_ATTENTION.fullmatch(path):
                keys["lora_unet_" + path.replace(".", "_")] = ("unet", path)
    elif family.name == "flux_kontext":
        config = family.unwrapped("transformer").config
        for blocks, count, modules in (("transformer_blocks", config.num_layers, COMFY_FLUX_DOUBLE),
                                       ("single_transformer_blocks", config.num_single_layers, COMFY_FLUX_SINGLE)):
            for i in range(count):
                for module in modules:
                    path = f"{blocks}.{i}.{module}"
                    keys["lora_transformer_" + path.replace(".", "_")] = ("transformer", path)
                    keys["transformer." + path] = ("transformer", path)
    else:
        for i in range(family.unwrapped("transformer").config.num_layers):
            for module in COMFY_QWEN_BLOCK:
                path = f"transformer_blocks.{i}.{module}"
                keys["lora_unet_" + path.replace(".", "_")] = ("transformer", path)
                keys["transformer." + path] = ("transformer", path)
    return keys


# -- building, perturbing and measuring LoRAs -------------------------------------------------------


def config(tmp_path: Path, data: Path, family: str, model: dict | None = None, **lora) -> dict:
    return {
        "model": {"family": family, "pretrained_model_name_or_path": f"tiny:{family}", **(model or {})},
        "data": {"path": str(data), "resolution": 32},
        "training": {"max_train_steps": 1, "batch_size": 1, "seed": 0},
        "lora": {"rank": RANK, "alpha": ALPHA, **lora},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "lora", "report_to": []},
    }


def lora_layers(module: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for path, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and layer.lora_A:
            yield path, layer


def trained_change(family) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module path) -> (alpha / rank) * B @ A of the family's LoRA tensors."""
    out = {}
    for name in family.trained:
        for path, layer in lora_layers(family.unwrapped(name)):
            a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            out[(name, path)] = (ALPHA / RANK) * (b.double() @ a.double())
    return out


@torch.no_grad()
def applied_change(modules: dict[str, torch.nn.Module]) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module path) -> the weight change each LoRA layer applies: its output on the
    identity minus its base layer's (transposed back to the weight's layout)."""
    out = {}
    for name, module in modules.items():
        for path, layer in lora_layers(module):
            base = layer.get_base_layer()
            eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
            out[(name, path)] = (layer(eye) - base(eye)).double().T
    return out


def assert_same_change(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:3], sorted(set(got) - set(expected))[:3])
    for key, change in expected.items():
        torch.testing.assert_close(got[key], change, atol=1e-6, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def perturbed(family):
    """LoRA B weights set to random values (B starts at zero), so every delta is non-zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in family.trained:
            for _, layer in lora_layers(family.unwrapped(name)):
                b = layer.lora_B["default"].weight
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
    return family


def trained(tmp_path: Path, raw: dict):
    family = build_family(config_from_dict(raw))
    family.setup_training()
    perturbed(family)
    final = tmp_path / "final"
    family.save_adapter(final)
    return family, final


PIPELINE_FAMILIES = {
    "sdxl": {"train_text_encoder": True},  # UNet + both CLIP text encoders
    "flux_kontext": {},
    "qwen_image": {},
}


@pytest.fixture(scope="module", params=sorted(PIPELINE_FAMILIES))
def pipeline_run(request, tmp_path_factory, shapes_data):
    tmp = tmp_path_factory.mktemp(request.param)
    raw = config(tmp, shapes_data, request.param, PIPELINE_FAMILIES[request.param], save_format="both")
    family, final = trained(tmp, raw)
    return raw, family, final


def test_pipeline_load_lora_weights_applies_alpha_over_rank(pipeline_run):
    """Both files (diffusers and kohya/ComfyUI) through the pipeline's own `load_lora_weights`."""
    _, family, final = pipeline_run
    expected = trained_change(family)
    assert len({name for name, _ in expected}) == len(family.trained)
    for folder in (final, final / "comfyui"):
        pipe = family.pipeline_class.from_pretrained(family.model_path)
        pipe.load_lora_weights(folder)
        assert_same_change(applied_change({name: getattr(pipe, name) for name in family.trained}), expected)


def test_comfyui_keys_map_to_every_trained_module_at_alpha_over_rank(pipeline_run):
    """Each kohya key maps by ComfyUI's rules, no trained module is left out, and ComfyUI's scale
    (`.alpha` / lora_down rows) gives the trained change."""
    _, family, final = pipeline_run
    key_map = comfy_key_map(family)
    state = load_file(str(final / "comfyui" / "pytorch_lora_weights.safetensors"))
    bases = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    unmapped = sorted(bases - set(key_map))
    assert not unmapped, f"ComfyUI would drop {len(unmapped)} of {len(bases)} modules, e.g. {unmapped[:3]}"
    comfy_change = {}
    for base in bases:
        down, up = state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"]
        assert f"{base}.alpha" in state and down.shape[0] == RANK
        comfy_change[key_map[base]] = state[f"{base}.alpha"].item() / down.shape[0] * (up.double() @ down.double())
    assert_same_change(comfy_change, trained_change(family))


def test_diffusers_file_keys_map_in_comfyui(pipeline_run):
    """ComfyUI also reads the diffusers file: text-encoder keys need the `text_model.` level,
    FLUX / Qwen transformer keys are `transformer.<module path>`."""
    _, family, final = pipeline_run
    state = load_file(str(final / "pytorch_lora_weights.safetensors"))
    bases = {re.sub(r"\.(lora_linear_layer\.(up|down)|lora\.(up|down)|lora_[AB])\.weight$", "", key)
             for key in state}
    if family.name == "sdxl":
        expected = {f"{component}.text_model.encoder.layers.{i}.{module}"
                    for component in COMFY_CLIP_PREFIX
                    for i in range(family.unwrapped(component).config.num_hidden_layers)
                    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")}
        assert {b for b in bases if b.startswith("text_encoder")} == expected
    else:
        key_map = comfy_key_map(family)
        assert bases and bases <= set(key_map), sorted(bases - set(key_map))[:3]
        assert {key_map[b] for b in bases} == set(trained_change(family))


def test_pretrained_weight_restarts_at_the_same_change(pipeline_run):
    raw, family, final = pipeline_run
    restarted = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "pretrained_weight": str(final)}}))
    restarted.setup_training()
    modules = {name: restarted.unwrapped(name) for name in restarted.trained}
    assert_same_change(applied_change(modules), trained_change(family))


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, shapes_data):
    """SDXL with text-encoder LoRA: the checks of the shared diffusers-file loader and of the
    text-encoder key names need only this family."""
    tmp = tmp_path_factory.mktemp("sdxl_only")
    raw = config(tmp, shapes_data, "sdxl", PIPELINE_FAMILIES["sdxl"], save_format="both")
    family, final = trained(tmp, raw)
    return raw, family, final


def test_pretrained_weight_with_another_alpha_is_refused(sdxl_run):
    raw, _, final = sdxl_run
    other = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "alpha": 8.0,
                                                             "pretrained_weight": str(final)}}))
    with pytest.raises(ConfigError, match=r"lora_alpha 1, .* set lora.alpha .*to 1"):
        other.setup_training()


def test_pretrained_weight_reads_files_written_without_the_text_model_level(sdxl_run, tmp_path):
    """Files from before the canonical names (`text_encoder.encoder.layers...`) still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    raw, family, final = sdxl_run
    source = final / "pytorch_lora_weights.safetensors"
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    old = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(str(source)).items()}
    assert any(k.startswith("text_encoder.encoder.") for k in old)
    save_file(old, str(tmp_path / "pytorch_lora_weights.safetensors"), metadata=metadata)
    restarted = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "pretrained_weight": str(tmp_path)}}))
    restarted.setup_training()
    modules = {name: restarted.unwrapped(name) for name in restarted.trained}
    assert_same_change(applied_change(modules), trained_change(family))


# -- GLM-Image: DiT LoRA (diffusers layout) and AR adapter (peft) ------------------------------------


@pytest.fixture(scope="module")
def glm_run(tmp_path_factory, shapes_data):
    tmp = tmp_path_factory.mktemp("glm")
    raw = config(tmp, shapes_data, "glm_image", {"component": "both"})
    family, final = trained(tmp, raw)
    return raw, family, final


def test_glm_image_loader_applies_alpha_over_rank_to_dit_and_ar(glm_run):
    from glm_training.models.glm_image import load_glm_image_lora
    from glm_training.models.glm_image_support import FixedGlmImagePipeline

    _, family, final = glm_run
    pipe = FixedGlmImagePipeline.from_pretrained(family.model_path)
    assert load_glm_image_lora(pipe, final) == ["dit", "ar"]
    got = applied_change({"dit": pipe.transformer, "ar": pipe.vision_language_encoder})
    assert_same_change(got, trained_change(family))


def test_glm_image_pretrained_weights_keep_the_scale(glm_run, tmp_path):
    """`lora.pretrained_weight` (both trained) and `lora.components.<frozen>.pretrained_weight`."""
    raw, family, final = glm_run
    expected = trained_change(family)
    restarted = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "pretrained_weight": str(final)}}))
    restarted.setup_training()
    assert_same_change(applied_change({n: restarted.unwrapped(n) for n in ("dit", "ar")}), expected)

    # A DiT run on the tuned AR, and an AR run on the tuned DiT: the frozen part carries the LoRA.
    for trained_part, frozen in (("dit", "ar"), ("ar", "dit")):
        frozen_weight = str(final / "ar_adapter") if frozen == "ar" else str(final)
        run = build_family(config_from_dict({**raw, "model": {**raw["model"], "component": trained_part},
                                             "lora": {**raw["lora"],
                                                      "components": {frozen: {"pretrained_weight": frozen_weight}}}}))
        run.setup_training()
        got = applied_change({frozen: run.modules[frozen]})
        assert_same_change(got, {k: v for k, v in expected.items() if k[0] == frozen})


def test_glm_image_ar_pretrained_weight_with_another_alpha_is_refused(glm_run):
    raw, _, final = glm_run
    other = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "pretrained_weight": str(final),
                                                           "components": {"ar": {"alpha": 8.0}}}}))
    with pytest.raises(ConfigError, match=r"lora.components.ar.alpha\) to 1"):
        other.setup_training()


# -- BAGEL: peft adapter folder through the project's loader -----------------------------------------


@pytest.fixture(scope="module")
def bagel_run(tmp_path_factory, shapes_data):
    tmp = tmp_path_factory.mktemp("bagel")
    raw = config(tmp, shapes_data, "bagel", {"component": "both"})
    raw["data"]["resolution"] = 16
    family, final = trained(tmp, raw)
    return raw, family, final


def test_bagel_lora_loads_at_alpha_over_rank(bagel_run):
    from glm_training.models.bagel import load_lora
    from glm_training.models.bagel.loading import load_bagel

    raw, family, final = bagel_run
    expected = trained_change(family)
    fresh = load_bagel(family.model_path)
    load_lora(fresh, final)  # the README's loader: rebuilds the adapter from adapter_config.json
    assert_same_change(applied_change({"bagel": fresh}), expected)

    restarted = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "pretrained_weight": str(final)}}))
    restarted.setup_training()
    assert_same_change(applied_change({"bagel": restarted.unwrapped("bagel")}), expected)

    other = build_family(config_from_dict({**raw, "lora": {**raw["lora"], "alpha": 8.0,
                                                           "pretrained_weight": str(final)}}))
    with pytest.raises(ConfigError, match=r"set lora.alpha"):
        other.setup_training()


def test_comfyui_export_refuses_text_encoder_modules_comfyui_drops(tmp_path, shapes_data):
    """A text-encoder LoRA on modules outside ComfyUI's CLIP map stops the kohya export with the
    keys to change, before any file is written."""
    raw = config(tmp_path, shapes_data, "sdxl", {"train_text_encoder": True}, save_format="comfyui",
                 text_encoder_target_modules=["q_proj", "fc1", "token_embedding"])
    family = build_family(config_from_dict(raw))
    family.setup_training()
    with pytest.raises(ConfigError, match="lora.text_encoder_target_modules"):
        family.save_adapter(tmp_path / "final")
    assert not (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
