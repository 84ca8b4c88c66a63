"""Kill points: a training process SIGKILLed at every write of a checkpoint save (before any
file, each file torn, before / after the rename, mid-prune) for SFT, DPO and GRPO with
num_iterations 2 resumes (`resume_from_checkpoint: latest`) to bitwise the same final weights
as an unbroken run, and no `*.tmp-*` folder survives the resumed run.

The kills are real (SIGKILL, no cleanup): `kill_point_worker.py` monkeypatches a test-only hook
into the write functions of `glm_training.utils.checkpoint` and forks one child per run. The
kill points are not listed by hand: an unbroken run records every event of its saves, and each
event of one save (with `checkpoints_total_limit: 1`, so it also prunes) becomes a kill point.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from glm_training.utils import checkpoint as ckpt

from conftest import REPO, sdxl_config

WORKER = REPO / "tests" / "kill_point_worker.py"
LORA = "pytorch_lora_weights.safetensors"
METHODS = ("sft", "dpo", "grpo")


def method_config(method: str, root: Path, data: dict[str, Path]) -> tuple[dict, int]:
    """(config, step whose save is killed): tiny SDXL LoRA, a checkpoint every step, keep 1."""
    training = {"checkpointing_steps": 1, "checkpoints_total_limit": 1, "max_train_steps": 3}
    if method == "sft":
        return sdxl_config(root, data["images"], training=training), 2
    if method == "dpo":
        return sdxl_config(root, data["pairs"], training={**training, "method": "dpo"}, dpo={"beta": 500.0}), 2
    # GRPO, 2 iterations per rollout: the save at step 3 is mid-block and holds the rollout buffer.
    return sdxl_config(root, data["prompts"], training={**training, "method": "grpo", "max_train_steps": 4,
                                                        "batch_size": 4, "learning_rate": 1e-2},
                       grpo={"num_generations": 2, "sample_steps": 2, "eval_steps": 2, "num_iterations": 2,
                             "noise_level": 1.0, "epsilon": 0.2},
                       reward={"rewards": {"brightness": {"weight": 1.0}}}), 3


def run_jobs(tmp_path: Path, jobs: list[dict], name: str) -> list[dict]:
    jobs_file, results_file = tmp_path / f"{name}-jobs.json", tmp_path / f"{name}-results.json"
    jobs_file.write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, str(WORKER), str(jobs_file), str(results_file)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and results_file.is_file(), done.stderr[-3000:]
    results = json.loads(results_file.read_text())
    for result in results:
        result.pop("seconds")
    return results


def write_config(raw: dict, path: Path, **training) -> str:
    raw = {**raw, "training": {**raw["training"], **training}}
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def kill_points(log: Path, step: int) -> list[tuple[str, str]]:
    events = [line.split(" ", 1)[1] for line in log.read_text().splitlines() if line.split(" ", 1)[0] == str(step)]
    points = []
    for event in events:
        if event == "rename":
            points += [(event, "before"), (event, "after")]
        elif event == "prune":
            points.append((event, "mid"))
        else:  # a file (or the family's LoRA files): killed before it and while it is half written
            points += [(event, "before"), (event, "torn")]
    return points


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from glm_training.data.synthetic import make_colour_preference_pairs, make_shapes_dataset

    root = tmp_path_factory.mktemp("fault_data")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    return {"images": make_shapes_dataset(root / "shapes", count=4, size=32, seed=0),
            "pairs": make_colour_preference_pairs(root / "pairs", count=4, size=32, seed=0),
            "prompts": prompts}


@pytest.fixture(scope="module")
def references(tmp_path_factory, data) -> dict[str, tuple[Path, Path]]:
    """Unbroken runs of each method (one worker call), recording their checkpoint events:
    method -> (run folder, event log)."""
    root = tmp_path_factory.mktemp("fault_reference")
    jobs, found = [], {}
    for method in METHODS:
        raw, _ = method_config(method, root / method, data)
        log = root / f"{method}-events.log"
        jobs.append({"config": write_config(raw, root / f"{method}.yaml"), "env": {"GLM_TEST_CKPT_LOG": str(log)}})
        found[method] = (root / method / "output" / "test" / "v0", log)
    assert run_jobs(root, jobs, "reference") == [{"returncode": 0, "signal": None}] * len(METHODS)
    return found


@pytest.mark.parametrize("method", METHODS)
def test_killed_at_every_save_write_resumes_to_the_same_weights(tmp_path, data, references, method):
    reference_raw, step = method_config(method, tmp_path / "reference", data)
    reference_run, log = references[method]
    expected = load_file(str(reference_run / "final" / LORA))

    points = kill_points(log, step)
    names = {event for event, _ in points}
    # "external": Accelerator.save_state (optimizer, schedule; its hook writes trainable.safetensors
    # and the LoRA files), written inside the tmp folder like every other file.
    required = {"rng_state_0.safetensors", "rng_state_0.json", "trainable.safetensors", "external",
                ckpt.STATE_FILE, "rename", "prune"}
    if method == "grpo":
        required.add("rollout_buffer_rank0.safetensors")
    assert required <= names, names
    assert [e for e, _ in points][-4:] == [ckpt.STATE_FILE, "rename", "rename", "prune"]  # state file last

    jobs = []
    for index, (event, mode) in enumerate(points):
        raw, _ = method_config(method, tmp_path / f"k{index}", data)
        jobs.append({"config": write_config(raw, tmp_path / f"k{index}.yaml"),
                     "env": {"GLM_TEST_KILL": f"{step}:{event}:{mode}"}})
        jobs.append({"config": write_config(raw, tmp_path / f"k{index}-resume.yaml",
                                            resume_from_checkpoint="latest"), "env": {}})
    results = run_jobs(tmp_path, jobs, "kills")

    for index, (event, mode) in enumerate(points):
        where = f"{method}: killed at {event} ({mode}) of the step-{step} save"
        killed, resumed = results[2 * index], results[2 * index + 1]
        assert killed == {"returncode": None, "signal": signal.SIGKILL}, where
        assert resumed == {"returncode": 0, "signal": None}, where
        run = tmp_path / f"k{index}" / "output" / "test" / "v0"
        assert sorted(p.name for p in run.parent.iterdir()) == ["v0"], where  # resumed in place
        final = load_file(str(run / "final" / LORA))
        assert final.keys() == expected.keys(), where
        for key, tensor in expected.items():
            assert torch.equal(final[key], tensor), f"{where}: {key} differs after resuming"
        assert not list(run.rglob(f"*{ckpt.TMP_MARK}*")), where
        assert [p.name for p in ckpt.list_checkpoints(run)] == [f"checkpoint-{reference_raw['training']['max_train_steps']}"]
        # Which checkpoint the resume started from: the new one exactly when the rename happened.
        resumed_from = sorted(run.glob("config-resume-checkpoint-*.yaml"))
        published = event == "prune" or (event == "rename" and mode == "after")
        assert [p.name for p in resumed_from] == [f"config-resume-checkpoint-{step if published else step - 1}.yaml"], \
            where
