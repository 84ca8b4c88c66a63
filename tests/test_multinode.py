"""`torchrun --nnodes=2 --nproc_per_node=1` on localhost: two "nodes" on one machine. With one
working folder for both (a shared disk) checkpoints are written once; with a folder per node
(`logging.output_dir` is relative, each node runs in its own folder: disks that are not shared)
each node holds complete checkpoints. Both equal the 2-process single-node run, and so does a
run resumed with `latest` on the separate disks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, sdxl_config
from glm_training.utils import checkpoint as ckpt

LORA = "pytorch_lora_weights.safetensors"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(config: Path, *launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(REPO / "train.py"), "--config", str(config)]


def run_nodes(config: Path, folders: list[Path]) -> None:
    """Node i runs in folders[i] (the same folder twice: a shared disk)."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command(config, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                                      "--master_addr=127.0.0.1", f"--master_port={port}"),
                              cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, folder in enumerate(folders)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    for rank, (node, err) in enumerate(zip(nodes, errors)):
        assert node.returncode == 0, f"node {rank}: {err[-2500:]} OTHER: {errors[1 - rank][-2500:]}"


def same(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0, msg=key)


def test_two_nodes_shared_and_separate_disks_match_one_node(tmp_path, shapes_data):
    raw = sdxl_config(tmp_path, shapes_data, training={"max_train_steps": 3, "batch_size": 1,
                                                       "learning_rate": 5e-3, "checkpointing_steps": 2})
    raw["logging"]["output_dir"] = "output"  # relative: each node's own folder when the disks differ
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    single = tmp_path / "single"
    single.mkdir()
    done = subprocess.run(command(config, "--standalone", "--nproc_per_node=2"), cwd=single, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    reference = single / "output" / "test" / "v0" / "final" / LORA

    shared = tmp_path / "shared"
    shared.mkdir()
    run_nodes(config, [shared, shared])
    runs = sorted((shared / "output" / "test").iterdir())
    assert [p.name for p in runs] == ["v0"]  # one run folder, chosen by global rank 0
    assert [p.name for p in ckpt.list_checkpoints(runs[0])] == ["checkpoint-2", "checkpoint-3"]
    assert not list(runs[0].glob(f"*{ckpt.TMP_MARK}*"))
    assert sorted(p.name for p in (runs[0] / "checkpoint-2").glob("rng_state_*.json")) == \
        ["rng_state_0.json", "rng_state_1.json"]  # both ranks' state in the one checkpoint
    same(runs[0] / "final" / LORA, reference)

    disks = [tmp_path / "node0", tmp_path / "node1"]
    for disk in disks:
        disk.mkdir()
    run_nodes(config, disks)
    for rank, disk in enumerate(disks):
        run = disk / "output" / "test" / "v0"
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"], disk
        assert (run / "checkpoint-2" / f"rng_state_{rank}.json").is_file()  # this node's rank
        same(run / "final" / LORA, reference)

    # Resume on the separate disks. The run folder's relative path exists on both nodes (each its
    # own copy): still not a shared disk, so each node writes its checkpoints again. Node 0 lost
    # checkpoint-3 (as if killed between the nodes' renames), node 1 kept it: `latest` is the
    # newest checkpoint every node holds (checkpoint-2), the same step on both.
    for disk in disks:
        ckpt.remove_tree(disk / "output" / "test" / "v0" / "final")
    ckpt.remove_tree(disks[0] / "output" / "test" / "v0" / "checkpoint-3")
    raw["training"]["resume_from_checkpoint"] = "latest"
    config.write_text(yaml.safe_dump(raw))
    run_nodes(config, disks)
    for rank, disk in enumerate(disks):
        run = disk / "output" / "test" / "v0"
        assert (run / "config-resume-checkpoint-2.yaml").is_file(), disk  # both resumed from step 2
        assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"], disk
        assert (run / "checkpoint-3" / f"rng_state_{rank}.json").is_file()
        assert not list(run.glob(".disk-probe-*")) and not list(run.glob(f"*{ckpt.TMP_MARK}*"))
        same(run / "final" / LORA, reference)

    # A checkpoint that only some nodes hold: every rank refuses at start (none waits forever).
    empty = tmp_path / "empty"
    empty.mkdir()
    refusals = {"latest": ["the nodes hold no checkpoint in common", "rank 0: none; rank 1: v0/checkpoint-3"],
                "output/test/v0/checkpoint-2": ["is not a complete checkpoint on rank(s) [0]"]}
    for value, expected in refusals.items():
        port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes = [subprocess.Popen(command(config, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                                          "--master_addr=127.0.0.1", f"--master_port={port}")
                                  + ["--set", f"training.resume_from_checkpoint={value}"],
                                  cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank, folder in enumerate([empty, disks[1]])]
        for node in nodes:
            err = node.communicate(timeout=600)[1]
            assert node.returncode != 0 and all(text in err for text in expected), err[-2500:]
        assert not (empty / "output" / "test").exists()  # nothing created for a refused start
