"""torchrun --nproc_per_node=2 on CPU (Gloo): ranks agree, and match one process with the same global batch."""

import os
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, sdxl_config


def launch(tmp_path, raw, nproc):
    config = tmp_path / f"cfg{nproc}.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / f"out{nproc}"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "tests" / "ddp_worker.py"), str(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, shapes_data):
    common = dict(training={"max_train_steps": 3, "learning_rate": 5e-3})
    two = sdxl_config(tmp_path / "two", shapes_data, **common)
    two["training"]["batch_size"] = 1
    one = sdxl_config(tmp_path / "one", shapes_data, **common)
    one["training"]["batch_size"] = 2
    out2 = launch(tmp_path, two, 2)
    out1 = launch(tmp_path, one, 1)
    rank0, rank1 = load_file(out2 / "rank0.safetensors"), load_file(out2 / "rank1.safetensors")
    single = load_file(out1 / "rank0.safetensors")
    changed = 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps ranks identical
        torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-4)
        changed += int(rank0[key].abs().sum() > 0)
    assert changed > 0
