"""BAGEL checkpoint layout: official tensor names, strict loading, save/load round trip, tokenizer."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_training.models.bagel.config import (
    AEConfig,
    BagelConfig,
    BagelConfigError,
    LLMConfig,
    ViTConfig,
    load_bagel_config,
)
from glm_training.models.bagel.loading import (
    BagelCheckpointError,
    expected_shapes,
    load_bagel,
    load_bagel_tokenizer,
    save_bagel,
)
from glm_training.models.bagel.model import BagelModel
from glm_training.models.bagel.tiny import build_tiny_bagel

# Tensor-name patterns of the official checkpoint files, written from the official module tree
# (github.com/ByteDance-Seed/Bagel): modeling/bagel/bagel.py (Bagel: language_model, time_embedder,
# vae2llm, llm2vae, latent_pos_embed, vit_model, connector, vit_pos_embed),
# modeling/bagel/qwen2_navit.py (Qwen2ForCausalLM.model / lm_head, Qwen2Model.embed_tokens / layers /
# norm / norm_moe_gen, Qwen2MoTDecoderLayer, PackedAttentionMoT with qk_norm=True),
# modeling/qwen2/modeling_qwen2.py (Qwen2MLP gate/up/down_proj without bias; q/k/v with bias, o without),
# modeling/bagel/siglip_navit.py (SiglipVisionModel.vision_model; patch_embedding converted to Linear;
# position_embedding with rope=False), modeling/bagel/modeling_utils.py (TimestepEmbedder.mlp.0/.2,
# MLPconnector.fc1/fc2, PositionEmbedding.pos_embed), modeling/autoencoder.py (Encoder / Decoder).
LAYER = r"language_model\.model\.layers\.(\d+)\."
EMA_PATTERNS = [
    r"language_model\.model\.embed_tokens\.weight",
    r"language_model\.model\.norm\.weight",
    r"language_model\.model\.norm_moe_gen\.weight",
    r"language_model\.lm_head\.weight",
]
for _suffix in ("", "_moe_gen"):
    for _proj in ("q", "k", "v"):
        EMA_PATTERNS.append(LAYER + rf"self_attn\.{_proj}_proj{_suffix}\.weight")
        EMA_PATTERNS.append(LAYER + rf"self_attn\.{_proj}_proj{_suffix}\.bias")
    EMA_PATTERNS.append(LAYER + rf"self_attn\.o_proj{_suffix}\.weight")
    EMA_PATTERNS.append(LAYER + rf"self_attn\.q_norm{_suffix}\.weight")
    EMA_PATTERNS.append(LAYER + rf"self_attn\.k_norm{_suffix}\.weight")
    for _proj in ("gate", "up", "down"):
        EMA_PATTERNS.append(LAYER + rf"mlp{_suffix}\.{_proj}_proj\.weight")
    EMA_PATTERNS.append(LAYER + rf"input_layernorm{_suffix}\.weight")
    EMA_PATTERNS.append(LAYER + rf"post_attention_layernorm{_suffix}\.weight")
VIT_LAYER = r"vit_model\.vision_model\.encoder\.layers\.(\d+)\."
EMA_PATTERNS += [
    r"vit_model\.vision_model\.embeddings\.patch_embedding\.weight",
    r"vit_model\.vision_model\.embeddings\.patch_embedding\.bias",
    r"vit_model\.vision_model\.embeddings\.position_embedding\.weight",
    r"vit_model\.vision_model\.post_layernorm\.weight",
    r"vit_model\.vision_model\.post_layernorm\.bias",
]
for _kind in ("weight", "bias"):
    for _proj in ("q", "k", "v", "out"):
        EMA_PATTERNS.append(VIT_LAYER + rf"self_attn\.{_proj}_proj\.{_kind}")
    for _name in ("layer_norm1", "layer_norm2", "mlp\\.fc1", "mlp\\.fc2"):
        EMA_PATTERNS.append(VIT_LAYER + rf"{_name}\.{_kind}")
    for _name in ("connector\\.fc1", "connector\\.fc2", "time_embedder\\.mlp\\.0", "time_embedder\\.mlp\\.2",
                  "vae2llm", "llm2vae"):
        EMA_PATTERNS.append(rf"{_name}\.{_kind}")
EMA_PATTERNS += [r"vit_pos_embed\.pos_embed", r"latent_pos_embed\.pos_embed"]

RESNET = ("norm1", "norm2", "conv1", "conv2")
AE_PATTERNS = []
for _part in ("encoder", "decoder"):
    for _kind in ("weight", "bias"):
        AE_PATTERNS += [rf"{_part}\.conv_in\.{_kind}", rf"{_part}\.conv_out\.{_kind}", rf"{_part}\.norm_out\.{_kind}"]
        AE_PATTERNS += [rf"{_part}\.mid\.block_{i}\.{n}\.{_kind}" for i in (1, 2) for n in RESNET]
        AE_PATTERNS += [rf"{_part}\.mid\.attn_1\.{n}\.{_kind}" for n in ("norm", "q", "k", "v", "proj_out")]
        level = "down" if _part == "encoder" else "up"
        AE_PATTERNS += [rf"{_part}\.{level}\.\d+\.block\.\d+\.{n}\.{_kind}" for n in RESNET + ("nin_shortcut",)]
        AE_PATTERNS.append(rf"{_part}\.{level}\.\d+\.{'downsample' if level == 'down' else 'upsample'}\.conv\.{_kind}")

#: Tensors per LM layer (2 experts x (q,k,v weight+bias, o, q_norm, k_norm, 3 MLP, 2 norms)) and ViT layer.
PER_LM_LAYER = 28
PER_VIT_LAYER = 16


def match_exactly(names: list[str], patterns: list[str]) -> None:
    """Every name matches exactly one pattern and every pattern matches some name."""
    compiled = [re.compile(p) for p in patterns]
    used = Counter()
    for name in names:
        hits = [p.pattern for p in compiled if p.fullmatch(name)]
        assert len(hits) == 1, f"{name} matches {hits}"
        used[hits[0]] += 1
    unused = [p for p in patterns if not used[p]]
    assert not unused, f"official patterns without a tensor: {unused}"


def layer_counts(names: list[str], layer_pattern: str) -> Counter:
    return Counter(int(m.group(1)) for name in names if (m := re.match(layer_pattern, name)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", seed=0)


def official_7b_config() -> BagelConfig:
    # llm_config.json / vit_config.json values of BAGEL-7B-MoT (Qwen2.5-7B, SigLIP-so400m-14-980,
    # 27 layers in the file), with the official app.py settings (max_latent_size=64, 70 ViT patches/side).
    llm = LLMConfig.from_dict({"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                               "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                               "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768})
    vit = ViTConfig.from_dict({"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                               "num_attention_heads": 16, "image_size": 980, "patch_size": 14})
    return BagelConfig(llm=llm, vit=vit, ae=AEConfig(), max_latent_size=64, vit_max_num_patch_per_side=70)


def test_tiny_files_follow_the_official_layout(tiny_dir: Path) -> None:
    names = sorted(p.name for p in tiny_dir.iterdir())
    for required in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json"):
        assert required in names
    assert "bagel_config.json" not in names  # every BAGEL-level setting is official or read from shapes
    vit = json.loads((tiny_dir / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == 3 and vit["rope"] is False
    config = load_bagel_config(tiny_dir)
    assert config.vit.num_model_layers == 2
    assert (config.max_latent_size, config.vit_max_num_patch_per_side) == (8, 8)
    assert config.ae.ch_mult == (1, 2) and config.ae.z_channels == 4 and config.latent_downsample == 4


def test_tiny_checkpoint_names_match_official_patterns(tiny_dir: Path) -> None:
    ema_names = sorted(load_file(str(tiny_dir / "ema.safetensors")))
    ae_names = sorted(load_file(str(tiny_dir / "ae.safetensors")))
    match_exactly(ema_names, EMA_PATTERNS)
    match_exactly(ae_names, AE_PATTERNS)
    assert layer_counts(ema_names, LAYER) == {0: PER_LM_LAYER, 1: PER_LM_LAYER}
    assert layer_counts(ema_names, VIT_LAYER) == {0: PER_VIT_LAYER, 1: PER_VIT_LAYER}


def test_official_7b_layout_on_meta_device() -> None:
    config = official_7b_config()
    with torch.device("meta"):
        model = BagelModel(config)
    ema, ae = expected_shapes(model)
    match_exactly(sorted(ema), EMA_PATTERNS)
    match_exactly(sorted(ae), AE_PATTERNS)
    assert layer_counts(list(ema), LAYER) == {i: PER_LM_LAYER for i in range(28)}
    assert layer_counts(list(ema), VIT_LAYER) == {i: PER_VIT_LAYER for i in range(26)}  # 27 - 1
    expected = {
        "language_model.model.embed_tokens.weight": (152064, 3584),
        "language_model.model.layers.0.self_attn.k_proj_moe_gen.weight": (512, 3584),
        "language_model.model.layers.27.self_attn.q_norm_moe_gen.weight": (128,),
        "language_model.model.layers.0.mlp_moe_gen.gate_proj.weight": (18944, 3584),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 3 * 14 * 14),
        "vit_model.vision_model.embeddings.position_embedding.weight": (4900, 1152),
        "connector.fc1.weight": (3584, 1152),
        "vit_pos_embed.pos_embed": (4900, 3584),
        "latent_pos_embed.pos_embed": (4096, 3584),
        "vae2llm.weight": (3584, 64),
        "llm2vae.weight": (64, 3584),
        "time_embedder.mlp.0.weight": (3584, 256),
    }
    for name, shape in expected.items():
        assert ema[name] == shape, name
    assert ae["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert ae["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert ae["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert ae["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    # 7B active per expert: ~14B in total with both experts (the published "14B total").
    total = sum(model.state_dict()[name].numel() for name in ema)
    assert 14.0e9 < total < 15.0e9, total


def test_strict_load_and_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    model = load_bagel(tiny_dir)
    assert not any(p.requires_grad for p in model.parameters())
    file_tensors = load_file(str(tiny_dir / "ema.safetensors"))
    state = model.state_dict()
    for name, tensor in file_tensors.items():
        assert torch.equal(state[name], tensor), name
    ae_tensors = load_file(str(tiny_dir / "ae.safetensors"))
    for name, tensor in ae_tensors.items():
        assert torch.equal(state["vae." + name], tensor), name
    assert len(state) == len(file_tensors) + len(ae_tensors)

    save_bagel(model, tmp_path / "copy")
    reloaded = load_bagel(tmp_path / "copy", dtype=torch.bfloat16)
    for name, tensor in reloaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name


def _copy_with(tiny_dir: Path, out: Path, edit) -> Path:
    shutil.copytree(tiny_dir, out)
    tensors = load_file(str(out / "ema.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "ema.safetensors"))
    return out


def test_unexpected_tensor_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    def add(tensors):
        tensors["language_model.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2)
        tensors["zz_unknown.weight"] = torch.zeros(1)

    folder = _copy_with(tiny_dir, tmp_path / "extra", add)
    with pytest.raises(BagelCheckpointError) as error:
        load_bagel(folder)
    message = str(error.value)
    assert "ema.safetensors" in message and "2 unexpected tensors" in message
    assert "language_model.model.layers.0.self_attn.extra_proj.weight" in message and "zz_unknown.weight" in message
    assert "missing" not in message


def test_missing_and_misshaped_tensors_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    def edit(tensors):
        del tensors["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
        for index in range(2):
            del tensors[f"vit_model.vision_model.encoder.layers.{index}.layer_norm1.bias"]
        tensors["llm2vae.bias"] = torch.zeros(3)

    folder = _copy_with(tiny_dir, tmp_path / "missing", edit)
    with pytest.raises(BagelCheckpointError) as error:
        load_bagel(folder)
    message = str(error.value)
    assert "3 missing tensors" in message and "1 shape mismatches" in message
    assert "language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in message
    assert "llm2vae.bias: file (3,) vs model (16,)" in message


def test_error_lists_at_most_twenty_names(tiny_dir: Path, tmp_path: Path) -> None:
    def drop_layer(tensors):
        for name in [n for n in tensors if n.startswith("language_model.model.layers.1.")]:
            del tensors[name]

    folder = _copy_with(tiny_dir, tmp_path / "layer", drop_layer)
    with pytest.raises(BagelCheckpointError) as error:
        load_bagel(folder)
    message = str(error.value)
    assert f"{PER_LM_LAYER} missing tensors" in message
    assert sum(line.startswith("    language_model") for line in message.splitlines()) == 20


def test_missing_config_file_is_explained(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "noconfig"
    shutil.copytree(tiny_dir, folder)
    (folder / "vit_config.json").unlink()
    with pytest.raises(BagelConfigError, match="vit_config.json is missing"):
        load_bagel(folder)


def test_tokenizer_loads_with_bagel_special_tokens(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = load_bagel_config(tiny_dir)
    tokenizer, special = load_bagel_tokenizer(tiny_dir, config)
    assert type(AutoTokenizer.from_pretrained(str(tiny_dir))).__name__ == "Qwen2Tokenizer"
    ids = {special.bos_token_id, special.eos_token_id, special.start_of_image, special.end_of_image}
    assert len(ids) == 4 and max(ids) < config.llm.vocab_size
    text = "the cat <|vision_start|>"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[-1] == special.start_of_image
    assert tokenizer.decode(encoded) == text
    assert len(tokenizer) <= config.llm.vocab_size
