"""Token DPO and token GRPO for GLM-Image's AR generator, and BAGEL's DPO through the trainer.

- DPO at the reference (fresh LoRA) is exactly log 2 with implicit accuracy 1/2 (GLM AR, BAGEL);
- token DPO on the colour preference pairs raises the held-out implicit accuracy;
- `component: both` sums token DPO (AR) and Diffusion-DPO (DiT) with per-term metrics;
- token GRPO: ratio exactly 1 on the first iteration (and not after it), KL exactly 0 at the
  reference, teacher-forced log-probs equal the sampling ones, and a brightness reward rises;
- the example configs load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from glm_training.config import ConfigError, DataConfig, config_from_dict, load_config
from glm_training.data.datasets import load_records
from glm_training.data.synthetic import make_colour_preference_pairs
from glm_training.trainers.dpo import DPOTrainer
from glm_training.trainers.grpo import GRPOTrainer

SIZE = 32
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def glm_raw(tmp_path, data, component="ar", **sections):
    raw = {
        "model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image", "component": component},
        "data": {"path": str(data), "resolution": SIZE},
        "training": {"method": "dpo", "max_train_steps": 2, "batch_size": 2, "learning_rate": 1e-3,
                     "checkpointing_steps": 1000, "seed": 0},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "tok", "report_to": []},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_pairs")
    train = make_colour_preference_pairs(root / "train", count=8, size=SIZE, seed=0)
    held_out = load_records(DataConfig(path=make_colour_preference_pairs(root / "eval", count=6, size=SIZE, seed=1)),
                            {"prompt", "chosen", "rejected"})
    return train, held_out


# -- token DPO -----------------------------------------------------------------------------------


def test_token_dpo_at_the_reference_is_log_2(tmp_path, pairs):
    train, held_out = pairs
    trainer = DPOTrainer(config_from_dict(glm_raw(tmp_path, train)))
    trainer.setup()
    assert trainer.betas == {"ar": pytest.approx(0.1)}  # family token default
    metrics = trainer.evaluate(held_out)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["implicit_acc"] == 0.5 and metrics["reward_margin"] == 0.0
    # The chosen and rejected images have different tokens: the log-prob gap is not 0 by accident.
    assert metrics["logp_gap"] == metrics["ref_logp_gap"] != 0.0


def test_token_dpo_raises_held_out_accuracy(tmp_path, pairs):
    train, held_out = pairs
    raw = glm_raw(tmp_path, train, training={"max_train_steps": 16, "batch_size": 4, "learning_rate": 1e-2},
                  lora={"rank": 8, "alpha": 8}, dpo={"beta": 0.1})
    trainer = DPOTrainer(config_from_dict(raw))
    trainer.setup()
    before = trainer.evaluate(held_out)
    run = trainer.train()
    after = trainer.evaluate(held_out)
    print(f"GLM-Image AR token DPO held-out: implicit_acc {before['implicit_acc']:.3f} -> {after['implicit_acc']:.3f}, "
          f"reward margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f}, "
          f"policy log-prob gap {before['logp_gap']:.2f} -> {after['logp_gap']:.2f}, loss {before['loss']:.4f} -> "
          f"{after['loss']:.4f}")
    assert after["implicit_acc"] > 0.5 and after["reward_margin"] > 0 and after["loss"] < math.log(2)
    rows = read_rows(run)
    for key in ("loss", "implicit_acc", "reward_margin", "logp_gap", "ref_logp_gap", "chosen_reward"):
        assert key in rows[0]
    assert (run / "final" / "ar_adapter" / "adapter_config.json").is_file()


def test_both_sums_token_dpo_and_diffusion_dpo(tmp_path, pairs):
    train, held_out = pairs
    raw = glm_raw(tmp_path, train, component="both", dpo={"beta": 500.0, "token_beta": 0.25, "sft_weight": 0.1})
    trainer = DPOTrainer(config_from_dict(raw))
    trainer.setup()
    assert [part.name for part in trainer.parts] == ["ar", "dit"]
    assert trainer.betas == {"dit": 500.0, "ar": 0.25}  # dpo.beta: the DiT's; token_beta: the AR's
    from glm_training.data.datasets import collate

    batch = collate([trainer.dataset[i] for i in range(2)])
    loss, metrics = trainer.compute_loss(batch)
    for prefix in ("ar", "dit"):
        assert metrics[f"{prefix}/implicit_acc"] == 0.5
    assert metrics["loss"] == pytest.approx(metrics["ar/loss"] + metrics["dit/loss"], rel=1e-6)
    assert metrics["ar/sft_loss"] > 0
    loss.backward()
    for name in ("ar", "dit"):  # both components get gradients
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for p in trainer.family.unwrapped(name).parameters() if p.requires_grad)


def test_online_dpo_is_refused_for_tokens(tmp_path, pairs):
    train, _ = pairs
    trainer = DPOTrainer(config_from_dict(glm_raw(tmp_path, train, dpo={"online": True},
                                                  reward={"rewards": {"brightness": {}}})))
    with pytest.raises(ConfigError, match="dpo.online"):
        trainer.setup()


def test_bagel_dpo_through_the_trainer(tmp_path):
    train = make_colour_preference_pairs(tmp_path / "train", count=4, size=16, seed=0)
    held_out = load_records(DataConfig(path=make_colour_preference_pairs(tmp_path / "eval", count=4, size=16, seed=1)),
                            {"prompt", "chosen", "rejected"})
    raw = {
        "model": {"family": "bagel", "pretrained_model_name_or_path": "tiny:bagel", "component": "gen"},
        "data": {"path": str(train), "resolution": 16},
        "training": {"method": "dpo", "max_train_steps": 3, "batch_size": 2, "learning_rate": 3e-3, "seed": 0,
                     "checkpointing_steps": 1000},
        "lora": {"rank": 8, "alpha": 8},
        "dpo": {"beta": 1000.0},
        "logging": {"output_dir": str(tmp_path / "out"), "project": "bagel_dpo", "report_to": []},
    }
    trainer = DPOTrainer(config_from_dict(raw))
    trainer.setup()
    assert [part.name for part in trainer.parts] == ["bagel"]
    before = trainer.evaluate(held_out)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["implicit_acc"] == 0.5
    run = trainer.train()
    rows = read_rows(run)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert "implicit_acc" in rows[0] and "policy_mse_gap" in rows[0]
    assert any((run / "final").iterdir())


# -- token GRPO ----------------------------------------------------------------------------------


def grpo_raw(tmp_path, prompts, **sections):
    raw = glm_raw(tmp_path, prompts,
                  training={"method": "grpo", "max_train_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
                  grpo={"num_generations": 4, "epsilon": 0.2, "sample_steps": 3, "eval_steps": 3},
                  reward={"rewards": {"brightness": {"weight": 1.0}, "jpeg_compressibility": {"weight": 1.0}},
                          "weights": {"ar": {"brightness": 1.0}, "dit": {"jpeg_compressibility": 1.0}}})
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    return path


def test_token_grpo_on_policy_ratio_and_kl_at_the_reference(tmp_path, prompts):
    raw = grpo_raw(tmp_path, prompts, training={"max_train_steps": 2, "gradient_accumulation_steps": 1},
                   grpo={"num_iterations": 2, "beta": 0.04})
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    assert [part.kind for part in trainer.parts] == ["tokens"]
    assert list(trainer.rewards.rewards) == ["brightness"]  # reward.weights.ar picks the AR's rewards
    run = trainer.train()
    rows = [row for row in read_rows(run) if "ratio_mean" in row]
    first, second = rows[0], rows[1]
    assert first["iteration"] == 0.0 and second["iteration"] == 1.0
    assert first["ratio_min"] == 1.0 == first["ratio_max"] and first["clip_fraction"] == 0.0  # on-policy
    assert first["kl"] == 0.0  # fresh LoRA: policy == reference
    assert second["ratio_min"] != 1.0 or second["ratio_max"] != 1.0  # same rollout after one update
    assert second["kl"] > 0.0
    # The teacher-forced log-probs are those the tokens were sampled with.
    assert first["gen_logprob_abs_diff"] < 1e-3
    for key in ("reward/brightness_mean", "reward/total_mean", "zero_std_fraction", "loss"):
        assert key in first
    evals = [row for row in read_rows(run) if "eval/reward/total_mean" in row]
    assert evals and (run / "samples" / "step-000002.png").is_file()
    assert (run / "final" / "ar_adapter" / "adapter_config.json").is_file()


def follow_prior_tokens(dit, scale: float = 20.0) -> None:
    """Make the tiny random DiT follow its prior tokens, as the real decoder does: its decoded
    brightness then depends on the AR's tokens consistently across decoder noise (correlation
    about 0.9 over noise draws, against about 0 for the raw random DiT, where no AR policy could
    raise an image reward)."""
    with torch.no_grad():
        dit.prior_token_embedding.weight.mul_(scale)
        dit.proj_out.weight.mul_(scale)


def test_token_grpo_raises_the_brightness_reward(tmp_path):
    from PIL import Image

    # Image-to-image prompts: the AR generates only the full grid (one token at 32 px), which is
    # what the DiT decodes (text-to-image adds 256 preview tokens the decoder never sees, and takes
    # ~15x longer to sample on CPU).
    rows = []
    for index, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        Image.new("RGB", (SIZE, SIZE), colour).save(tmp_path / f"source{index}.png")
        rows.append({"prompt": f"make it brighter {index}", "source_image": f"source{index}.png"})
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    raw = grpo_raw(tmp_path, data, training={"max_train_steps": 30, "batch_size": 8, "learning_rate": 3e-2},
                   # lm_head too: the tiny AR's frozen head bounds how far attention-only LoRA moves logits.
                   lora={"rank": 8, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]})
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    follow_prior_tokens(trainer.family.unwrapped("dit"))
    run = trainer.train()
    rows = [row for row in read_rows(run) if "reward/total_mean" in row]
    rewards = [row["reward/total_mean"] for row in rows]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    spread = rows[0]["reward/total_std"]
    print(f"GLM-Image AR token GRPO brightness (i2i, 30 steps): {start:.4f} -> {end:.4f} "
          f"(first-rollout std {spread:.4f})")
    assert end - start > 0.8 * spread, (start, end, spread)
    assert all(row["gen_logprob_abs_diff"] < 1e-3 for row in rows)


def even_token_fraction(images, prompts, metadata):
    """A token-level reward (through `python:`): the fraction of even image-token ids."""
    return torch.tensor([sum(1 for t in m["image_tokens"] if t % 2 == 0) / len(m["image_tokens"])
                         for m in metadata])


def test_token_grpo_raises_a_token_level_reward(tmp_path):
    """The AR's sampled tokens reach the rewards (`metadata["image_tokens"]`); token GRPO raises
    a reward defined on them, with no decoder in the way."""
    from PIL import Image

    rows = []
    for index in range(4):
        Image.new("RGB", (SIZE, SIZE), (60 * index, 90, 120)).save(tmp_path / f"source{index}.png")
        rows.append({"prompt": f"edit {index}", "source_image": f"source{index}.png"})
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    reward = f"python:{Path(__file__).resolve()}:even_token_fraction"
    raw = grpo_raw(tmp_path, data, training={"max_train_steps": 20, "batch_size": 8, "learning_rate": 3e-2},
                   reward={"rewards": {"even": {"type": reward}}, "weights": {}},
                   lora={"rank": 8, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]})
    run = GRPOTrainer(config_from_dict(raw)).train()
    rewards = [row["reward/total_mean"] for row in read_rows(run) if "reward/total_mean" in row]
    start, end = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(f"GLM-Image AR token GRPO, even-token reward (i2i, 20 steps): {start:.3f} -> {end:.3f}")
    assert end > start + 0.2, rewards


# -- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["glm_image_ar_dpo.yaml", "glm_image_ar_grpo.yaml", "bagel_dpo.yaml"])
def test_example_configs_load(name):
    cfg = load_config(str(CONFIGS / name))
    assert cfg.training.method in ("dpo", "grpo")
    if name.startswith("glm_image"):
        assert cfg.model.component == "ar"
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw["model"]["family"] == cfg.model.family
