"""GLM-Image AR generator: CE on image tokens only, teacher forcing equals generation, AR SFT lowers
the loss without touching the DiT (and DiT SFT leaves the AR alone), `both` trains two param groups
with their own learning rates and LoRA settings, and the saved adapters load back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glm_training import cli
from glm_training.config import config_from_dict
from glm_training.data.datasets import collate, to_tensor
from glm_training.models import glm_image_ar as ar_lib
from glm_training.models.base import build_family
from glm_training.models.glm_image import AR_ADAPTER_DIR, load_glm_image_lora
from glm_training.models.glm_image_support import FixedGlmImagePipeline
from glm_training.models.tiny import ensure_tiny
from glm_training.trainers.sft import SFTTrainer

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_ar_data")
    rows = []
    for index in range(4):
        array = np.zeros((SIZE, SIZE, 3), np.uint8)
        array[..., index % 3] = 200  # flat colours: tokens an AR model can learn quickly
        Image.fromarray(array).save(root / f"img{index}.png")
        rows.append({"prompt": f"a flat colour {index}", "image": f"img{index}.png"})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "data.jsonl"


def config(tmp_path, data, component, **sections):
    raw = {
        "model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image"},
        "data": {"path": str(data), "resolution": SIZE},
        "training": {"max_train_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "checkpointing_steps": 1000,
                     "seed": 0},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "glm", "report_to": ["tensorboard"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    # What train_ar.py / train_dit.py / --train_both do: the component set on the command line.
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    if component == "both":
        return cli.build_config(cli.parse_args(["--config", str(path), "--train_both"], None), None)
    return cli.build_config(cli.parse_args(["--config", str(path)], component), component)


def test_cross_entropy_is_on_image_tokens_only():
    torch.manual_seed(0)
    prompt_len, image_len, vocab = 5, 4, 11
    labels = torch.cat([torch.full((2, prompt_len), ar_lib.IGNORE_INDEX), torch.randint(0, vocab, (2, image_len))], 1)
    logits = torch.randn(2, prompt_len + image_len, vocab)
    loss = ar_lib.masked_next_token_ce(logits, labels)
    # Formula: logits at i predict labels[i + 1]; only the image tokens count.
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([-torch.stack([logp[b, i - 1, labels[b, i]] for i in range(prompt_len, prompt_len + image_len)]).mean()
                            for b in range(2)])
    torch.testing.assert_close(loss, expected)
    changed = logits.clone()
    changed[:, :prompt_len - 1] += 100 * torch.randn_like(changed[:, :prompt_len - 1])  # prompt-token logits
    torch.testing.assert_close(ar_lib.masked_next_token_ce(changed, labels), loss, rtol=0, atol=0)
    changed[:, prompt_len - 1] += 100 * torch.randn(vocab)  # the logits that predict the first image token
    assert not torch.allclose(ar_lib.masked_next_token_ce(changed, labels), loss)


@pytest.fixture(scope="module")
def family(tmp_path_factory, data):
    return build_family(config(tmp_path_factory.mktemp("glm_ar_family"), data, "ar"))


def test_model_loss_ignores_prompt_logits_and_targets_are_the_image_tokens(family, data):
    pixels = to_tensor(Image.open(data.parent / "img0.png"))[None]
    batch = {"prompt": ["a flat colour 0"], "pixel_values": pixels}
    prompt = family.ar_prompt(batch["prompt"], SIZE, SIZE)
    assert prompt.decode_grids == [(16, 16), (1, 1)]  # preview first, then the full grid
    tokens = ar_lib.target_image_tokens(family.unwrapped("ar"), family.processor, pixels, prompt)
    assert tokens.shape == (1, 16 * 16 + 1)
    # The full-grid token is the image's own VQ token, the one the DiT side gets (upsampled).
    assert torch.equal(family.prior_tokens(pixels)[0], tokens[0, -1:].repeat(4))
    loss = family.token_sft_loss(batch)
    prompt_len = prompt.input_ids.shape[1]

    def perturb(positions):
        def hook(module, args, output):
            output = output.clone()
            output[:, positions] += 50 * torch.randn_like(output[:, positions])
            return output
        return family.unwrapped("ar").lm_head.register_forward_hook(hook)

    handle = perturb(slice(0, prompt_len - 1))
    try:
        torch.testing.assert_close(family.token_sft_loss(batch), loss, rtol=0, atol=0)
    finally:
        handle.remove()
    handle = perturb(slice(prompt_len - 1, prompt_len))
    try:
        assert not torch.allclose(family.token_sft_loss(batch), loss)
    finally:
        handle.remove()


def test_teacher_forced_logprobs_equal_generation_logprobs(family, data):
    pixels = torch.stack([to_tensor(Image.open(data.parent / f"img{i}.png")) for i in range(2)])
    prompts = ["a flat colour 0 with a 'label'", "short"]  # different lengths: left padding
    out = family.generate_image_tokens(prompts, height=SIZE, width=SIZE, seed=3)
    assert out["tokens"].shape == (2, 16 * 16 + 1)
    again = family.generate_image_tokens(prompts, height=SIZE, width=SIZE, seed=3)
    assert torch.equal(out["tokens"], again["tokens"])  # fixed seed
    forced = family.image_token_logprobs({"prompt": prompts, "pixel_values": pixels, "image_tokens": out["tokens"]})
    torch.testing.assert_close(forced, out["logprob"], rtol=1e-4, atol=1e-3)
    # Image-to-image: the source's tokens in the prompt, only the full grid is generated.
    controls = [pixels.flip(0)]
    out = family.generate_image_tokens(prompts, height=SIZE, width=SIZE, seed=3, control_pixels=controls)
    assert out["tokens"].shape == (2, 1) and out["prior_token_ids"].shape == (2, 4)
    forced = family.image_token_logprobs({"prompt": prompts, "pixel_values": pixels, "image_tokens": out["tokens"],
                                          "control_pixel_values": controls})
    torch.testing.assert_close(forced, out["logprob"], rtol=1e-4, atol=1e-3)


def module_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}


def fixed_token_loss(trainer, data_len=4) -> float:
    batch = collate([trainer.dataset[i] for i in range(data_len)])
    with torch.no_grad():
        return trainer.family.token_sft_loss(batch).mean().item()


def test_ar_sft_lowers_the_loss_and_leaves_the_dit_untouched(tmp_path, data):
    cfg = config(tmp_path, data, "ar", training={"max_train_steps": 30, "learning_rate": 1e-2},
                 lora={"rank": 8, "alpha": 8})
    assert cfg.model.component == "ar"
    trainer = SFTTrainer(cfg)
    trainer.setup()
    dit_before = module_state(trainer.family.unwrapped("dit"))
    ar_before = module_state(trainer.family.unwrapped("ar"))
    before = fixed_token_loss(trainer)
    run_dir = trainer.train()
    after = fixed_token_loss(trainer)
    print(f"GLM-Image AR SFT fixed image-token CE: {before:.4f} -> {after:.4f}")
    assert after < before - 0.5, (before, after)
    dit_after = module_state(trainer.family.unwrapped("dit"))
    assert all(torch.equal(dit_before[k], dit_after[k]) for k in dit_before)  # bitwise untouched
    assert not any(n.startswith("dit.") for n in trainer.family.trainable_state_dict())
    # Only the LoRA changed in the AR; base weights and the image tokenizer are bitwise the same.
    ar_after = module_state(trainer.family.unwrapped("ar"))
    assert all(torch.equal(ar_before[k], ar_after[k]) for k in ar_before)

    # The saved adapter is a peft adapter that loads onto the stock AR model and changes its tokens.
    from peft import PeftModel
    from transformers import GlmImageForConditionalGeneration

    adapter = run_dir / "final" / AR_ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (run_dir / "final" / "pytorch_lora_weights.safetensors").exists()
    tiny = ensure_tiny("glm_image")
    base = GlmImageForConditionalGeneration.from_pretrained(tiny, subfolder="vision_language_encoder").eval()
    prompt = trainer.family.ar_prompt(["a flat colour 1"], SIZE, SIZE)
    plain = ar_lib.generate_image_tokens(base, prompt, seed=0)["tokens"]
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    tuned = ar_lib.generate_image_tokens(peft_model, prompt, seed=0)
    assert not torch.equal(plain, tuned["tokens"])
    # The reloaded adapter gives the trained model's log-probs for the same tokens.
    trainer.family.unwrapped("ar").eval()
    forced = trainer.family.image_token_logprobs({"prompt": ["a flat colour 1"],
                                                  "pixel_values": torch.zeros(1, 3, SIZE, SIZE),
                                                  "image_tokens": tuned["tokens"]})
    torch.testing.assert_close(forced, tuned["logprob"], rtol=1e-4, atol=1e-3)


def test_dit_sft_leaves_the_ar_untouched(tmp_path, data):
    trainer = SFTTrainer(config(tmp_path, data, "dit"))
    trainer.setup()
    ar_before = module_state(trainer.family.unwrapped("ar"))
    dit_before = module_state(trainer.family.unwrapped("dit"))
    trainer.train()
    ar_after = module_state(trainer.family.unwrapped("ar"))
    assert all(torch.equal(ar_before[k], ar_after[k]) for k in ar_before)
    assert not any(n.startswith("ar.") for n in trainer.family.trainable_state_dict())
    dit_lora = {k: v for k, v in trainer.family.unwrapped("dit").state_dict().items() if "lora_B" in k}
    assert dit_lora and any(v.abs().sum() > 0 for v in dit_lora.values())  # the DiT LoRA did train
    assert all(torch.equal(dit_before[k], v) for k, v in module_state(trainer.family.unwrapped("dit")).items())


def test_both_trains_two_param_groups_and_the_pipeline_runs_with_both_adapters(tmp_path, data):
    cfg = config(tmp_path, data, "both", training={"max_train_steps": 4, "learning_rate": 5e-3},
                 optimizer={"component_lr": {"ar": 2e-3, "dit": 5e-3}},
                 lora={"rank": 4, "alpha": 4, "components": {"ar": {"rank": 2, "alpha": 2},
                                                             "dit": {"rank": 6, "target_modules": ["to_q", "to_v"]}}})
    trainer = SFTTrainer(cfg)
    trainer.setup()
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"ar": 2e-3, "dit": 5e-3}
    family = trainer.family
    assert family.unwrapped("ar").peft_config["default"].r == 2
    dit_config = family.unwrapped("dit").peft_config["default"]
    assert dit_config.r == 6 and set(dit_config.target_modules) == {"to_q", "to_v"}
    batch = collate([trainer.dataset[i] for i in range(2)])
    loss, metrics = trainer.compute_loss(batch)
    assert metrics["loss"] == pytest.approx(metrics["ar/loss"] + metrics["dit/loss"], rel=1e-5)
    loss.backward()  # gradients reach both components
    for name in ("ar", "dit"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for p in family.unwrapped(name).parameters() if p.requires_grad)
    trainer.optimizer.zero_grad()
    run_dir = trainer.train()
    final = run_dir / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / AR_ADAPTER_DIR).is_dir()

    # The stock pipeline with both adapters: the AR's prior tokens change, and sampling runs (t2i, i2i).
    pipe = FixedGlmImagePipeline.from_pretrained(ensure_tiny("glm_image"))
    pipe.set_progress_bar_config(disable=True)
    before, _, _ = pipe.generate_prior_tokens("a flat colour 2", SIZE, SIZE, device=torch.device("cpu"),
                                              generator=torch.Generator().manual_seed(0))
    assert sorted(load_glm_image_lora(pipe, final)) == ["ar", "dit"]
    after, _, _ = pipe.generate_prior_tokens("a flat colour 2", SIZE, SIZE, device=torch.device("cpu"),
                                             generator=torch.Generator().manual_seed(0))
    assert not torch.equal(before, after)
    call = dict(prompt="a flat colour 2", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=1.5,
                output_type="np", max_sequence_length=64, generator=torch.Generator().manual_seed(0))
    image = pipe(**call).images
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    call["generator"] = torch.Generator().manual_seed(0)
    edited = pipe(image=[Image.open(data.parent / "img3.png").convert("RGB")], **call).images
    assert edited.shape == (1, SIZE, SIZE, 3) and np.isfinite(edited).all()


def test_sequential_recipe_loads_the_ar_adapter_into_the_dit_run(tmp_path, data):
    """AR first, then DiT from the AR-trained weights (lora.components.ar.pretrained_weight)."""
    first = SFTTrainer(config(tmp_path / "ar", data, "ar", training={"max_train_steps": 2, "learning_rate": 1e-2}))
    first.setup()
    ar_dir = first.train() / "final" / AR_ADAPTER_DIR
    trained_ar = {k: v.clone() for k, v in first.family.unwrapped("ar").state_dict().items() if "lora_" in k}
    second = SFTTrainer(config(tmp_path / "dit", data, "dit",
                               lora={"components": {"ar": {"pretrained_weight": str(ar_dir)}}}))
    second.setup()
    loaded = {k: v for k, v in second.family.unwrapped("ar").state_dict().items() if "lora_" in k}
    assert loaded.keys() == trained_ar.keys()
    assert all(torch.equal(loaded[k], trained_ar[k]) for k in loaded)
    assert not any(p.requires_grad for p in second.family.unwrapped("ar").parameters())  # frozen
    second.train()
    after = {k: v for k, v in second.family.unwrapped("ar").state_dict().items() if "lora_" in k}
    assert all(torch.equal(after[k], trained_ar[k]) for k in after)


def test_unknown_lora_component_is_a_clear_error(tmp_path, data):
    from glm_training.config import ConfigError

    cfg = config(tmp_path, data, "dit", lora={"components": {"unet": {"rank": 2}}})
    family = build_family(cfg)
    with pytest.raises(ConfigError, match=r"lora.components: \['unet'\]"):
        family.setup_training()


def test_example_configs_load():
    from pathlib import Path

    import yaml

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("glm_image_*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        config_from_dict(yaml.safe_load(path.read_text()), str(path))
