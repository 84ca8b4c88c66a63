"""GRPO guardrails (issue 16, item 4) on the toy family: a trained `python:` reward that rises while
an independent one (eval.rewards) falls gives the reward-hacking warning; an independent reward
that rises with it gives none; a within-group reward std below eval.collapse_std gives the
policy-collapse warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from toy_family import toy_config

from glm_training.config import config_from_dict
from glm_training.evaluation.guardrails import RewardGuard
from glm_training.trainers.grpo import GRPOTrainer

REWARDS = '''
def bright(images, prompts):
    return images.mean(dim=(1, 2, 3)).tolist()

def dark(images, prompts):
    return (1 - images.mean(dim=(1, 2, 3))).tolist()

def constant(images, prompts):
    return [0.5] * len(prompts)
'''


def grpo_run(tmp_path: Path, trained: str, independent: str, **eval_options) -> tuple[GRPOTrainer, dict]:
    module = tmp_path / "guard_rewards.py"
    module.write_text(REWARDS)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(4)))
    raw = toy_config(tmp_path, prompts, "grpo", training={"max_train_steps": 24, "batch_size": 8},
                     grpo={"num_generations": 4, "sample_steps": 3, "eval_steps": 3, "epsilon": 0.2,
                           "noise_level": 0.7},
                     reward={"rewards": {"trained": {"type": f"python:{module}:{trained}"}}},
                     eval={"steps": 8, "rewards": {"independent": {"type": f"python:{module}:{independent}"}},
                           **eval_options})
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    trainer.evaluate(0)  # the baseline, before any update
    run_dir = trainer.train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, {row["step"]: row for row in rows if "eval/reward/total_mean" in row}


def test_trained_reward_rising_while_an_independent_one_falls_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="glm_training.trainers.grpo"):
        trainer, rows = grpo_run(tmp_path, "bright", "dark", hacking_threshold=0.002)
    assert sorted(rows) == [0, 8, 16, 24]
    start, end = rows[0], rows[24]
    assert end["eval/reward/total_mean"] > start["eval/reward/total_mean"] + 0.002  # training worked
    assert end["eval/independent/independent"] < start["eval/independent/independent"] - 0.002
    assert start["eval/guardrail/reward_hacking"] == 0.0  # the baseline itself never warns
    assert end["eval/guardrail/reward_hacking"] == 1.0
    messages = [r.getMessage() for r in caplog.records if "reward hacking" in r.getMessage()]
    assert messages and "'independent'" in messages[-1] and "eval.hacking_threshold" in messages[-1]
    assert (trainer.run_dir / "samples" / "step-000024.png").is_file()  # the grid with the tags


def test_an_independent_reward_that_rises_too_gives_no_warning(tmp_path):
    _, rows = grpo_run(tmp_path, "bright", "bright", hacking_threshold=0.002)
    assert rows[24]["eval/reward/total_mean"] > rows[0]["eval/reward/total_mean"]
    assert all(row["eval/guardrail/reward_hacking"] == 0.0 for row in rows.values())


def test_collapsed_group_std_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="glm_training.trainers.grpo"):
        _, rows = grpo_run(tmp_path, "constant", "bright", collapse_std=1e-3)
    assert all(row["eval/group_reward_std"] == 0.0 for row in rows.values())
    assert all(row["eval/guardrail/policy_collapse"] == 1.0 for row in rows.values())
    assert any("policy collapse" in r.getMessage() for r in caplog.records)


def test_reward_guard_rules_and_state():
    guard = RewardGuard(hacking_threshold=0.1, collapse_std=0.01)
    assert guard.check(0, {"total": 0.5}, {"clip": 0.8}, {"total": 0.2}) == []  # baseline
    assert guard.check(1, {"total": 0.6}, {"clip": 0.75}, {"total": 0.2}) == []  # fell 0.05 < 0.1
    hacked = guard.check(2, {"total": 0.7}, {"clip": 0.65}, {"total": 0.2})
    assert [w.flag for w in hacked] == ["reward_hacking"] and " " not in hacked[0].tag
    assert guard.check(3, {"total": 0.4}, {"clip": 0.5}, {"total": 0.2}) == []  # trained fell too: no hacking
    collapsed = guard.check(4, {"total": 0.5}, {"clip": 0.8}, {"total": 0.001})
    assert [w.flag for w in collapsed] == ["policy_collapse"]
    restored = RewardGuard(0.1, 0.01)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.baseline == {"trained/total": 0.5, "independent/clip": 0.8}
    assert [w.flag for w in restored.check(5, {"total": 0.7}, {"clip": 0.6})] == ["reward_hacking"]
    assert pytest.approx(0.5) == restored.baseline["trained/total"]
