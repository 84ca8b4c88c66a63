"""GLM-Image DiT decoder: conditioning equals what GlmImagePipeline builds, one predict() equals the
pipeline's transformer call, SFT through the CLI (t2i and i2i) lowers the loss, the saved LoRA loads
into the pipeline and changes its output, and image-to-image sampling runs after loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from glm_training.cli import main
from glm_training.config import DataConfig, config_from_dict
from glm_training.data.datasets import ImageDataset, collate, load_records, to_tensor
from glm_training.models.base import build_family
from glm_training.models.glm_image import GlmImageFlowShift, load_glm_image_lora
from glm_training.models.glm_image_support import FixedGlmImagePipeline
from glm_training.models.tiny import ensure_tiny
from glm_training.parts.conditioning import ConditionEncoder
from glm_training.parts.denoiser import diffusion_sft_loss

SIZE = 32


def glm_config(tmp_path, data_path, **sections) -> dict:
    raw = {
        "model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image"},
        "data": {"path": str(data_path), "resolution": SIZE},
        "training": {"max_train_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "checkpointing_steps": 1000,
                     "seed": 0},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "glm", "report_to": ["tensorboard"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def noise_image(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory):
    """JSONL manifest {"prompt", "image", "control_images"}: targets are the sources, colour-shifted."""
    root = tmp_path_factory.mktemp("glm_edit")
    lines = []
    for index in range(4):
        source = noise_image(index)
        target = Image.fromarray(255 - np.asarray(source))
        source.save(root / f"source{index}.png")
        target.save(root / f"target{index}.png")
        lines.append({"prompt": f"invert the colours, write 'GLM{index}'", "image": f"target{index}.png",
                      "control_images": [f"source{index}.png"]})
    (root / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root / "data.jsonl"


@pytest.fixture(scope="module")
def family(tmp_path_factory, edit_data):
    raw = glm_config(tmp_path_factory.mktemp("glm_family"), edit_data)
    return build_family(config_from_dict(raw))


def captured_transformer_calls(pipe, **call_kwargs):
    """Run the pipeline and record every transformer call (keyword inputs and output)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                      output[0].clone()))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
             max_sequence_length=family_max_len(), **call_kwargs)
    finally:
        handle.remove()
    return calls


def family_max_len() -> int:
    from glm_training.models.glm_image import GlmImageFamily

    return GlmImageFamily.max_sequence_length


def test_flow_schedule_and_timestep_match_the_pipeline(family):
    pipe = family.pipeline()
    seq_len = (SIZE // 8 // 2) ** 2
    prompt = "a 'sign'"
    calls = captured_transformer_calls(pipe, prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=4,
                                       guidance_scale=1.0)
    sigmas = pipe.scheduler.sigmas[:-1]
    unshifted = torch.tensor([1000.0, 750.0, 500.0, 250.0]) / 1000
    torch.testing.assert_close(family.objective.shift(unshifted, seq_len), sigmas, rtol=0, atol=1e-6)
    # The transformer sees the unshifted timestep minus one, as the pipeline passes it.
    fed = torch.stack([kwargs["timestep"][0] for kwargs, _ in calls])
    torch.testing.assert_close(family.dit_timestep(sigmas, torch.zeros(1, 16, 4, 4)), fed, rtol=0, atol=1e-3)
    static = GlmImageFlowShift(shift=3.0)
    torch.testing.assert_close(static.unshift(static(unshifted, 1), 1), unshifted)


def test_conditioning_equals_what_the_pipeline_builds(family, edit_data):
    pipe = family.pipeline()
    prompts = ['a shop sign that says "OPEN" and \u201cdaily\u201d', "no quoted text"]
    embeds = family.encode_prompt(prompts)
    reference, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                      max_sequence_length=family.max_sequence_length, device="cpu")
    torch.testing.assert_close(embeds["prompt_embeds"], reference, rtol=0, atol=0)
    # Per-sample (cached) entries re-collate to the same batch.
    items = [{k: v[i:i + 1] for k, v in embeds.items()} for i in range(2)]
    torch.testing.assert_close(family.collate_prompt_embeds(items[::-1])["prompt_embeds"],
                               pipe.encode_prompt(prompts[::-1], False, max_sequence_length=2048)[0])

    # Prior tokens of an image: what the pipeline's image-to-image path makes of it as a source.
    source = Image.open(edit_data.parent / "source0.png").convert("RGB")
    mine = family.prior_tokens(to_tensor(source)[None])[0]
    _, per_sample, grids = pipe.generate_prior_tokens(prompt="x", height=SIZE, width=SIZE, image=[[source]])
    torch.testing.assert_close(mine, per_sample[0], rtol=0, atol=0)
    assert grids[0].tolist() == [[1, SIZE // 16, SIZE // 16]]
    assert mine.numel() == (SIZE // 16) ** 2  # one prior token per DiT patch


def test_predict_equals_the_pipeline_transformer_call_t2i_and_i2i(family, edit_data):
    pipe = family.pipeline()
    target = to_tensor(Image.open(edit_data.parent / "target0.png").convert("RGB"))[None]
    source_image = Image.open(edit_data.parent / "source0.png").convert("RGB")
    source = to_tensor(source_image)[None]
    prompt = "invert the colours, write 'GLM0'"
    embeds = family.encode_prompt([prompt])

    # Text-to-image: the pipeline given our prior tokens, one transformer call per step.
    cond = family.condition(embeds, {"pixel_values": target})
    calls = captured_transformer_calls(pipe, prompt=prompt, height=SIZE, width=SIZE, num_inference_steps=2,
                                       guidance_scale=1.0, prior_token_ids=cond["prior_token_id"])
    assert len(calls) == 2
    for step, (kwargs, output) in enumerate(calls):
        torch.testing.assert_close(kwargs["encoder_hidden_states"], cond["encoder_hidden_states"])
        torch.testing.assert_close(kwargs["target_size"], cond["target_size"])
        torch.testing.assert_close(kwargs["crop_coords"], cond["crop_coords"])
        with torch.no_grad():
            mine = family.predict(kwargs["hidden_states"], pipe.scheduler.sigmas[step:step + 1], cond)
        torch.testing.assert_close(mine, output, rtol=1e-4, atol=1e-4)

    # Image-to-image: source latents + tokens through the KV cache, as the pipeline's step 6.
    batch = {"pixel_values": target, "control_pixel_values": [source]}
    cond = family.condition(embeds, batch)
    control = cond["controls"][0]
    torch.testing.assert_close(control["latents"], family.encode_images(source))
    grid = torch.tensor([[1, SIZE // 16, SIZE // 16]])
    calls = captured_transformer_calls(
        pipe, prompt=prompt, image=[source_image], height=SIZE, width=SIZE, num_inference_steps=2,
        guidance_scale=1.0, prior_token_ids=cond["prior_token_id"],
        prior_token_image_ids=[control["prior_token_id"][0]], source_image_grid_thw=[grid])
    assert len(calls) == 3  # one cache-writing pass for the source, then two denoising steps
    torch.testing.assert_close(calls[0][0]["hidden_states"], control["latents"])
    for step, (kwargs, output) in enumerate(calls[1:]):
        with torch.no_grad():
            mine = family.predict(kwargs["hidden_states"], pipe.scheduler.sigmas[step:step + 1], cond)
        torch.testing.assert_close(mine, output, rtol=1e-4, atol=1e-4)
        # Without the source the prediction differs: the cache really conditions it.
        no_source = {k: v for k, v in cond.items() if k != "controls"}
        with torch.no_grad():
            assert not torch.allclose(family.predict(kwargs["hidden_states"], pipe.scheduler.sigmas[step:step + 1],
                                                     no_source), output, atol=1e-4)


def fixed_loss(cfg, final_dir=None) -> float:
    """Flow loss over the dataset with fixed noise and sigmas, for the base model or a saved LoRA."""
    if final_dir is not None:
        cfg.lora.pretrained_weight = str(final_dir)
    family = build_family(cfg)
    torch.manual_seed(0)
    family.setup_training()
    samples = load_records(DataConfig(path=cfg.data.path), {"prompt", "target"})
    encoder = ConditionEncoder(family, samples, None, cfg.data.resolution)
    batch = collate([ImageDataset(samples, cfg.data.resolution)[i] for i in range(len(samples))])
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents, condition = encoder(batch, 0)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = torch.linspace(0.2, 0.9, len(latents))
        return diffusion_sft_loss(family, latents, condition, noise, sigmas).mean().item()


@pytest.mark.parametrize("mode", ["t2i", "i2i"])
def test_sft_through_the_cli_lowers_the_loss_and_the_lora_loads_into_the_pipeline(tmp_path, edit_data, mode):
    if mode == "t2i":  # the same manifest without control images
        rows = [json.loads(line) for line in edit_data.read_text().splitlines()]
        data = tmp_path / "t2i.jsonl"
        data.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "control_images"})
                                  for r in rows) + "\n")
        for r in rows:
            (tmp_path / r["image"]).write_bytes((edit_data.parent / r["image"]).read_bytes())
    else:
        data = edit_data
    raw = glm_config(tmp_path, data, training={"max_train_steps": 60, "learning_rate": 1e-2, "mode": mode},
                     lora={"rank": 8, "alpha": 8})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config_path)]) == 0
    final = tmp_path / "output" / "glm" / "v0" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert not (final / "ar_adapter").exists()  # only the DiT trained

    cfg = config_from_dict(raw)
    before, after = fixed_loss(config_from_dict(raw)), fixed_loss(cfg, final)
    print(f"GLM-Image DiT {mode} SFT fixed loss: {before:.4f} -> {after:.4f}")
    assert after < before * 0.9, (before, after)

    # The LoRA loads into a stock-loaded pipeline and changes its output for a fixed seed.
    pipe = FixedGlmImagePipeline.from_pretrained(ensure_tiny("glm_image"))
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="invert the colours, write 'GLM1'", height=SIZE, width=SIZE, num_inference_steps=2,
                guidance_scale=1.5, output_type="np", max_sequence_length=64)
    # Fixed prior tokens: the comparison is about the DiT (and skips the 16x16 AR preview on CPU).
    prior = torch.randint(0, 128, (1, (SIZE // 16) ** 2), generator=torch.Generator().manual_seed(0))
    plain = pipe(generator=torch.Generator().manual_seed(0), prior_token_ids=prior, **call).images
    assert load_glm_image_lora(pipe, final) == ["dit"]
    tuned = pipe(generator=torch.Generator().manual_seed(0), prior_token_ids=prior, **call).images
    assert np.abs(tuned - plain).max() > 1e-3
    # Image-to-image (AR included) runs after loading.
    source = Image.open(edit_data.parent / "source1.png").convert("RGB")
    edited = pipe(image=[source], generator=torch.Generator().manual_seed(0), **call).images
    assert edited.shape == (1, SIZE, SIZE, 3) and np.isfinite(edited).all()
