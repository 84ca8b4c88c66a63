"""BAGEL through the framework: train.py-style SFT from a config, LoRA saved and reloaded."""

import json

import torch
from PIL import Image

from glm_training.config import config_from_dict
from glm_training.models.bagel.generate import BagelSampler
from glm_training.models.base import build_family
from glm_training.trainers.sft import SFTTrainer


def write_data(root):
    rows = []
    for index, colour in enumerate(["red", "blue", "green", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(root / f"{colour}.png")
        rows.append({"text_prompt": f"a {colour} square", "image_path": f"{colour}.png"})
        rows.append({"conversations": [
            {"role": "user", "type": "image", "image_path": f"{colour}.png"},
            {"role": "user", "type": "text", "content": "which colour is this?"},
            {"role": "assistant", "type": "text", "content": colour}]})
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def config(tmp_path, data, bagel=None, **training):
    return config_from_dict({
        "bagel": bagel or {},
        "model": {"family": "bagel", "pretrained_model_name_or_path": "tiny:bagel", "component": "both"},
        "data": {"path": str(data), "resolution": 16},
        "training": {"max_train_steps": 24, "batch_size": 2, "learning_rate": 3e-3, "checkpointing_steps": 100,
                     **training},
        "lora": {"rank": 8, "alpha": 8},
        "logging": {"output_dir": str(tmp_path / "out"), "project": "bagel", "report_to": [],
                    "sample_prompts": ["a red square"], "sample_num_inference_steps": 3},
    })


def test_bagel_sft_lowers_both_losses_and_the_lora_reloads(tmp_path):
    data = write_data(tmp_path)
    trainer = SFTTrainer(config(tmp_path, data))
    trainer.setup()
    everything = {"index": list(range(8)), "sample": [trainer.dataset[i]["sample"] for i in range(8)]}

    def fixed_losses():
        with torch.no_grad():
            return trainer.family.sft_loss(everything, seed=123)[1]

    before = fixed_losses()
    run = trainer.train()
    after = fixed_losses()
    assert (run / "samples" / "step-000024.png").is_file()  # sampling during training
    for key in ("text_ce", "image_mse"):
        assert after[key] < 0.9 * before[key], (key, before, after)
    family = build_family(config(tmp_path, data))
    family.setup_training()
    family.load_adapter_weights(str(run / "final"))
    trained = trainer.family.trainable_state_dict()
    for key, value in family.trainable_state_dict().items():
        torch.testing.assert_close(value, trained[key])
    sampler = BagelSampler(family.model, family.tokenizer, family.special)
    image = sampler.generate("a red square", height=16, width=16, num_timesteps=3, seed=0, output_type="pt")
    assert torch.isfinite(image).all()


def test_loss_weights_are_applied(tmp_path):
    data = write_data(tmp_path)
    trainer = SFTTrainer(config(tmp_path, data, bagel={"text_loss_weight": 0.0, "image_loss_weight": 2.0},
                                max_train_steps=1))
    trainer.setup()
    batch = {"index": [0, 1], "sample": [trainer.dataset[0]["sample"], trainer.dataset[1]["sample"]]}
    loss, metrics = trainer.compute_loss(batch)
    assert loss.item() == __import__("pytest").approx(2.0 * metrics["image_mse"], rel=1e-5)


def test_per_token_means_span_the_accumulation_window(tmp_path):
    """With gradient accumulation each loss token of the optimizer step weighs the same (the
    official recipe's mean over the step's tokens), however the tokens split between micro-batches:
    the window's gradient equals that of the pooled per-token means."""
    data = write_data(tmp_path)
    trainer = SFTTrainer(config(tmp_path, data, max_train_steps=1, batch_size=1, gradient_accumulation_steps=2))
    trainer.setup()
    family, part = trainer.family, trainer.parts[0]
    # A text-to-image row and a conversation: unequal text and image token counts.
    batches = [{"index": [i], "sample": [trainer.dataset[i]["sample"]]} for i in (0, 1)]
    seeds = [part.batch_seed(b, 0) for b in batches]
    params = [p for p in family.modules["bagel"].parameters() if p.requires_grad]

    def gradients(loss_fn):
        for p in params:
            p.grad = None
        loss_fn()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    def window():
        trainer.start_window(batches, [0, 0])
        for batch in batches:
            (trainer.compute_loss(batch)[0] * 0.5).backward()

    def pooled():
        outs = [family.modules["bagel"](family.pack(b, s), generator=torch.Generator().manual_seed(s))
                for b, s in zip(batches, seeds)]
        counts = [(int(o["n_text_tokens"]), int(o["n_image_tokens"])) for o in outs]
        assert counts[0] != counts[1]
        text = sum(o["text_token_ce"].sum() for o in outs) / sum(c[0] for c in counts)
        image = sum(o["image_mse_per_sample"].sum() for o in outs) / sum(c[1] for c in counts)
        (text + image).backward()

    def per_micro_batch():
        for batch in batches:
            (trainer.compute_loss(batch)[0] * 0.5).backward()

    expected, got, old = gradients(pooled), gradients(window), gradients(per_micro_batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (old - expected).abs().max() > 100 * (got - expected).abs().max()
