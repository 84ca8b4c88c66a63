"""Bad inputs a user can give: each ends `train.py` with exit code 2 and one line `error: ...`
naming the key or file and the fix, no traceback, no run folder left behind, and no change to
an existing run folder. Data, rewards and the output folder are checked before any model weight
is read (the family's weight loader is replaced by one that fails the test). Also: reward.on_error."""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from glm_training import cli
from glm_training.config import config_from_dict
from glm_training.rewards import RewardError, RewardInputs, build_reward_calculator

from conftest import sdxl_config

GRPO = {"num_generations": 2, "sample_steps": 2, "eval_steps": 2}


def grpo_config(tmp_path: Path, prompts: Path, rewards: dict, **reward) -> dict:
    return sdxl_config(tmp_path, prompts, training={"method": "grpo", "batch_size": 2, "max_train_steps": 1},
                       grpo=GRPO, reward={"rewards": rewards, **reward})


def write_module(tmp_path: Path, source: str) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(source)
    return f"python:{path}"


REWARDS_SOURCE = """
import torch

def raises(images, prompts):
    raise RuntimeError("the scorer crashed")

def half_nan(images, prompts):
    scores = images.mean(dim=(1, 2, 3))
    scores[1] = float("nan")
    return scores
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run_cli(tmp_path: Path, raw: dict, capsys, name: str = "bad.yaml") -> tuple[int, str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    code = cli.main(["--config", str(path)])
    return code, capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model family is loaded at all."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr("glm_training.models.sdxl.SDXLFamily.load", refuse)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shapes_data) -> tuple[dict, Path]:
    """One complete SFT run (rank 4) to resume from."""
    root = tmp_path_factory.mktemp("finished")
    raw = sdxl_config(root, shapes_data, training={"max_train_steps": 1, "checkpointing_steps": 1})
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["--config", str(path)]) == 0
    return raw, root / "output" / "test" / "v0"


def read_only_dir(tmp_path: Path) -> Path:
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        return Path("/sys/glm_training_output")  # root may write any folder; sysfs refuses new files
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def case_inputs(tmp_path: Path, shapes_data: Path, prompts: Path) -> dict[str, tuple[dict, list[str], bool]]:
    """name -> (config, words the message must contain, whether it must fail before model loading)."""
    sft = lambda **s: sdxl_config(tmp_path, shapes_data, **s)  # noqa: E731
    module = write_module(tmp_path, REWARDS_SOURCE)
    not_a_pipeline = tmp_path / "not_a_pipeline"
    not_a_pipeline.mkdir(exist_ok=True)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("une photo d'un caf\xe9\n".encode("latin-1"))
    a_file = tmp_path / "output_is_a_file"
    a_file.write_text("not a folder")
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    case_inputs.silent = silent
    return {
        "model path missing": (sft(model={"pretrained_model_name_or_path": str(tmp_path / "no_such_model")}),
                               ["model.pretrained_model_name_or_path", "does not exist"], False),
        "model path not a pipeline": (sft(model={"pretrained_model_name_or_path": str(not_a_pipeline)}),
                                      ["model.pretrained_model_name_or_path", "not a diffusers pipeline"], False),
        "wrong family": (sft(model={"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:sdxl"}),
                         ["StableDiffusionXLPipeline", "FluxKontextPipeline", "model.family"], False),
        "hub id offline": (sft(model={"pretrained_model_name_or_path": "nobody-here/no-such-model"}),
                           ["model.pretrained_model_name_or_path", "HF_HUB_OFFLINE", "local folder"], False),
        "target modules match nothing": (sft(lora={"target_modules": ["no_such_layer"]}),
                                         ["lora.target_modules", "no_such_layer", "to_q"], False),
        "python reward raises": (grpo_config(tmp_path, prompts, {"crash": {"type": f"{module}:raises"}}),
                                 ["'crash'", "the scorer crashed", "images 0..", "reward.on_error"], False),
        "reward returns NaN": (grpo_config(tmp_path, prompts, {"nan": {"type": f"{module}:half_nan"}}),
                               ["'nan'", "non-finite", "images [1", "reward.on_error"], False),
        "http reward server down": (grpo_config(tmp_path, prompts, {"remote": {
            "type": "http", "url": f"http://127.0.0.1:{free_port()}/score", "retries": 0, "timeout": 2}}),
            ["'remote'", "http://127.0.0.1:", "refused", "reward.on_error"], False),
        "http reward times out": (grpo_config(tmp_path, prompts, {"remote": {
            "type": "http", "url": f"http://127.0.0.1:{silent.getsockname()[1]}/score", "retries": 0,
            "timeout": 0.5}}), ["'remote'", "http://127.0.0.1:", "timed out", "reward.on_error"], False),
        "python reward not importable": (grpo_config(tmp_path, prompts, {"gone": {"type": "python:no_such_pkg:fn"}}),
                                         ["'gone'", "no_such_pkg"], True),
        "python reward function missing": (grpo_config(tmp_path, prompts, {"typo": {"type": f"{module}:rases"}}),
                                           ["'typo'", "rases"], True),
        "http url malformed": (grpo_config(tmp_path, prompts, {"remote": {"type": "http", "url": "http://"}}),
                               ["reward.rewards.remote.url"], True),
        "prompts not UTF-8": (grpo_config(tmp_path, latin1, {"brightness": {}}), ["UTF-8", str(latin1)], True),
        "output_dir is a file": (sft(logging={"output_dir": str(a_file), "project": "test"}),
                                 ["logging.output_dir", str(a_file), "is a file"], True),
        "output_dir read-only": (sft(logging={"output_dir": str(read_only_dir(tmp_path)), "project": "test"}),
                                 ["logging.output_dir", "writ"], True),
    }


def output_of(raw: dict) -> Path:
    return Path(raw["logging"]["output_dir"])


def assert_one_clean_error(code: int, err: str, words: list[str], name: str) -> None:
    assert code == 2, (name, err)
    assert "Traceback" not in err, (name, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, (name, err)
    for word in words:
        assert word in errors[0], (name, word, errors[0])


def test_each_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, shapes_data, prompts, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = case_inputs(tmp_path, shapes_data, prompts)
    try:
        for name, (raw, words, before_loading) in cases.items():
            with monkeypatch.context() as patch:
                if before_loading:
                    patch.setattr("glm_training.models.sdxl.SDXLFamily.load", _refuse_loading)
                code, err = run_cli(tmp_path, raw, capsys)
            assert_one_clean_error(code, err, words, name)
            project = output_of(raw) / "test"
            assert not project.is_dir() or not list(project.iterdir()), (name, list(project.iterdir()))
    finally:
        case_inputs.silent.close()


def _refuse_loading(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


def test_full_disk_is_reported_before_loading(tmp_path, shapes_data, capsys, no_model, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("glm_training.utils.preflight.shutil.disk_usage",
                        lambda path: type(usage)(usage.total, usage.total - 1024, 1024))
    raw = sdxl_config(tmp_path, shapes_data)
    code, err = run_cli(tmp_path, raw, capsys)
    assert_one_clean_error(code, err, ["logging.output_dir", "MiB free", "free some space"], "full disk")
    assert not (output_of(raw) / "test").exists()


def test_failed_resume_changes_nothing_in_the_run(tmp_path, finished_run, capsys):
    raw, run = finished_run
    before = tree_digest(run)
    checkpoint = run / "checkpoint-1"
    cases = {
        "lora.rank changed": ({"lora": {**raw["lora"], "rank": 8, "alpha": 8}},
                              ["training.resume_from_checkpoint", "lora.rank", "saved [4,", "expected [8,"]),
        "lora.target_modules changed": ({"lora": {**raw["lora"], "target_modules": ["to_q"]}},
                                        ["training.resume_from_checkpoint", "missing", "lora.target_modules"]),
        "rewards broken on resume": ({"training": {**raw["training"], "method": "grpo"}, "grpo": GRPO,
                                      "reward": {"rewards": {"gone": {"type": "python:no_such_pkg:fn"}}}},
                                     ["'gone'", "no_such_pkg"]),
    }
    for name, (changes, words) in cases.items():
        resume = {**raw, **changes}
        resume["training"] = {**resume["training"], "resume_from_checkpoint": str(checkpoint)}
        if name == "rewards broken on resume":
            resume["data"] = {**raw["data"]}
        code, err = run_cli(tmp_path, resume, capsys)
        assert_one_clean_error(code, err, words, name)
        assert tree_digest(run) == before, name  # no config-resume-*.yaml, no new logs
        assert sorted(p.name for p in run.parent.iterdir()) == ["v0"], name


def test_stale_tmp_folders_are_removed_when_a_run_resumes(tmp_path, shapes_data, capsys):
    raw = sdxl_config(tmp_path, shapes_data, training={"max_train_steps": 2, "checkpointing_steps": 1})
    assert run_cli(tmp_path, {**raw, "training": {**raw["training"], "max_train_steps": 1}}, capsys)[0] == 0
    run = output_of(raw) / "test" / "v0"
    for name in ("checkpoint-2.tmp-999999", "checkpoint-1.tmp-pruned-4242"):  # left by killed processes
        (run / name).mkdir()
        (run / name / "trainable.safetensors").write_bytes(b"torn")
    resume = {**raw, "training": {**raw["training"], "resume_from_checkpoint": "latest"}}
    assert run_cli(tmp_path, resume, capsys)[0] == 0
    assert not list(run.glob("*.tmp-*"))
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()


# -- reward.on_error ----------------------------------------------------------------------------


def test_on_error_zero_and_skip_group_score_failed_samples(tmp_path, caplog):
    module = write_module(tmp_path, REWARDS_SOURCE)
    images = torch.rand(4, 3, 8, 8)
    inputs = RewardInputs(images=images, prompts=["p"] * 4)
    brightness = images.mean(dim=(1, 2, 3))
    rewards = {"nan": {"type": f"{module}:half_nan", "weight": 2.0}, "brightness": {"weight": 1.0}}
    with caplog.at_level(logging.WARNING):
        zero = build_reward_calculator({"rewards": rewards, "on_error": "zero"})
        total, per_reward = zero(inputs)
    assert "'nan'" in caplog.text and "[1]" in caplog.text
    expected_nan = brightness.clone()
    expected_nan[1] = 0.0
    assert torch.allclose(per_reward["nan"], expected_nan)
    assert torch.allclose(total, 2 * expected_nan + brightness)
    assert zero.log_stats(total, per_reward)["reward/failed_samples"] == 1.0

    skip = build_reward_calculator({"rewards": rewards, "on_error": "skip_group"})
    total, per_reward = skip(inputs)
    assert torch.isnan(total[1]) and torch.isfinite(total[[0, 2, 3]]).all()
    stats = skip.log_stats(total, per_reward)
    assert stats["reward/failed_samples"] == 1.0
    assert stats["reward/total_mean"] == pytest.approx(float((2 * brightness + brightness)[[0, 2, 3]].mean()))

    crash = build_reward_calculator({"rewards": {"crash": {"type": f"{module}:raises", "batch_size": 2}},
                                     "on_error": "zero"})
    total, _ = crash(inputs)
    assert total.tolist() == [0.0] * 4 and crash.log_stats(total, {})["reward/failed_samples"] == 4.0
    with pytest.raises(RewardError, match=r"'crash'.*images 0\.\.1.*reward\.on_error"):
        build_reward_calculator({"rewards": {"crash": {"type": f"{module}:raises", "batch_size": 2}}})(inputs)


def test_grpo_with_skip_group_trains_past_a_failing_reward(tmp_path, prompts):
    from glm_training.trainers.grpo import GRPOTrainer

    module = write_module(tmp_path, REWARDS_SOURCE)
    raw = grpo_config(tmp_path, prompts, {"nan": {"type": f"{module}:half_nan"}}, on_error="skip_group")
    raw["training"]["batch_size"] = 4  # two groups; the NaN sample (index 1) voids the first
    run = GRPOTrainer(config_from_dict(raw)).train()
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    assert train[0]["reward/failed_samples"] == 1.0
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
