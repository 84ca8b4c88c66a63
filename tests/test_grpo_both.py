"""GRPO with GLM-Image `model.component: both` (tiny models, CPU): one rollout per member (the AR
samples image tokens, the DiT decodes them with the SDE sampler), token GRPO on the AR with the
`reward.weights.ar` total, Flow-GRPO on the DiT with the `reward.weights.dit` total, one optimizer
step for both.

- each component's advantages are the group-normalised advantages of its own reward (AR:
  brightness only, DiT: jpeg_compressibility only), from the same images;
- on the first inner iteration both ratios are exactly 1 (and KL 0 at the reference); both get
  gradients, both change after a step, the second iteration's ratios leave 1;
- resume inside a num_iterations block is exact (the buffer holds both parts); both adapters saved.
"""

from __future__ import annotations

import json

import pytest
import torch

from glm_training.algorithms.grpo import compute_advantages
from glm_training.config import config_from_dict
from glm_training.data.datasets import collate
from glm_training.trainers.grpo import BUFFER_FILE, GRPOTrainer
from glm_training.parts.sampler import reward_inputs

SIZE = 32
GROUP = 4


@pytest.fixture()
def prompts(tmp_path):
    """Image-to-image prompts: the AR samples the full grid only (fast on CPU), which the DiT decodes."""
    from PIL import Image

    rows = []
    for index, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        Image.new("RGB", (SIZE, SIZE), colour).save(tmp_path / f"source{index}.png")
        rows.append({"prompt": f"make it brighter {index}", "source_image": f"source{index}.png"})
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def both_raw(out, data, training=None, grpo=None):
    return {
        "model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image", "component": "both"},
        "data": {"path": str(data), "resolution": SIZE},
        "training": {"method": "grpo", "max_train_steps": 2, "batch_size": GROUP, "learning_rate": 1e-2,
                     "checkpointing_steps": 1000, "seed": 0, **(training or {})},
        "grpo": {"num_generations": GROUP, "epsilon": 0.2, "sample_steps": 3, "eval_steps": 2, **(grpo or {})},
        # AR: brightness only; DiT: jpeg_compressibility only.
        "reward": {"rewards": {"brightness": {"weight": 1.0}, "jpeg_compressibility": {"weight": 1.0}},
                   "weights": {"ar": {"brightness": 1.0}, "dit": {"jpeg_compressibility": 1.0}}},
        "lora": {"rank": 4, "alpha": 4},
        "logging": {"output_dir": str(out / "output"), "project": "both", "report_to": []},
    }


def read_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trainable(trainer, name):
    return {k: p.detach().clone() for k, p in trainer.family.unwrapped(name).named_parameters() if p.requires_grad}


def test_each_component_gets_its_own_advantages_and_gradients(tmp_path, prompts):
    trainer = GRPOTrainer(config_from_dict(both_raw(tmp_path, prompts, grpo={"beta": 0.04})))
    trainer.setup()
    assert [part.name for part in trainer.parts] == ["ar", "dit"]
    assert trainer.reward_weights == {"ar": {"brightness": 1.0}, "dit": {"jpeg_compressibility": 1.0}}
    assert sorted(trainer.rewards.rewards) == ["brightness", "jpeg_compressibility"]  # each scored once
    batch = collate([trainer.dataset[0]])
    rollout = trainer.make_rollout(batch)
    assert set(rollout.records) == {"ar", "dit"}
    # The advantages are those of each component's own reward on the same decoded images.
    images = trainer.last_rollout[1]
    _, per_reward = trainer.rewards(reward_inputs(batch, images, GROUP))
    group_ids = torch.zeros(GROUP, dtype=torch.long)
    expected = {name: compute_advantages(per_reward[name], group_ids)[0]
                for name in ("brightness", "jpeg_compressibility")}
    assert torch.equal(rollout.advantages["ar"].cpu(), expected["brightness"])
    assert torch.equal(rollout.advantages["dit"].cpu(), expected["jpeg_compressibility"])
    assert not torch.allclose(expected["brightness"], expected["jpeg_compressibility"])
    assert rollout.valid["ar"].all() and rollout.valid["dit"].all()  # members differ (DiT SDE noise)
    metrics = rollout.metrics["ar"]
    assert metrics["reward/total_mean"] == metrics["reward/brightness_mean"]
    assert "reward/jpeg_compressibility_mean" not in metrics
    metrics = rollout.metrics["dit"]
    assert metrics["reward/total_mean"] == metrics["reward/jpeg_compressibility_mean"]
    assert "reward/brightness_mean" not in metrics

    # One backward: both losses, on-policy ratios exactly 1, KL 0 at the reference, both get gradients.
    trainer.rollout_for = lambda _batch: (rollout, 0)
    logged = trainer.backward(batch, 1.0)
    for part in ("ar", "dit"):
        assert logged[f"{part}/ratio_min"] == 1.0 == logged[f"{part}/ratio_max"]
        assert logged[f"{part}/clip_fraction"] == 0.0 and logged[f"{part}/kl"] == 0.0
        grads = [p.grad for p in trainer.family.unwrapped(part).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    assert logged["loss"] == pytest.approx(logged["ar/loss"] + logged["dit/loss"])
    assert logged["ar/reward/total_mean"] == logged["ar/reward/brightness_mean"]
    assert logged["dit/reward/total_mean"] == logged["dit/reward/jpeg_compressibility_mean"]


def test_both_trains_resumes_and_saves_both_adapters(tmp_path, prompts):
    # 4 prompts, 1 per micro-batch, no accumulation: each rollout trains 2 optimizer steps.
    settings = {"training": {"max_train_steps": 4, "checkpointing_steps": 3},
                "grpo": {"num_iterations": 2, "beta": 0.04}}
    trainer = GRPOTrainer(config_from_dict(both_raw(tmp_path, prompts, **settings)))
    trainer.setup()
    before = {name: trainable(trainer, name) for name in ("ar", "dit")}
    run = trainer.train()
    for name in ("ar", "dit"):  # both components moved
        after = trainable(trainer, name)
        assert any(not torch.equal(before[name][k], after[k]) for k in after), name
    rows = [row for row in read_rows(run) if "loss" in row]
    assert [row["iteration"] for row in rows] == [0, 1, 0, 1]
    for first, second in ((rows[0], rows[1]), (rows[2], rows[3])):
        for part in ("ar", "dit"):
            assert first[f"{part}/ratio_min"] == 1.0 == first[f"{part}/ratio_max"]
            assert first[f"{part}/clip_fraction"] == 0.0
            assert second[f"{part}/ratio_min"] != 1.0 or second[f"{part}/ratio_max"] != 1.0, part
            assert second[f"{part}/reward/total_mean"] == first[f"{part}/reward/total_mean"]  # same rollout
    for part in ("ar", "dit"):
        assert rows[0][f"{part}/kl"] == 0.0 and rows[1][f"{part}/kl"] > 0.0
        for key in ("zero_std_fraction", "advantage_abs_mean", "ratio_mean", "loss"):
            assert f"{part}/{key}" in rows[0]
    assert rows[0]["ar/gen_logprob_abs_diff"] < 1e-3
    evals = [row for row in read_rows(run) if "eval/ar/reward/total_mean" in row]
    assert evals and "eval/dit/reward/total_mean" in evals[0]
    final = run / "final"
    assert (final / "ar_adapter" / "adapter_config.json").is_file()
    assert (final / "pytorch_lora_weights.safetensors").is_file()

    # checkpoint-3 is inside the second block (iteration 1 pending): its buffer holds both parts,
    # and a fresh trainer resumed from it trains step 4 exactly as the unbroken run did.
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / BUFFER_FILE.format(rank=0)).is_file()
    assert not (run / "checkpoint-4" / BUFFER_FILE.format(rank=0)).exists()
    settings["training"]["resume_from_checkpoint"] = str(checkpoint)
    resumed = GRPOTrainer(config_from_dict(both_raw(tmp_path, prompts, **settings))).train()
    assert resumed == run
    rows = [row for row in read_rows(run) if "loss" in row]
    unbroken, again = rows[3], rows[-1]
    assert again["step"] == unbroken["step"] == 4 and again["iteration"] == 1.0
    for key in ("loss", "ar/loss", "dit/loss", "ar/ratio_mean", "dit/ratio_mean", "ar/kl", "dit/kl",
                "ar/reward/total_mean", "dit/reward/total_mean"):
        assert again[key] == pytest.approx(unbroken[key], rel=1e-5, abs=1e-7), key


def test_flow_epsilon_clips_the_dit_ratio_only(tmp_path, prompts):
    """grpo.flow_epsilon is the DiT's clip range; the AR keeps grpo.epsilon."""
    raw = both_raw(tmp_path, prompts, grpo={"num_iterations": 2, "flow_epsilon": 1e-6})
    run = GRPOTrainer(config_from_dict(raw)).train()
    second = [row for row in read_rows(run) if "dit/clip_fraction" in row][1]
    assert second["dit/clip_fraction"] > 0  # ratios moved after one update: clipped at 1e-6
    assert second["ar/clip_fraction"] < second["dit/clip_fraction"]  # epsilon 0.2 for the tokens
