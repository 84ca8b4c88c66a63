"""model.quantize / model.gguf_file: LoRA trains over a quantized frozen base (torchao int8 / fp8 on
CPU), the saved LoRA loads into the unquantized diffusers pipeline without warnings, and its
outputs stay within the measured quantization error of the LoRA trained on the unquantized base.
nf4 (bitsandbytes) needs CUDA: on CPU its error is checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm_training.config import ConfigError, config_from_dict
from glm_training.data.datasets import collate
from glm_training.models.base import build_family
from glm_training.models.tiny import ensure_tiny
from glm_training.trainers.sft import build_diffusion_data

from conftest import fit_fixed_draws, load_lora_messages

FAMILIES = {"sdxl": "unet", "flux_kontext": "transformer", "qwen_image": "transformer"}
#: Measured on tiny SDXL (seed 0, 6 AdamW steps at lr 1e-2, 2-step pipeline at 32 px, images in
#: [0, 1]): mean |pixel| gap between the unquantized pipeline with the LoRA trained over the
#: quantized base and with the LoRA trained over the unquantized base: int8 0.018, fp8 0.024, while
#: the LoRA itself moves the images by 0.044 (Adam's normalised steps amplify the small gradient
#: differences of a random tiny model). The test holds the gap under these bounds and under the
#: LoRA's own effect.
MEAN_PIXEL_BOUND = {"int8": 0.03, "fp8": 0.04}


def raw_config(tmp_path, family, data, quantize=None, **model):
    return {"model": {"family": family, "pretrained_model_name_or_path": f"tiny:{family}",
                      **({"quantize": quantize} if quantize else {}), **model},
            "data": {"path": str(data), "resolution": 32},
            "training": {"batch_size": 2, "seed": 0, "learning_rate": 1e-2},
            "lora": {"rank": 4, "alpha": 4},
            "logging": {"output_dir": str(tmp_path / "output"), "report_to": []}}


def train_lora(raw, out_dir, steps=6):
    """A few LoRA steps on fixed batches -> (loss before, loss after on held noise, family)."""
    cfg = config_from_dict(raw)
    family = build_family(cfg)
    family.setup_training()
    dataset, encoder = build_diffusion_data(cfg, family)
    batch = collate([dataset[i] for i in range(2)])
    with torch.no_grad():
        latents, condition = encoder(batch, 0)
    generator = torch.Generator().manual_seed(0)
    draws = [(torch.randn(latents.shape, generator=generator),
              family.objective.sample_timesteps(len(latents), latents, generator)) for _ in range(3)]
    params = [p for name in family.trained for p in family.unwrapped(name).parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=raw["training"]["learning_rate"])

    before, after = fit_fixed_draws(family, latents, condition, draws, optimizer, steps)
    family.save_adapter(out_dir)
    return before, after, family


def pipeline_images(family_name, adapter_dir):
    """The stock, unquantized pipeline of the tiny model with the adapter loaded -> (images, messages)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(ensure_tiny(family_name))
    pipe.set_progress_bar_config(disable=True)
    messages = load_lora_messages(pipe, adapter_dir) if adapter_dir is not None else []
    call = dict(prompt="a red square", height=32, width=32, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0))
    if family_name == "flux_kontext":
        call.update(max_area=32 * 32, _auto_resize=False)
    return pipe(**call).images, messages


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, shapes_data):
    """The LoRA of each family trained over the unquantized base (same seeds): what the quantized runs match."""
    runs = {}

    def run(family_name):
        if family_name not in runs:
            folder = tmp_path_factory.mktemp(f"{family_name}_plain")
            before, after, _ = train_lora(raw_config(folder, family_name, shapes_data), folder / "lora")
            runs[family_name] = (before, after, pipeline_images(family_name, folder / "lora")[0],
                                 pipeline_images(family_name, None)[0])
        return runs[family_name]
    return run


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_lora_over_a_quantized_base_trains_and_loads_into_the_unquantized_pipeline(
        tmp_path, shapes_data, reference_runs, family_name, kind):
    from torchao.utils import TorchAOBaseTensor

    before, after, family = train_lora(raw_config(tmp_path, family_name, shapes_data, kind), tmp_path / "lora")
    denoiser = family.unwrapped(FAMILIES[family_name])
    quantized = [m for m in denoiser.modules() if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)]
    assert quantized, "the denoiser's Linear weights are quantized"
    assert after < before, (before, after)
    plain_before, plain_after, plain_images, base_images = reference_runs(family_name)
    images, messages = pipeline_images(family_name, tmp_path / "lora")
    # FLUX's loader always says it found no CLIP keys for a transformer-only file (harmless, see
    # LIBRARY-NOTES); anything else is a warning about the file.
    assert [m for m in messages if "No LoRA keys associated to CLIPTextModel" not in m] == []
    gap, effect = float(np.abs(images - plain_images).mean()), float(np.abs(plain_images - base_images).mean())
    print(f"{family_name} {kind}: fixed loss {before:.4f} -> {after:.4f} (unquantized base {plain_before:.4f} -> "
          f"{plain_after:.4f}); mean pixel gap to the unquantized-base LoRA {gap:.4f}, LoRA effect {effect:.4f}")
    assert gap <= MEAN_PIXEL_BOUND[kind] and gap < effect


def test_glm_image_dit_lora_over_int8_base_and_ar_alias(tmp_path):
    """GLM-Image: model.quantize accepts its part names (dit/ar) for the pipeline folders."""
    from torchao.utils import TorchAOBaseTensor

    cfg = config_from_dict({"model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image",
                                      "quantize": {"dit": "int8", "ar": "fp8"}},
                            "data": {"path": str(tmp_path), "resolution": 32}})
    family = build_family(cfg)
    family.setup_training()
    for name in ("dit", "ar"):
        assert any(isinstance(getattr(m, "weight", None), TorchAOBaseTensor) for m in family.modules[name].modules())
    lora = [n for n, p in family.modules["dit"].named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)


def test_prequantized_folder_round_trip(tmp_path, shapes_data):
    """A transformer saved with its quantization config loads quantized without model.quantize, and trains."""
    import shutil

    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.utils import TorchAOBaseTensor

    folder = tmp_path / "flux_int8"
    shutil.copytree(ensure_tiny("flux_kontext"), folder)
    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer",
                                                   quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")  # safetensors with torchao's flattened tensors
    assert "quantization_config" in (folder / "transformer" / "config.json").read_text()
    raw = raw_config(tmp_path, "flux_kontext", shapes_data)
    raw["model"]["pretrained_model_name_or_path"] = str(folder)
    before, after, family = train_lora(raw, tmp_path / "lora", steps=4)
    weights = [m.weight for m in family.unwrapped("transformer").modules()
               if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)]
    assert weights and after < before
    original = dict(model.named_parameters())
    loaded = dict(family.unwrapped("transformer").named_parameters())
    key = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(original[key].dequantize(), loaded[key.replace(".weight", ".base_layer.weight")].dequantize())


def test_gguf_transformer_round_trip(tmp_path, shapes_data):
    """model.gguf_file: a Q8_0 GGUF of the transformer (diffusers key names) loads through
    GGUFQuantizationConfig and trains a LoRA; its dequantized weights match the GGUF's."""
    import gguf
    from diffusers import FluxTransformer2DModel

    source = FluxTransformer2DModel.from_pretrained(ensure_tiny("flux_kontext"), subfolder="transformer")
    path = tmp_path / "transformer-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in source.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:  # Q8_0 blocks of 32 along rows
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = raw_config(tmp_path, "flux_kontext", shapes_data, gguf_file=str(path))
    before, after, family = train_lora(raw, tmp_path / "lora", steps=4)
    layer = family.unwrapped("transformer").transformer_blocks[0].attn.to_q
    assert type(layer.base_layer.weight).__name__ == "GGUFParameter"
    expected = source.transformer_blocks[0].attn.to_q.weight
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    assert torch.allclose(dequantize_gguf_tensor(layer.base_layer.weight).float(), expected, atol=expected.abs().max().item() / 100)
    assert after < before


def test_nf4_on_cpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nf4 loads")
    cfg = config_from_dict(raw_config(tmp_path, "flux_kontext", tmp_path, "nf4"))
    with pytest.raises(ConfigError, match=r"model.quantize.transformer: nf4 .*needs a CUDA GPU.*int8 or fp8"):
        build_family(cfg)


@pytest.mark.parametrize("quantize, message", [
    ({"vae": "int8"}, r"model.quantize.vae: the VAE is never quantized"),
    ({"transformer": "int4"}, r"model.quantize.transformer: 'int4' is not one of"),
    ({"unet": "int8"}, r"model.quantize.unet: flux_kontext has no quantizable component 'unet'"),
    (3, r"model.quantize: expected one of"),
])
def test_bad_quantize_values_name_the_key(tmp_path, quantize, message):
    raw = raw_config(tmp_path, "flux_kontext", tmp_path)
    raw["model"]["quantize"] = quantize
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_full_fine_tuning_of_a_quantized_part_is_refused(tmp_path):
    raw = raw_config(tmp_path, "flux_kontext", tmp_path, "int8")
    raw["lora"] = {"enabled": False}
    with pytest.raises(ConfigError, match=r"model.quantize: \['transformer'\] are fully fine-tuned"):
        config_from_dict(raw)
    raw["model"]["quantize"] = {"transformer": "none", "text_encoder_2": "int8"}
    assert config_from_dict(raw).model.quantize["text_encoder_2"] == "int8"
