"""Qwen-Image / Qwen-Image-Edit / Qwen-Image-Edit-Plus families: conditioning equals what the diffusers
pipelines build (prompt embeddings + mask, packing, img_shapes, control tokens, the transformer call
of a denoising step), SFT through the CLI lowers the loss (t2i, edit, edit with two control images),
the LoRA loads into the real pipelines without warnings and changes their output, configs validate."""

from __future__ import annotations

import json
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
FAMILIES = ("qwen_image", "qwen_image_edit", "qwen_image_edit_plus")


def qwen_config(tmp_path: Path, data_path: Path, family: str = "qwen_image", **sections) -> dict:
    raw = {
        "model": {"family": family, "pretrained_model_name_or_path": f"tiny:{family}"},
        "data": {"path": str(data_path), "resolution": RES},
        "training": {"max_train_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "checkpointing_steps": 1000,
                     "seed": 0, "mode": "t2i" if family == "qwen_image" else "i2i"},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(tmp_path / "output"), "project": family, "report_to": ["tensorboard"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_config(tmp_path: Path, raw: dict) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def load_lora_problems(pipe, path: Path) -> list[str]:
    """Load a LoRA and return every warning that speaks of unmatched keys."""
    return unmatched_key_messages(load_lora_messages(pipe, path))


def record_first_transformer_call(pipe, **call_kwargs) -> tuple[dict, torch.Tensor]:
    """(kwargs, output) of the transformer in the first denoising step of a real pipeline call
    (2 steps: with one, the scheduler's shift_terminal stretch divides by zero)."""
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True)
    try:
        pipe(num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0), **call_kwargs)
    finally:
        hook.remove()
    return calls[0]


# ----------------------------------------------------------------------------------------------
# Data and pipelines


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory) -> Path:
    from glm_training.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("qwen_shapes"), count=4, size=RES, seed=0)


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory) -> Path:
    """Manifest with two control images per sample: the shape in blue (control 1), the background
    colour alone (control 2); the target is the same shape, same place, in red. The Edit family
    reads the same files through a manifest that keeps only the first control image."""
    from glm_training.data.synthetic import draw_shape

    root = tmp_path_factory.mktemp("qwen_edit")
    rng = random.Random(0)
    rows = []
    for i in range(4):
        shape, background = rng.choice(["circle", "square", "triangle"]), rng.choice(["white", "black"])
        state = rng.getstate()
        for colour, role in (("blue", "control"), ("red", "target")):
            rng.setstate(state)
            draw_shape(shape, colour, background, RES, rng).save(root / f"{i}_{role}.png")
        Image.new("RGB", (RES, RES), background).save(root / f"{i}_background.png")
        rows.append({"prompt": f"make the {shape} red", "image": f"{i}_target.png",
                     "control_images": [f"{i}_control.png", f"{i}_background.png"]})
    (root / "plus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "edits.jsonl").write_text(
        "\n".join(json.dumps({**r, "control_images": r["control_images"][:1]}) for r in rows) + "\n")
    return root


def _pipe(name: str):
    import diffusers

    from glm_training.models.tiny import ensure_tiny

    cls = {"qwen_image": "QwenImagePipeline", "qwen_image_edit": "QwenImageEditPipeline",
           "qwen_image_edit_plus": "QwenImageEditPlusPipeline"}[name]
    return getattr(diffusers, cls).from_pretrained(ensure_tiny(name))


@pytest.fixture(scope="module")
def pipe():
    return _pipe("qwen_image")


@pytest.fixture(scope="module")
def edit_pipe():
    return _pipe("qwen_image_edit")


@pytest.fixture(scope="module")
def plus_pipe():
    return _pipe("qwen_image_edit_plus")


# ----------------------------------------------------------------------------------------------
# 1. Conditioning equals the pipelines'


def test_t2i_prompt_embeds_packing_and_predict_equal_the_pipeline(tmp_path, t2i_data, pipe):
    family = build_family(config_from_dict(qwen_config(tmp_path, t2i_data)))
    prompts = ["a red circle on a white background", "a cat"]
    embeds = family.encode_prompt(prompts)
    with torch.no_grad():
        ref_embeds, ref_mask = pipe.encode_prompt(prompts, max_sequence_length=512)
    torch.testing.assert_close(embeds["prompt_embeds"], ref_embeds, rtol=0, atol=0)
    assert torch.equal(embeds["prompt_embeds_mask"], ref_mask)
    assert ref_mask.sum(1).tolist() == [7 + 5, 2 + 5]  # prompt + template suffix tokens (start dropped)

    latents = torch.randn(2, 16, 4, 6)
    packed = family.pack(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 2, 16, 4, 6))
    assert torch.equal(family.unpack(packed, 4, 6), latents)
    assert torch.equal(family.unpack(packed, 4, 6), pipe._unpack_latents(packed, 32, 48, 8)[:, :, 0])

    kwargs, output = record_first_transformer_call(pipe, prompt=prompts, height=RES, width=RES, true_cfg_scale=1.0)
    condition = family.condition(embeds, {})
    assert torch.equal(condition["encoder_hidden_states_mask"], kwargs["encoder_hidden_states_mask"])
    assert kwargs["img_shapes"] == family.img_shapes(2, [(RES // 8, RES // 8)]) == [[(1, 2, 2)]] * 2
    noisy = family.unpack(kwargs["hidden_states"], RES // 8, RES // 8)
    with torch.no_grad():
        prediction = family.predict(noisy, kwargs["timestep"], condition)
    torch.testing.assert_close(prediction, family.unpack(output, RES // 8, RES // 8), rtol=1e-5, atol=1e-5)
    assert kwargs["timestep"][0] == pytest.approx(1.0)  # first step: sigma 1, passed as t / 1000
    # One prompt: nothing padded, so the pipeline (and the family) pass no mask at all.
    assert family.condition(family.encode_prompt(["a cat"]), {})["encoder_hidden_states_mask"] is None


def test_edit_prompt_embeds_control_tokens_and_predict_equal_the_pipeline(tmp_path, edit_data, edit_pipe):
    from glm_training.data.datasets import to_tensor

    raw = qwen_config(tmp_path, edit_data / "edits.jsonl", family="qwen_image_edit")
    family = build_family(config_from_dict(raw))
    prompts = ["make the circle red", "make it red"]
    controls = [Image.open(edit_data / f"{i}_control.png").convert("RGB") for i in (0, 1)]
    pixels = torch.stack([to_tensor(c) for c in controls])  # what the dataset hands the family
    embeds = family.encode_prompt(prompts, [pixels])
    with torch.no_grad():
        ref_embeds, ref_mask = edit_pipe.encode_prompt(prompts, image=controls)
    torch.testing.assert_close(embeds["prompt_embeds"], ref_embeds, rtol=0, atol=0)
    assert torch.equal(embeds["prompt_embeds_mask"], ref_mask)
    # the vision tokens are in it: another control image gives other embeddings
    other = family.encode_prompt(prompts, [pixels.flip(0)])["prompt_embeds"]
    assert not torch.allclose(other, embeds["prompt_embeds"])

    # The pipeline's denoising step, with the control image kept at the sampling size as sample() does.
    with family._control_size(RES, RES):
        kwargs, output = record_first_transformer_call(edit_pipe, image=controls, prompt=prompts, height=RES,
                                                     width=RES, true_cfg_scale=1.0)
    condition = family.condition(embeds, {"control_latents": [family.encode_images(pixels)]})
    num_target = (RES // 16) ** 2
    torch.testing.assert_close(condition["control_tokens"], kwargs["hidden_states"][:, num_target:])
    assert kwargs["img_shapes"] == family.img_shapes(2, [(4, 4), *condition["control_sizes"]]) \
        == [[(1, 2, 2), (1, 2, 2)]] * 2
    noisy = family.unpack(kwargs["hidden_states"][:, :num_target], RES // 8, RES // 8)
    with torch.no_grad():
        prediction = family.predict(noisy, kwargs["timestep"], condition)
    torch.testing.assert_close(prediction, family.unpack(output[:, :num_target], RES // 8, RES // 8),
                               rtol=1e-5, atol=1e-5)


def test_edit_plus_two_controls_equal_the_pipeline(tmp_path, edit_data, plus_pipe):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    from glm_training.data.datasets import to_tensor

    raw = qwen_config(tmp_path, edit_data / "plus.jsonl", family="qwen_image_edit_plus")
    family = build_family(config_from_dict(raw))
    prompt = "make the circle red"
    controls = [Image.open(edit_data / name).convert("RGB") for name in ("0_control.png", "0_background.png")]
    pixels = [to_tensor(c)[None] for c in controls]
    embeds = family.encode_prompt([prompt], pixels)
    # As QwenImageEditPlusPipeline.__call__: each image resized to 384x384 area, "Picture N:" slots.
    w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, 1.0)
    with torch.no_grad():
        ref_embeds, _ = plus_pipe.encode_prompt([prompt], image=[plus_pipe.image_processor.resize(c, h, w)
                                                                 for c in controls])
    torch.testing.assert_close(embeds["prompt_embeds"], ref_embeds, rtol=0, atol=0)

    with family._control_size(RES, RES):
        kwargs, output = record_first_transformer_call(plus_pipe, image=controls, prompt=prompt, height=RES,
                                                     width=RES, true_cfg_scale=1.0)
    condition = family.condition(embeds, {"control_latents": [family.encode_images(p) for p in pixels]})
    assert kwargs["img_shapes"] == [[(1, 2, 2), (1, 2, 2), (1, 2, 2)]]
    num_target = (RES // 16) ** 2
    torch.testing.assert_close(condition["control_tokens"], kwargs["hidden_states"][:, num_target:])
    noisy = family.unpack(kwargs["hidden_states"][:, :num_target], RES // 8, RES // 8)
    with torch.no_grad():
        prediction = family.predict(noisy, kwargs["timestep"], condition)
    torch.testing.assert_close(prediction, family.unpack(output[:, :num_target], RES // 8, RES // 8),
                               rtol=1e-5, atol=1e-5)


def test_objective_latents_and_errors(tmp_path, t2i_data, edit_data, pipe):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    family = build_family(config_from_dict(qwen_config(tmp_path, t2i_data,
                                                       training={"weighting_scheme": "logit_normal"})))
    shift = family.objective.shift
    assert shift.dynamic and family.objective.weighting_scheme == "logit_normal"
    sched = pipe.scheduler.config
    assert shift.mu(1024) == pytest.approx(calculate_shift(
        1024, sched["base_image_seq_len"], sched["max_image_seq_len"], sched["base_shift"], sched["max_shift"]))
    assert family.latent_shape(64, 48) == (16, 8, 6)
    # latents: the VAE mode, normalised with latents_mean / latents_std (as the edit pipeline's _encode_vae_image)
    pixels = to_pixels(edit_data / "0_control.png")
    with torch.no_grad():
        ref = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        latents = family.encode_images(pixels)
        torch.testing.assert_close(latents, ((ref - mean) / std)[:, :, 0])
        decoded = family.decode_latents(latents)
        torch.testing.assert_close(decoded, pipe.vae.decode(ref).sample[:, :, 0])
    with pytest.raises(Exception, match="multiple of 16"):
        build_family(config_from_dict(qwen_config(tmp_path, t2i_data, data={"resolution": 40})))
    with pytest.raises(Exception, match="text-to-image"):
        family.condition(family.collate_prompt_embeds([{"prompt_embeds": torch.zeros(1, 3, 32),
                                                        "prompt_embeds_mask": torch.ones(1, 3)}]),
                         {"control_latents": [latents]})


def to_pixels(path: Path) -> torch.Tensor:
    from glm_training.data.datasets import to_tensor

    return to_tensor(Image.open(path).convert("RGB"))[None]


def test_collate_pads_variable_length_prompts_like_the_pipeline(tmp_path, t2i_data, pipe):
    """Cached per-sample embeddings, collated, equal one batched pipeline encode."""
    family = build_family(config_from_dict(qwen_config(tmp_path, t2i_data)))
    prompts = ["a cat", "a red circle on a white background", "a dog on the left"]
    singles = [family.encode_prompt([p]) for p in prompts]
    collated = family.collate_prompt_embeds(singles)
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(prompts, max_sequence_length=512)
    assert torch.equal(collated["prompt_embeds_mask"], ref_mask)
    valid = ref_mask.bool()
    torch.testing.assert_close(collated["prompt_embeds"][valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (collated["prompt_embeds"][~valid] == 0).all()


# ----------------------------------------------------------------------------------------------
# 2-3. Training through the CLI; the LoRA in the real pipelines


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, t2i_data):
    """Cache filled first, then trained with the text encoder forbidden (it must not load)."""
    import transformers

    tmp = tmp_path_factory.mktemp("qwen_t2i")
    raw = qwen_config(tmp, t2i_data,
                      training={"max_train_steps": 20, "batch_size": 2, "learning_rate": 1e-2},
                      lora={"rank": 8, "alpha": 8, "save_format": "both"},
                      cache={"enabled": True, "dir": str(tmp / "cache")},
                      logging={"sample_prompts": ["a red circle on a white background"], "sample_steps": 20,
                               "sample_num_inference_steps": 2, "sample_guidance_scale": 2.0})
    config = write_config(tmp, raw)
    assert main(["--config", str(config), "--cache"]) == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the Qwen2.5-VL text encoder was loaded although the cache was filled")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", refuse)
        assert main(["--config", str(config)]) == 0
        run_dir = run_dir_of(raw)
        losses = fixed_noise_losses(raw, run_dir)  # cached embeddings: still no text encoder
    return run_dir, losses


def test_t2i_training_from_cache_lowers_the_loss(t2i_run):
    run_dir, (base, trained) = t2i_run
    print(f"qwen_image t2i fixed-noise loss: base {base:.4f} -> trained LoRA {trained:.4f}")
    assert trained < base - 0.05, (base, trained)
    assert len(logged_losses(run_dir)) == 20
    # sampled with true CFG from cached prompt + negative embeddings
    assert (run_dir / "samples" / "step-000020.png").is_file()


def test_t2i_lora_loads_into_the_pipeline_without_warnings_and_changes_output(t2i_run, pipe):
    run_dir, _ = t2i_run

    def generate():
        return pipe(prompt="a red circle on a white background", height=RES, width=RES, num_inference_steps=2,
                    true_cfg_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    base = generate()
    assert not load_lora_problems(pipe, run_dir / "final")
    with_lora = generate()
    assert (with_lora - base).abs().max() > 1e-3
    pipe.unload_lora_weights()
    torch.testing.assert_close(generate(), base)
    # kohya/ComfyUI layout (lora_unet_* with alpha) gives the same model
    assert not load_lora_problems(pipe, run_dir / "final" / "comfyui")
    torch.testing.assert_close(generate(), with_lora, atol=1e-5, rtol=1e-5)
    pipe.unload_lora_weights()


@pytest.mark.parametrize("family,manifest", [("qwen_image_edit", "edits.jsonl"),
                                             ("qwen_image_edit_plus", "plus.jsonl")])
def test_edit_training_lowers_the_loss_and_the_lora_edits_in_the_pipeline(tmp_path, edit_data, family, manifest,
                                                                          edit_pipe, plus_pipe):
    n_controls = 1 if family == "qwen_image_edit" else 2
    controls = [str(edit_data / "0_control.png"), str(edit_data / "0_background.png")][:n_controls]
    raw = qwen_config(tmp_path, edit_data / manifest, family=family,
                      training={"max_train_steps": 16, "batch_size": 2, "learning_rate": 1e-2},
                      lora={"rank": 8, "alpha": 8},
                      cache={"enabled": True, "dir": str(tmp_path / "cache")},
                      logging={"sample_prompts": ["make the circle red"], "sample_control_images": controls[:1],
                               "sample_steps": 16, "sample_num_inference_steps": 2, "sample_guidance_scale": 1.0})
    assert main(["--config", str(write_config(tmp_path, raw))]) == 0
    run_dir = run_dir_of(raw)
    base, trained = fixed_noise_losses(raw, run_dir)
    print(f"{family} fixed-noise loss: base {base:.4f} -> trained LoRA {trained:.4f}")
    assert trained < base - 0.05, (base, trained)
    assert len(logged_losses(run_dir)) == 16
    assert (run_dir / "samples" / "step-000016.png").is_file()

    pipeline = edit_pipe if family == "qwen_image_edit" else plus_pipe
    images = [Image.open(p).convert("RGB") for p in controls]
    module = __import__(pipeline.__class__.__module__, fromlist=["calculate_dimensions"])
    original = module.calculate_dimensions

    def generate():
        # keep the ~1 Mpx control rescale of the edit pipelines small on CPU (module-level knob)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "calculate_dimensions",
                          lambda area, ratio: original(min(area, RES * RES), ratio))
            return pipeline(image=images if n_controls > 1 else images[0], prompt="make the circle red",
                            height=RES, width=RES, num_inference_steps=2, true_cfg_scale=1.0, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images

    base_image = generate()
    assert not load_lora_problems(pipeline, run_dir / "final")
    try:
        assert (generate() - base_image).abs().max() > 1e-3
    finally:
        pipeline.unload_lora_weights()


def test_dpo_and_grpo_run_on_the_edit_family(tmp_path, edit_data):
    """The generic preference and reward trainers on Qwen-Image-Edit (control images in both):
    DPO starts at log 2 (policy == reference), GRPO rolls out and logs rewards; all finite."""
    import math

    pairs = [{"prompt": f"make the shape red {i}", "chosen": f"{i}_target.png", "rejected": f"{i}_control.png",
              "control_images": [f"{i}_control.png"]} for i in range(4)]
    (edit_data / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    prompts = [{"prompt": "make the shape red", "source_image": f"{i}_control.png"} for i in range(2)]
    (edit_data / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")

    dpo = qwen_config(tmp_path / "dpo", edit_data / "pairs.jsonl", family="qwen_image_edit",
                      training={"method": "dpo", "max_train_steps": 2, "batch_size": 2})
    assert main(["--config", str(write_config(tmp_path, dpo))]) == 0
    rows = [json.loads(line) for line in (run_dir_of(dpo) / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)

    grpo = qwen_config(tmp_path / "grpo", edit_data / "prompts.jsonl", family="qwen_image_edit",
                       training={"method": "grpo", "max_train_steps": 1, "batch_size": 4},
                       grpo={"num_generations": 2, "sample_steps": 2, "eval_steps": 2, "noise_level": 0.7},
                       reward={"rewards": {"brightness": {"weight": 1.0}}})
    assert main(["--config", str(write_config(tmp_path, grpo))]) == 0
    rows = [json.loads(line) for line in (run_dir_of(grpo) / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(row.get("reward/total_mean", float("nan"))) for row in rows)


def test_edit_family_needs_its_control_images(tmp_path, edit_data):
    family = build_family(config_from_dict(qwen_config(tmp_path, edit_data / "edits.jsonl", family="qwen_image_edit")))
    embeds = {"prompt_embeds": torch.zeros(1, 5, 32), "prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(Exception, match="qwen_image_edit_plus"):
        family.condition(embeds, {"control_latents": [torch.zeros(1, 16, 4, 4)] * 2})
    # no controls: a micro-batch that data.control_dropout trains text-to-image
    assert family.condition(embeds, {})["control_tokens"] is None
    # ... which Qwen-Image-Edit's template cannot encode (an empty image slot); Edit-Plus can.
    with pytest.raises(Exception, match="control_dropout"):
        family.encode_prompt(["make it red"], None)


# ----------------------------------------------------------------------------------------------
# 4. Configs


@pytest.mark.parametrize("name,family", [("qwen_image_t2i.yaml", "qwen_image"),
                                         ("qwen_image_edit_i2i.yaml", "qwen_image_edit"),
                                         ("qwen_image_edit_plus_i2i.yaml", "qwen_image_edit_plus"),
                                         ("quickstart_qwen_image.yaml", "qwen_image")])
def test_configs_validate(name, family):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.family == family
    assert cfg.data.resolution % 16 == 0


def test_quickstart_config_trains_on_the_tiny_model(tmp_path, t2i_data):
    out = tmp_path / "output"
    assert main(["--config", str(REPO / "configs" / "quickstart_qwen_image.yaml"),
                 "--set", f"data.path={t2i_data}", "--set", "data.resolution=32",
                 "--set", "training.max_train_steps=2", "--set", "training.batch_size=2",
                 "--set", f"logging.output_dir={out}", "--set", "logging.sample_num_inference_steps=2"]) == 0
    run = sorted(out.glob("*/v*"))[-1]
    assert len(logged_losses(run)) == 2
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
