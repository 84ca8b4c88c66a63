"""Validation during training (issue 16, items 1-3) on the throwaway toy family (tests/toy_family.py):
the validation loss at fixed draws is bitwise reproducible, falls on held-out data during SFT, and
a resumed run logs the same eval values as an unbroken one; DPO logs held-out implicit accuracy;
eval.metrics score generated images against the targets; best/ keeps the right step and
eval.patience stops the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_family import toy_config

from glm_training.config import ConfigError, config_from_dict
from glm_training.data.synthetic import make_colour_preference_pairs, make_shapes_dataset
from glm_training.evaluation.validation import bucket_name
from glm_training.trainers.dpo import DPOTrainer
from glm_training.trainers.grpo import GRPOTrainer
from glm_training.trainers.sft import SFTTrainer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("val_shapes") / "data", count=16, size=16)


def eval_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if any(k.startswith("eval/") for k in row)}


def config(tmp_path: Path, path: Path, method: str, data: dict | None = None, **sections) -> dict:
    """toy_config, with `data` options too (toy_config's own `data` is the dataset path)."""
    raw = toy_config(tmp_path, path, method, **sections)
    raw["data"].update(data or {})
    return raw


def sft_raw(tmp_path: Path, shapes: Path, **sections) -> dict:
    raw = config(tmp_path, shapes, "sft", training={"max_train_steps": 40},
                 data={"eval_fraction": 0.25}, eval={"steps": 10, "draws": 2})
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def test_validation_loss_is_reproducible_and_falls_on_held_out_data(tmp_path, shapes):
    trainer = SFTTrainer(config_from_dict(sft_raw(tmp_path, shapes)))
    run_dir = trainer.train()
    held_out = trainer.evaluator.records
    assert len(held_out) == 4 and len(trainer.dataset) == 12  # held out, and not trained on
    assert not {r.target for r in held_out} & {r.target for r in trainer.dataset.samples}
    rows = eval_rows(run_dir)
    assert sorted(rows) == [10, 20, 30, 40]
    first, last = rows[10]["eval/loss"], rows[40]["eval/loss"]
    assert last < 0.9 * first, (first, last)
    buckets = [k for k in rows[40] if k.startswith("eval/loss_t")]
    assert buckets and set(buckets) <= {f"eval/{bucket_name(b)}" for b in range(4)}
    # Same weights -> the same value, bit for bit, and the value that was logged at step 40.
    again, once_more = trainer.eval_metrics(40), trainer.eval_metrics(40)
    assert again == once_more
    assert again["eval/loss"] == rows[40]["eval/loss"]
    # The value is the mean of the parts' per-sample SFT losses at draws (epochs) 0 and 1.
    (part,) = trainer.parts
    from glm_training.data.datasets import collate
    from glm_training.evaluation.validation import _context, evaluation_mode

    with evaluation_mode(trainer, held_out):
        batch = collate([trainer.family.dataset(held_out, "images")[i] for i in range(4)])
        by_hand = [part.sft_loss(batch, _context(trainer, draw))[0].item() for draw in (0, 1)]
    assert again["eval/loss"] == pytest.approx(sum(by_hand) / 2, rel=1e-6)


def test_a_resumed_run_logs_the_same_eval_values(tmp_path, shapes):
    common = dict(training={"max_train_steps": 8, "checkpointing_steps": 4}, eval={"steps": 4, "best_metric": "eval/loss"})
    straight = SFTTrainer(config_from_dict(sft_raw(tmp_path / "a", shapes, **common))).train()
    broken = sft_raw(tmp_path / "b", shapes, **common)
    first = SFTTrainer(config_from_dict(broken))
    step = first.optimizer_step

    def step_then_stop():  # what SIGTERM does, at step 4
        norm = step()
        if first.global_step + 1 == 4:
            first._stop_requested = True
        return norm

    first.optimizer_step = step_then_stop
    first_dir = first.train()
    assert sorted(eval_rows(first_dir)) == [4]
    broken["training"]["resume_from_checkpoint"] = "latest"
    resumed = SFTTrainer(config_from_dict(broken))
    assert resumed.train() == first_dir
    a, b = eval_rows(straight), eval_rows(first_dir)
    assert sorted(a) == sorted(b) == [4, 8]
    for step_ in (4, 8):
        values = {k: v for k, v in a[step_].items() if k.startswith("eval/")}
        assert values == {k: v for k, v in b[step_].items() if k.startswith("eval/")}
    assert resumed.evaluator.best.state_dict() == json.loads(
        (straight / "checkpoint-8" / "eval_state.json").read_text())["best"]


def test_dpo_logs_held_out_implicit_accuracy_and_margin(tmp_path):
    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=8, size=16)
    raw = config(tmp_path, pairs, "dpo", dpo={"beta": 100.0}, data={"eval_fraction": 0.25},
                     training={"max_train_steps": 2}, eval={"steps": 1, "draws": 3})
    trainer = DPOTrainer(config_from_dict(raw))
    rows = eval_rows(trainer.train())
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert 0.0 <= row["eval/implicit_acc"] <= 1.0 and "eval/loss" in row
        assert any("margin" in k for k in row)
    # The eval pairs are the held-out ones, and their values are the trainer's evaluate() on them.
    assert trainer.evaluate(trainer.evaluator.records, draws=3)["loss"] == rows[2]["eval/loss"]


def test_eval_metrics_compare_generated_images_with_the_targets(tmp_path, shapes):
    raw = sft_raw(tmp_path, shapes, training={"max_train_steps": 1}, eval={"steps": 0, "metrics": ["ssim"]},
                  logging={"sample_num_inference_steps": 2})
    trainer = SFTTrainer(config_from_dict(raw))
    row = eval_rows(trainer.train())[1]
    assert "eval/loss" in row and -1.0 <= row["eval/ssim"] < 1.0
    # Against formulas: the same images through the metric directly.
    from glm_training.evaluation import validation
    from glm_training.evaluation.metrics import SsimMetric

    records = trainer.evaluator.records
    with validation.evaluation_mode(trainer, records):
        batch = validation.prompts_batch(trainer, records)
        images = trainer.family.eval_images(batch, records, 0, 2, raw["logging"].get("sample_guidance_scale", 5.0)).images
    expected = SsimMetric()(images, (batch["target_pixel_values"] + 1) / 2).mean()
    assert row["eval/ssim"] == pytest.approx(float(expected), abs=1e-6)


# A reward whose eval scores improve, then worsen: 0.1, 0.5, 0.3, 0.2, 0.1, ... (one call per evaluation).
FORCED = '''
VALUES = [0.1, 0.5, 0.3, 0.2, 0.1, 0.05]
CALLS = []

def reward(images, prompts):
    value = VALUES[min(len(CALLS), len(VALUES) - 1)]
    CALLS.append(value)
    return [value] * len(prompts)
'''


def test_best_checkpoint_keeps_the_right_step_and_patience_stops(tmp_path):
    forced = tmp_path / "forced.py"
    forced.write_text(FORCED)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(2)))
    raw = toy_config(tmp_path, prompts, "grpo", training={"max_train_steps": 12, "checkpointing_steps": 2},
                     grpo={"num_generations": 4, "sample_steps": 2, "eval_steps": 2, "epsilon": 0.2},
                     reward={"rewards": {"brightness": {}}},
                     eval={"steps": 2, "rewards": {"forced": {"type": f"python:{forced}:reward"}},
                           "best_metric": "eval/independent/forced", "mode": "max", "patience": 2})
    trainer = GRPOTrainer(config_from_dict(raw))
    run_dir = trainer.train()
    rows = eval_rows(run_dir)
    # Evaluations at 2, 4, 6, 8: best at step 4 (0.5), then 0.3 and 0.2: patience 2 stops at step 8.
    assert [rows[s]["eval/independent/forced"] for s in sorted(rows)] == pytest.approx([0.1, 0.5, 0.3, 0.2])
    assert trainer.global_step == 8
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] == 4 and best["value"] == pytest.approx(0.5) and best["metric"] == "eval/independent/forced"
    saved, at_step = load_file(run_dir / "best" / "net.safetensors"), load_file(run_dir / "checkpoint-4" / "net.safetensors")
    assert saved.keys() == at_step.keys() and all(torch.equal(saved[k], at_step[k]) for k in saved)
    final = load_file(run_dir / "final" / "net.safetensors")
    assert any(not torch.equal(saved[k], final[k]) for k in saved)  # training went on after the best step
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]


def test_eval_keys_that_cannot_act_are_refused(tmp_path, shapes):
    with pytest.raises(ConfigError, match="eval.patience"):
        config_from_dict(sft_raw(tmp_path, shapes, eval={"patience": 2}))
    with pytest.raises(ConfigError, match="eval.metrics: unknown metric 'lpip'"):
        config_from_dict(sft_raw(tmp_path, shapes, eval={"metrics": ["lpip"]}))
    raw = toy_config(tmp_path, shapes, "sft", eval={"best_metric": "eval/loss"})  # no eval split
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        SFTTrainer(config_from_dict(raw)).train()


def test_a_bad_eval_split_is_reported_before_any_weight_is_read(tmp_path, shapes, monkeypatch, capsys):
    """data.eval_path is read and checked in setup (with the training records) and by --validate,
    before the model loads; the error names data.eval_path."""
    import yaml

    from glm_training import cli
    from glm_training.data.datasets import DataError

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad eval split was reported")

    monkeypatch.setattr("toy_family.ToyFamily.load", refuse)
    missing = tmp_path / "no_such_eval"
    raw = config(tmp_path, shapes, "sft", data={"eval_path": str(missing)})
    with pytest.raises(DataError, match=f"data.eval_path {missing}: does not exist"):
        SFTTrainer(config_from_dict(raw)).setup()
    broken = tmp_path / "broken_eval"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "a.txt").write_text("a caption")
    raw = config(tmp_path, shapes, "sft", data={"eval_path": str(broken)})
    with pytest.raises(DataError, match=f"data.eval_path {broken}"):
        SFTTrainer(config_from_dict(raw)).setup()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["--config", str(path), "--validate"]) == 2
    assert f"data.eval_path {broken}" in capsys.readouterr().err
    # A good eval split is counted by --validate.
    raw = config(tmp_path, shapes, "sft", data={"eval_fraction": 0.25})
    assert cli.validate_data(config_from_dict(raw)) == "12 records (+4 eval records)"


def test_fsdp_evaluates_on_every_rank_and_keeps_best(tmp_path, shapes_data):
    """FSDP2 on 2 processes: the sharded UNet's eval forward passes need both ranks (on rank 0
    alone they would wait for rank 1 forever); the logged values equal a 1-process run's with the
    same global batch, and best/ (gathered by both ranks, written by rank 0) holds the best step."""
    from conftest import sdxl_config
    from test_fsdp import FSDP_ENV, LORA, launch

    sections = dict(data={"eval_fraction": 0.25}, eval={"steps": 1, "draws": 1, "best_metric": "eval/loss"})
    training = {"max_train_steps": 2, "learning_rate": 5e-3}
    two = sdxl_config(tmp_path / "two", shapes_data, training={**training, "batch_size": 1}, **sections)
    one = sdxl_config(tmp_path / "one", shapes_data, training={**training, "batch_size": 2}, **sections)
    run2 = launch(tmp_path, two, 2, FSDP_ENV, "two")
    run1 = SFTTrainer(config_from_dict(one)).train()
    sharded, single = eval_rows(run2), eval_rows(run1)
    assert sorted(sharded) == sorted(single) == [1, 2]
    for step in (1, 2):
        assert sharded[step]["eval/loss"] == pytest.approx(single[step]["eval/loss"], rel=1e-4)
    best = json.loads((run2 / "best" / "best.json").read_text())
    losses = {step: row["eval/loss"] for step, row in sharded.items()}
    assert best["step"] == min(losses, key=losses.get)
    gathered, reference = load_file(run2 / "best" / LORA), load_file(run1 / "best" / LORA)
    assert gathered.keys() == reference.keys()  # the full (consolidated) LoRA, not a shard
    # Same weights up to float order (Adam turns 1e-7 gradient differences into ~1e-4 steps at lr 5e-3).
    for key in gathered:
        torch.testing.assert_close(gathered[key], reference[key], atol=5e-4, rtol=1e-3)
    assert any(v.abs().sum() > 0 for k, v in gathered.items() if "lora_B" in k or "lora.up" in k)  # trained B
