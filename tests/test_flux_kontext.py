"""FLUX.1 Kontext family: conditioning equals FluxKontextPipeline's, training lowers the loss
(t2i and i2i) from a config through the CLI, the LoRA loads into the real pipeline, configs validate."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import fixed_noise_losses, load_lora_messages, logged_losses, run_dir_of, unmatched_key_messages
from glm_training.cli import main
from glm_training.config import config_from_dict, load_config
from glm_training.models.base import build_family

REPO = Path(__file__).resolve().parents[1]
RES = 32  # 4x4 latents, 2x2 = 4 packed tokens: cheap on CPU
T5_TOKENS = 32  # instead of 512: the text tokens dominate the tiny transformer's cost


@pytest.fixture(scope="module", autouse=True)
def short_prompts():
    from glm_training.models.flux_kontext import FluxKontextFamily

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxKontextFamily, "max_sequence_length", T5_TOKENS)
        yield


def flux_config(tmp_path: Path, data_path: Path, **sections) -> dict:
    raw = {
        "model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext"},
        "data": {"path": str(data_path), "resolution": RES},
        "training": {"max_train_steps": 4, "batch_size": 2, "learning_rate": 1e-3,
                     "checkpointing_steps": 1000, "seed": 0},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "flux", "report_to": ["tensorboard"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_config(tmp_path: Path, raw: dict) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory) -> Path:
    """i2i manifest: the control shows a shape in blue, the target the same shape (same place) in red."""
    from glm_training.data.synthetic import draw_shape

    root = tmp_path_factory.mktemp("flux_edit")
    rng = random.Random(0)
    rows = []
    for i in range(4):
        shape, background = rng.choice(["circle", "square", "triangle"]), rng.choice(["white", "black"])
        state = rng.getstate()
        for colour, role in (("blue", "control"), ("red", "target")):
            rng.setstate(state)
            draw_shape(shape, colour, background, RES, rng).save(root / f"{i}_{role}.png")
        rows.append({"prompt": f"make the {shape} red", "image": f"{i}_target.png",
                     "control_images": [f"{i}_control.png"]})
    (root / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "edits.jsonl"


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory) -> Path:
    from glm_training.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("flux_shapes"), count=4, size=RES, seed=0)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxKontextPipeline

    from glm_training.models.tiny import ensure_tiny

    return FluxKontextPipeline.from_pretrained(ensure_tiny("flux_kontext"))


# ----------------------------------------------------------------------------------------------
# 1. Conditioning equals the pipeline's


def test_packing_ids_and_control_tokens_equal_the_pipeline(tmp_path, edit_data, pipe):
    family = build_family(config_from_dict(flux_config(tmp_path, edit_data)))
    latents = torch.randn(2, 16, 4, 6)
    packed = family.pack(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 2, 16, 4, 6))
    assert torch.equal(family.unpack(packed, 4, 6), latents)
    assert torch.equal(family.unpack(packed, 4, 6), pipe._unpack_latents(packed, 32, 48, pipe.vae_scale_factor))

    control = Image.open(edit_data.parent / "0_control.png").convert("RGB")
    pixels = pipe.image_processor.preprocess(control, RES, RES)
    generator = torch.Generator().manual_seed(0)
    _, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        pixels, 1, 16, RES, RES, torch.float32, torch.device("cpu"), generator)
    condition = family.condition(
        {"prompt_embeds": torch.zeros(1, 7, 32), "pooled_prompt_embeds": torch.zeros(1, 32)},
        {"control_latents": [family.encode_images(pixels)]})
    torch.testing.assert_close(condition["control_tokens"], image_latents)  # VAE mode, shift, scale, packing
    assert torch.equal(condition["control_ids"], image_ids) and (image_ids[:, 0] == 1).all()
    assert torch.equal(family.image_ids(4, 4, "cpu", torch.float32), latent_ids)
    _, _, text_ids = pipe.encode_prompt("a cat", max_sequence_length=7)
    assert torch.equal(condition["txt_ids"], text_ids)
    assert torch.equal(condition["guidance"], torch.ones(1))  # model.guidance_scale default


def test_prompt_embeddings_and_predict_equal_the_pipelines_transformer_call(tmp_path, edit_data, pipe):
    """Record the transformer call of a real one-step edit and reproduce it with the family."""
    raw = flux_config(tmp_path, edit_data, model={"guidance_scale": 2.5})
    family = build_family(config_from_dict(raw))
    prompts = ["make the circle red", "a red square"]
    embeds = family.encode_prompt(prompts)
    with torch.no_grad():  # as in the pipeline's __call__ (grad mode changes the SDPA kernel)
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(prompts, max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(embeds["prompt_embeds"], ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(embeds["pooled_prompt_embeds"], ref_pooled, rtol=0, atol=0)

    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True)
    control = Image.open(edit_data.parent / "0_control.png").convert("RGB")
    try:
        pipe(image=[control, control], prompt=prompts, height=RES, width=RES, max_area=RES * RES,
             _auto_resize=False, num_inference_steps=1, guidance_scale=2.5, output_type="latent",
             max_sequence_length=T5_TOKENS,
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    (kwargs, output), = calls
    num_target = (RES // 16) ** 2
    noisy = family.unpack(kwargs["hidden_states"][:, :num_target], RES // 8, RES // 8)
    pixels = pipe.image_processor.preprocess(control, RES, RES)
    condition = family.condition(embeds, {"control_latents": [family.encode_images(pixels).repeat(2, 1, 1, 1)]})
    with torch.no_grad():
        prediction = family.predict(noisy, kwargs["timestep"], condition)
    torch.testing.assert_close(prediction, family.unpack(output[:, :num_target], RES // 8, RES // 8),
                               rtol=1e-5, atol=1e-5)
    assert kwargs["timestep"][0] == pytest.approx(1.0)  # first step: sigma 1, passed as t / 1000


def test_objective_follows_the_scheduler_config(tmp_path, t2i_data):
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    family = build_family(config_from_dict(flux_config(tmp_path, t2i_data,
                                                       training={"weighting_scheme": "logit_normal"})))
    shift = family.objective.shift
    assert shift.dynamic and family.objective.weighting_scheme == "logit_normal"
    assert shift.mu(1024) == pytest.approx(calculate_shift(1024, 256, 4096, 0.5, 1.15))
    assert family.latent_shape(64, 48) == (16, 8, 6)
    with pytest.raises(Exception, match="multiple of 16"):
        build_family(config_from_dict(flux_config(tmp_path, t2i_data, data={"resolution": 40})))


# ----------------------------------------------------------------------------------------------
# 2-3. Training through the CLI; the LoRA in the real pipeline


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, t2i_data):
    """Cache filled first, then trained with the text encoders forbidden (they must not load)."""
    import transformers

    tmp = tmp_path_factory.mktemp("flux_t2i")
    raw = flux_config(tmp, t2i_data,
                      training={"max_train_steps": 30, "batch_size": 2, "learning_rate": 1e-2},
                      lora={"rank": 8, "alpha": 8, "save_format": "both"},
                      cache={"enabled": True, "dir": str(tmp / "cache")},
                      logging={"sample_prompts": ["a red circle on a white background"],
                               "sample_num_inference_steps": 2, "sample_guidance_scale": 1.0})
    config = write_config(tmp, raw)
    assert main(["--config", str(config), "--cache"]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was loaded although the cache was filled")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.CLIPTextModel, "from_pretrained", refuse)
        patch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
        assert main(["--config", str(config)]) == 0
        run_dir = run_dir_of(raw)
        losses = fixed_noise_losses(raw, run_dir)  # cached embeddings: still no text encoder
    return run_dir, losses


def test_t2i_training_from_cache_lowers_the_loss(t2i_run):
    run_dir, (base, trained) = t2i_run
    print(f"t2i fixed-noise loss: base {base:.4f} -> trained LoRA {trained:.4f}")
    assert trained < base - 0.05, (base, trained)
    assert len(logged_losses(run_dir)) == 30
    assert (run_dir / "samples" / "step-000030.png").is_file()  # sampled from cached embeddings


def test_lora_loads_into_the_pipeline_without_warnings_and_changes_edits(t2i_run, pipe, edit_data):

    run_dir, _ = t2i_run
    control = Image.open(edit_data.parent / "0_control.png").convert("RGB")

    def generate():
        return pipe(image=control, prompt="make the circle red", height=RES, width=RES, max_area=RES * RES,
                    _auto_resize=False, num_inference_steps=2, max_sequence_length=T5_TOKENS, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    messages = load_lora_messages(pipe, run_dir / "final")
    # "No LoRA keys ... CLIPTextModel" is expected (the text encoder is not trained); nothing may
    # concern the transformer.
    problems = [m for m in unmatched_key_messages(messages) if "text_encoder" not in m]
    assert any("CLIPTextModel" in m for m in messages)  # the capture works
    assert not problems, problems
    with_lora = generate()
    assert (with_lora - base).abs().max() > 1e-3
    pipe.unload_lora_weights()
    torch.testing.assert_close(generate(), base)
    # kohya/ComfyUI layout (lora_transformer_* with alpha) gives the same model
    pipe.load_lora_weights(run_dir / "final" / "comfyui")
    torch.testing.assert_close(generate(), with_lora, atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()


def test_i2i_training_lowers_the_loss_and_samples_edits(tmp_path, edit_data):
    # The cache fills itself in the first epoch (encoders run uncached there), then serves.
    raw = flux_config(tmp_path, edit_data, training={"mode": "i2i", "max_train_steps": 20, "batch_size": 2,
                                                     "learning_rate": 1e-2},
                      lora={"rank": 8, "alpha": 8}, cache={"enabled": True, "dir": str(tmp_path / "cache")},
                      logging={"sample_prompts": ["make the circle red"],
                               "sample_control_images": [str(edit_data.parent / "0_control.png")],
                               "sample_num_inference_steps": 2, "sample_guidance_scale": 1.0})
    assert main(["--config", str(write_config(tmp_path, raw))]) == 0
    run_dir = run_dir_of(raw)
    base, trained = fixed_noise_losses(raw, run_dir)
    print(f"i2i fixed-noise loss: base {base:.4f} -> trained LoRA {trained:.4f}")
    assert trained < base - 0.05, (base, trained)
    assert (run_dir / "samples" / "step-000020.png").is_file()
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_more_than_one_control_image_is_a_clear_error(tmp_path, edit_data):
    family = build_family(config_from_dict(flux_config(tmp_path, edit_data)))
    embeds = {"prompt_embeds": torch.zeros(1, 7, 32), "pooled_prompt_embeds": torch.zeros(1, 32)}
    with pytest.raises(Exception, match="one control image"):
        family.condition(embeds, {"control_latents": [torch.zeros(1, 16, 4, 4)] * 2})


# ----------------------------------------------------------------------------------------------
# 4. Configs


@pytest.mark.parametrize("name", ["flux_kontext_t2i.yaml", "flux_kontext_i2i.yaml", "quickstart_flux_kontext.yaml"])
def test_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.family == "flux_kontext"
    assert cfg.data.resolution % 16 == 0


def test_quickstart_config_trains_on_the_tiny_model(tmp_path, t2i_data):
    out = tmp_path / "output"
    assert main(["--config", str(REPO / "configs" / "quickstart_flux_kontext.yaml"),
                 "--set", f"data.path={t2i_data}", "--set", "data.resolution=32",
                 "--set", "training.max_train_steps=2", "--set", "training.batch_size=2",
                 "--set", f"logging.output_dir={out}", "--set", "logging.sample_num_inference_steps=2"]) == 0
    run = sorted(out.glob("*/v*"))[-1]
    assert len(logged_losses(run)) == 2
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Other algorithms on this family, through the unchanged trainers (smoke tests)


def test_dpo_runs_on_flux_kontext(tmp_path):
    from glm_training.data.synthetic import make_colour_preference_pairs

    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=2, size=RES)
    raw = flux_config(tmp_path, pairs, training={"method": "dpo", "max_train_steps": 2, "batch_size": 2})
    assert main(["--config", str(write_config(tmp_path, raw))]) == 0
    rows = [json.loads(line) for line in (run_dir_of(raw) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2


def test_grpo_runs_one_step_on_flux_kontext(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    raw = flux_config(tmp_path, prompts, training={"method": "grpo", "max_train_steps": 1, "batch_size": 2},
                      grpo={"num_generations": 2, "sample_steps": 2, "noise_level": 0.9, "eval_steps": 2},
                      reward={"rewards": {"brightness": {"weight": 1.0}}})
    assert main(["--config", str(write_config(tmp_path, raw))]) == 0
    rows = [json.loads(line) for line in (run_dir_of(raw) / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    assert len(train) == 1 and train[0]["step"] == 1
    assert all(math.isfinite(v) for v in train[0].values() if isinstance(v, float))
