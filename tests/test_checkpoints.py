"""Checkpoints: a killed save is never `latest`; SIGTERM leaves a resumable checkpoint; runs never overwrite."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from glm_training.utils import checkpoint as ckpt

from conftest import REPO, sdxl_config


def test_run_dirs_are_versioned_never_reused(tmp_path):
    first = ckpt.new_run_dir(tmp_path, "p")
    second = ckpt.new_run_dir(tmp_path, "p")
    assert (first.name, second.name) == ("v0", "v1")
    (tmp_path / "p" / "v7").mkdir()
    assert ckpt.new_run_dir(tmp_path, "p").name == "v8"


def test_killed_save_is_never_latest(tmp_path, monkeypatch):
    run = ckpt.new_run_dir(tmp_path, "p")
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    kwargs = dict(trainable={"w": param.detach()}, optimizer=optimizer, scheduler=scheduler,
                  rank_rng=[ckpt.rng_state()])
    ckpt.save_checkpoint(run, 5, trainer_state={"global_step": 5}, **kwargs)

    def die(folder):
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 10, trainer_state={"global_step": 10}, extra_writer=die, **kwargs)
    assert list(run.glob("checkpoint-10.tmp-*"))  # the half-written folder is left as it was
    (run / "checkpoint-20").mkdir()  # a folder without trainer_state.json, e.g. from a crash
    assert ckpt.find_latest_checkpoint(tmp_path, "p") == run / "checkpoint-5"
    state = ckpt.load_checkpoint(run / "checkpoint-5")
    assert state["trainer_state"]["global_step"] == 5
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(run / "checkpoint-20")


def test_total_limit_keeps_the_newest(tmp_path):
    run = ckpt.new_run_dir(tmp_path, "p")
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(run, step, trainable={"w": param.detach()}, optimizer=optimizer,
                             scheduler=scheduler, trainer_state={"global_step": step},
                             rank_rng=[ckpt.rng_state()], total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]


def test_sigterm_saves_a_resumable_checkpoint_and_exits_zero(tmp_path, shapes_data):
    raw = sdxl_config(tmp_path, shapes_data, training={"max_train_steps": 500, "checkpointing_steps": 1000})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "output" / "test" / "v0" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr.decode()[-2000:]
    latest = ckpt.find_latest_checkpoint(tmp_path / "output", "test")
    assert latest is not None
    state = json.loads((latest / "trainer_state.json").read_text())
    assert 2 <= state["global_step"] < 500
    assert (latest / "pytorch_lora_weights.safetensors").is_file()
    assert not (latest.parent / "final").exists()
