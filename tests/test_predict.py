"""glm_training.predict: a hand-made run folder (config.yaml + final/ LoRA with perturbed weights)
gives the same images as the stock pipeline with `load_lora_weights` at the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glm_training.config import ConfigError, config_from_dict
from glm_training.models.base import build_family
from glm_training.predict import load, main

SIZE = {"sdxl": 32, "flux_kontext": 32, "qwen_image": 32, "glm_image": 32, "bagel": 32, "qwen_image_edit": 32,
        "qwen_image_edit_plus": 32}
STEPS, SEED = 2, 7


def make_run(tmp_path: Path, family: str, **lora) -> Path:
    """A run folder as training leaves it: config.yaml and final/ with a LoRA whose weights are
    all non-zero (alpha != rank, so a loader that ignores alpha would differ)."""
    raw = {"model": {"family": family, "pretrained_model_name_or_path": f"tiny:{family}"},
           "data": {"path": str(tmp_path), "resolution": SIZE[family]},
           "training": {"seed": 0, "mode": "i2i" if family.startswith("qwen_image_edit") else "t2i"},
           "lora": {"rank": 4, "alpha": 8, **lora},
           "logging": {"output_dir": str(tmp_path / "output"), "project": "p", "sample_num_inference_steps": STEPS,
                       "sample_guidance_scale": 1.0, "sample_seed": SEED}}
    if family == "glm_image":
        raw["model"]["component"] = "dit"
    cfg = config_from_dict(raw)
    trained = build_family(cfg)
    trained.setup_training()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in trained.components().values():
            for p in module.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    run = tmp_path / "output" / "p" / "v0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    trained.save_adapter(run / "final")
    return run


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def assert_same_image(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size
    assert np.array_equal(pixels(a), pixels(b))  # bitwise: the same pipeline call on the same weights


def pipeline_with_lora(family: str, final: Path):
    """What a diffusers user does: from_pretrained + load_lora_weights (GLM-Image: its two adapters)."""
    from glm_training.models.tiny import ensure_tiny

    folder = ensure_tiny(family)
    if family == "glm_image":
        from glm_training.models.glm_image import load_glm_image_lora
        from glm_training.models.glm_image_support import FixedGlmImagePipeline

        pipe = FixedGlmImagePipeline.from_pretrained(folder)
        load_glm_image_lora(pipe, final)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.load_lora_weights(final)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family: str, prompt: str, predictor) -> dict:
    size = SIZE[family]
    common = dict(prompt=prompt, height=size, width=size, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(SEED))
    if family == "sdxl":
        return {**common, "guidance_scale": 1.0}
    if family == "flux_kontext":  # Kontext's documented small-size call (see LIBRARY-NOTES)
        return {**common, "guidance_scale": 1.0, "max_area": size * size, "_auto_resize": False,
                "max_sequence_length": predictor.family.max_sequence_length}
    if family == "qwen_image":
        return {**common, "true_cfg_scale": 1.0, "max_sequence_length": predictor.family.max_sequence_length}
    if family == "glm_image":
        return {**common, "prompt": [prompt], "guidance_scale": 1.0,
                "max_sequence_length": predictor.family.max_sequence_length}
    raise KeyError(family)


@pytest.mark.parametrize("family", ["sdxl", "flux_kontext", "qwen_image", "glm_image"])
def test_predict_equals_the_pipeline_with_load_lora_weights(tmp_path, family):
    run = make_run(tmp_path, family)
    prompt = 'a red circle that says "HI"'
    predictor = load(run)
    assert predictor.weights == run / "final"
    ours = predictor.generate(prompt)[0]  # steps / guidance / seed from the run's logging.sample_*
    pipe = pipeline_with_lora(family, run / "final")
    theirs = pipe(**call_kwargs(family, prompt, predictor)).images[0]
    assert_same_image(ours, theirs)
    # ... and the LoRA matters: the base model gives another image for the same seed
    with predictor.base():
        base = predictor.generate(prompt)[0]
    assert np.abs(pixels(base) - pixels(ours)).max() > 2


def test_flux_kontext_edit_through_the_cli_with_compare(tmp_path):
    run = make_run(tmp_path, "flux_kontext")
    source = tmp_path / "source.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(source)
    out = tmp_path / "preds"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make it blue\n\nturn it upside down\n")
    assert main(["--run", str(run / "final"), "--prompts", str(prompts), "--image", str(source), "--seed", "3", "4",
                 "--steps", "2", "--guidance", "2.5", "--out", str(out), "--compare"]) == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["000-make-it-blue-seed3.png", "000-make-it-blue-seed4.png",
                    "001-turn-it-upside-down-seed3.png", "001-turn-it-upside-down-seed4.png"]
    settings = json.loads((out / "000-make-it-blue-seed4.json").read_text())
    assert settings["seed"] == 4 and settings["steps"] == 2 and settings["guidance"] == 2.5
    assert settings["images"] == [str(source.resolve())] and settings["weights"] == str(run / "final")

    pipe = pipeline_with_lora("flux_kontext", run / "final")
    theirs = pipe(image=Image.open(source).convert("RGB"), prompt="make it blue", height=32, width=32,
                  num_inference_steps=2, guidance_scale=2.5, max_area=32 * 32, _auto_resize=False,
                  max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert_same_image(Image.open(out / "000-make-it-blue-seed4.png"), theirs)

    grid = Image.open(out / "compare.png")
    assert grid.size[0] == 4 * 32  # one column per (prompt, seed), rows: base then trained
    meta = json.loads((out / "compare.json").read_text())
    assert meta["rows"] == ["base", "trained"] and len(meta["columns"]) == 4
    row_height = grid.size[1] // 2
    trained_tile = grid.crop((32, row_height, 64, row_height + 32))
    assert_same_image(trained_tile, Image.open(out / "000-make-it-blue-seed4.png"))
    pipe.unload_lora_weights()
    base = pipe(image=Image.open(source).convert("RGB"), prompt="make it blue", height=32, width=32,
                num_inference_steps=2, guidance_scale=2.5, max_area=32 * 32, _auto_resize=False,
                max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert_same_image(grid.crop((32, 0, 64, 32)), base)


@pytest.mark.parametrize("family", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_qwen_edit_predict_equals_the_pipeline_for_sources_of_another_size(tmp_path, family):
    """The stock edit pipelines resize the source to their own target areas (about 1 Mpx for the
    VAE; Plus: 384x384 for the VL encoder): predict hands them the source as given, so a source
    whose size differs from the output (and is no multiple of 32) gives the pipeline user's image."""
    run = make_run(tmp_path, family)
    source = tmp_path / "source.png"
    Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)).save(source)
    predictor = load(run)
    ours = predictor.generate("make it blue", images=[source], guidance=2.0)[0]
    pipe = pipeline_with_lora(family, run / "final")
    size = SIZE[family]
    theirs = pipe(image=Image.open(source).convert("RGB"), prompt="make it blue", negative_prompt="", height=size,
                  width=size, num_inference_steps=STEPS, true_cfg_scale=2.0,
                  generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert ours.size == (size, size)
    assert_same_image(ours, theirs)


def test_base_and_lora_without_run_config_reads_the_lora_metadata(tmp_path):
    run = make_run(tmp_path, "sdxl")
    lonely = tmp_path / "elsewhere" / "my_lora.safetensors"  # a LoRA file with no config.yaml near it
    lonely.parent.mkdir()
    lonely.write_bytes((run / "final" / "pytorch_lora_weights.safetensors").read_bytes())
    from_file = load(base="tiny:sdxl", lora=lonely)
    assert from_file.cfg.lora.rank == 4 and from_file.cfg.lora.alpha == 8
    from_run = load(run)
    settings = dict(steps=2, guidance=1.0, seed=0, height=32, width=32)
    assert_same_image(from_file.generate("a cat", **settings)[0], from_run.generate("a cat", **settings)[0])


def test_checkpoint_folders_and_bagel(tmp_path):
    from glm_training.models.bagel.generate import BagelSampler
    from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer
    from glm_training.models.bagel.lora import load_lora
    from glm_training.models.tiny import ensure_tiny

    run = make_run(tmp_path, "bagel")
    checkpoint = run / "checkpoint-5"
    (run / "final").rename(checkpoint)
    (checkpoint / "trainer_state.json").write_text("{}")
    predictor = load(run)  # no final/: the newest complete checkpoint
    assert predictor.weights == checkpoint
    ours = predictor.generate("a red square", steps=3, guidance=2.0, seed=5)[0]
    folder = ensure_tiny("bagel")
    model = load_bagel(folder, dtype=torch.float32, device="cpu")
    tokenizer, special = load_bagel_tokenizer(folder)
    load_lora(model, checkpoint)
    theirs = BagelSampler(model.eval(), tokenizer, special).generate(
        "a red square", height=32, width=32, num_timesteps=3, cfg_text_scale=2.0, seed=5)
    assert_same_image(ours, theirs)
    answer = predictor.answer("what colour is it?", max_new_tokens=4)[0]
    assert answer == BagelSampler(model, tokenizer, special).generate_text("what colour is it?", max_new_tokens=4)


def test_bagel_text_answers_through_the_cli(tmp_path):
    """`--answer`: greedy text answers about an image, written as .txt with the settings in a
    .json; equal to the sampler's own greedy decoding with the run's LoRA and image sizes."""
    from glm_training.models.bagel.generate import BagelSampler
    from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer
    from glm_training.models.bagel.lora import load_lora
    from glm_training.models.bagel.packing import PackingConfig
    from glm_training.models.tiny import ensure_tiny

    run = make_run(tmp_path, "bagel")
    source = tmp_path / "source.png"
    Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)).save(source)
    out = tmp_path / "answers"
    assert main(["--run", str(run), "--prompt", "what colour is it?", "--prompt", "how many shapes?",
                 "--image", str(source), "--answer", "--max-new-tokens", "6", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000-what-colour-is-it.json", "000-what-colour-is-it.txt",
                                                     "001-how-many-shapes.json", "001-how-many-shapes.txt"]
    settings = json.loads((out / "001-how-many-shapes.json").read_text())
    assert settings["prompt"] == "how many shapes?" and settings["max_new_tokens"] == 6
    assert settings["images"] == [str(source.resolve())] and settings["weights"] == str(run / "final")

    folder = ensure_tiny("bagel")
    model = load_bagel(folder, dtype=torch.float32, device="cpu")
    tokenizer, special = load_bagel_tokenizer(folder)
    load_lora(model, run / "final")
    size = SIZE["bagel"]  # the run's data.resolution sizes the image, as in training
    packing = PackingConfig.for_model(model.bagel_config, vae_max_size=size, vae_min_size=size, vit_max_size=size,
                                      vit_min_size=size)
    sampler = BagelSampler(model.eval(), tokenizer, special, packing=packing)
    for stem, prompt in (("000-what-colour-is-it", "what colour is it?"), ("001-how-many-shapes", "how many shapes?")):
        expected = sampler.generate_text(prompt, [Image.open(source).convert("RGB")], max_new_tokens=6)
        assert (out / f"{stem}.txt").read_text() == expected + "\n"
        assert json.loads((out / f"{stem}.json").read_text())["answer"] == expected
        assert expected and expected != sampler.generate_text(prompt, max_new_tokens=6)  # the image is read
    # Families without a text side refuse with the flag named.
    sdxl = make_run(tmp_path / "sdxl", "sdxl")
    with pytest.raises(ConfigError, match="gives no text answers"):
        load(sdxl).answer("what is it?")


def test_errors_name_the_argument(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--run: .*does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="--family"):
        load(base=str(tmp_path / "empty"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {family: sdxl, pretrained_model_name_or_path: 'tiny:sdxl'}\n"
                                     "data: {path: .}\n")
    with pytest.raises(FileNotFoundError, match="neither final/ nor a complete checkpoint"):
        load(run)
    assert main(["--run", str(run), "--prompt", "x"]) == 2
    assert "neither final/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", str(run)])  # no prompt
