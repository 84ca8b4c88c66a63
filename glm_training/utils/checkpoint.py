"""Run folders and checkpoints that never lose data.

- Run folders are `output_dir/<project>/v0, v1, ...`; a new run takes the next free number
  (created with mkdir, which fails rather than reuse a folder).
- Every file of a checkpoint (each rank's RNG, `Accelerator.save_state`'s files: optimizer,
  schedule, FSDP / DeepSpeed shards, and through its hook the trainable tensors and the
  user-facing LoRA files; trainer extras such as GRPO's rollout buffer) is written and fsynced
  inside `checkpoint-<step>.tmp-<pid>`; `trainer_state.json` comes last, then one rename makes it
  `checkpoint-<step>`. `latest` only ever considers complete folders, so a killed save is never
  resumed from. With several processes every rank writes its own files into the same tmp
  folder (rank 0 names it); rank 0 renames, then prunes.
- Pruning first renames an old checkpoint to a `.tmp-` name (one atomic step), then deletes it:
  a kill mid-delete leaves only a tmp folder, never a half-deleted "complete" checkpoint.
- Tmp folders of killed processes are removed when a run (re)starts in that folder.
- Nothing is pickled except the optimizer state, which is read back with `weights_only=True`.

All checkpoint bytes go through `write_bytes` (and the family's user-facing files through
`write_external`), renames through `publish`, deletions through `remove_tree`: one place each
to make durable, and for tests to inject faults into.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_MARK = ".tmp-"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def new_run_dir(output_dir: str | Path, project: str) -> Path:
    base = Path(output_dir) / project
    base.mkdir(parents=True, exist_ok=True)
    while True:
        numbers = [int(p.name[1:]) for p in base.iterdir() if re.fullmatch(r"v\d+", p.name)]
        candidate = base / f"v{max(numbers, default=-1) + 1}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue  # another run took it a moment ago


def snapshot_entries(run_dir: Path) -> set[str]:
    """Relative paths of everything under `run_dir` (to undo what a failed start added)."""
    if not run_dir.is_dir():
        return set()
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


@dataclass
class RunStart:
    """What a starting run found: its folder, whether this start created it, the entries that
    were there before (a resumed run), and the step it started from."""

    run_dir: Path
    created: bool
    entries_before: set[str] = field(default_factory=set)
    step: int = 0


def discard_failed_start(start: RunStart) -> list[Path]:
    """Undo a start that failed before training anything: remove the run folder it created, or
    (a resumed run) every file and folder it added to the existing one. -> what was removed."""
    run_dir, created, before = start.run_dir, start.created, start.entries_before
    if not run_dir.is_dir():
        return []
    if created:
        remove_tree(run_dir)
        return [run_dir]
    added = sorted((p for p in run_dir.rglob("*") if str(p.relative_to(run_dir)) not in before),
                   key=lambda p: len(p.parts))
    removed = []
    for path in added:
        if any(parent in removed for parent in path.parents):
            continue
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def stale_tmp_folders(run_dir: Path) -> list[Path]:
    """`checkpoint-*.tmp-*` folders: half-written saves or half-pruned checkpoints of killed runs."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if p.name.startswith("checkpoint-") and TMP_MARK in p.name and p.is_dir())


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Remove the tmp folders of killed processes (call on rank 0 before this run saves)."""
    stale = stale_tmp_folders(run_dir)
    for path in stale:
        remove_tree(path)
    return stale


def find_latest_checkpoint(output_dir: str | Path, project: str) -> Path | None:
    """The newest complete checkpoint of the newest run that has one."""
    base = Path(output_dir) / project
    if not base.is_dir():
        return None
    runs = sorted((p for p in base.iterdir() if re.fullmatch(r"v\d+", p.name)),
                  key=lambda p: int(p.name[1:]), reverse=True)
    for run in runs:
        checkpoints = list_checkpoints(run)
        if checkpoints:
            return checkpoints[-1]
    return None


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Writing: every byte of a checkpoint goes through these
# ---------------------------------------------------------------------------------------------

def write_bytes(path: Path, data: bytes) -> None:
    """Write one checkpoint file and fsync it, so the rename never publishes unflushed data."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def write_json(path: Path, value: Any, indent: int | None = None) -> None:
    write_bytes(path, json.dumps(value, indent=indent).encode("utf-8"))


def write_torch(path: Path, value: Any) -> None:
    """Only for the optimizer state (plain tensors and numbers; read back with weights_only)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_bytes(path, buffer.getvalue())


def write_external(folder: Path, writer: Callable[[Path], Any]) -> Any:
    """Files a library writes itself (the family's diffusers / peft LoRA files) into `folder`."""
    result = writer(folder)
    _fsync_tree(folder)
    return result


def publish(tmp: Path, final: Path) -> None:
    """The single rename that makes a checkpoint complete."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# Checkpoints: begin (rank 0) -> rank and main files (each rank) -> commit (rank 0)
# ---------------------------------------------------------------------------------------------

def tmp_folder_name(step: int) -> str:
    return f"checkpoint-{step}{TMP_MARK}{os.getpid()}"


def begin_checkpoint(run_dir: Path, name: str) -> Path:
    tmp = run_dir / name
    if tmp.exists():
        remove_tree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rank_state(folder: Path, rank: int, rng: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
    tensors, meta = rng
    write_tensors(folder / f"rng_state_{rank}.safetensors", tensors)
    write_json(folder / f"rng_state_{rank}.json", meta)


def write_training_state(folder: Path, *, trainable: dict[str, torch.Tensor],
                         optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    write_tensors(folder / "trainable.safetensors", trainable)
    write_torch(folder / "optimizer.pt", optimizer.state_dict())
    write_json(folder / "scheduler.json", scheduler.state_dict())


def commit_checkpoint(folder: Path, step: int, trainer_state: dict[str, Any],
                      total_limit: int | None = None) -> Path:
    """Mark `folder` complete (trainer_state.json last), rename it to `checkpoint-<step>`, then
    prune to the newest `total_limit` complete checkpoints."""
    write_json(folder / STATE_FILE, trainer_state, indent=2)
    _fsync_dir(folder)
    final = folder.parent / f"checkpoint-{step}"
    if final.exists():  # same step saved again (e.g. signal right after a periodic save)
        aside = final.with_name(f"{final.name}{TMP_MARK}replaced-{os.getpid()}")
        os.replace(final, aside)
        publish(folder, final)
        remove_tree(aside)
    else:
        publish(folder, final)
    if total_limit:
        prune_checkpoints(folder.parent, total_limit)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        aside = old.with_name(f"{old.name}{TMP_MARK}pruned-{os.getpid()}")
        os.replace(old, aside)  # no longer a checkpoint from here on, even if the delete is cut short
        remove_tree(aside)


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    rank_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
                    extra_writer: Callable[[Path], Any] | None = None, total_limit: int | None = None) -> Path:
    """One process writes a whole checkpoint (each rank's RNG given in `rank_rng`);
    `extra_writer(folder)` adds the user-facing files before the rename."""
    tmp = begin_checkpoint(run_dir, tmp_folder_name(step))
    for rank, rng in enumerate(rank_rng):
        write_rank_state(tmp, rank, rng)
    write_training_state(tmp, trainable=trainable, optimizer=optimizer, scheduler=scheduler)
    if extra_writer is not None:
        write_external(tmp, extra_writer)
    return commit_checkpoint(tmp, step, trainer_state, total_limit)


def all_ranks_see(folder: Path) -> bool:
    """Every rank (all processes, all nodes): whether every rank sees rank 0's `folder` (which
    rank 0 has created): False when nodes have their own disks. One process: True.

    Tested with a marker file of a fresh name that rank 0 writes into it, not with the folder
    itself: on disks that are not shared a relative path (a resumed run's `output/<project>/v0`)
    exists on every node, each node holding its own copy."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    name = [f".disk-probe-{os.getpid()}-{os.urandom(8).hex()}" if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(name, src=0)
    marker = Path(folder) / name[0]
    if torch.distributed.get_rank() == 0:
        write_bytes(marker, b"")
    torch.distributed.barrier()  # rank 0's marker is written
    seen = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, marker.is_file())
    if torch.distributed.get_rank() == 0:  # every rank has looked (the gather returned on all)
        marker.unlink(missing_ok=True)
    return all(seen)


def checkpoint_names(output_dir: str | Path, project: str) -> list[str]:
    """Every complete checkpoint under `output_dir/project`, as `v<run>/checkpoint-<step>`,
    oldest first (older runs first, then by step)."""
    base = Path(output_dir) / project
    if not base.is_dir():
        return []
    runs = sorted((p for p in base.iterdir() if re.fullmatch(r"v\d+", p.name)), key=lambda p: int(p.name[1:]))
    return [f"{run.name}/{path.name}" for run in runs for path in list_checkpoints(run)]


def latest_on_every_rank(output_dir: str | Path, project: str) -> tuple[Path | None, list[list[str]]]:
    """`training.resume_from_checkpoint: latest` with several processes: the newest complete
    checkpoint that every rank holds (nodes with their own disks can differ: a node killed
    between the nodes' renames lacks the newest), the same on all ranks, so that all resume at
    one step. -> (that checkpoint or None, each rank's checkpoints for the error message).
    One process: `find_latest_checkpoint`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        found = find_latest_checkpoint(output_dir, project)
        return found, [checkpoint_names(output_dir, project)]
    mine = checkpoint_names(output_dir, project)
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    common = [name for name in mine if all(name in other for other in every)]
    if not common:
        return None, every
    # Newest run first, then its newest step: what find_latest_checkpoint picks on one disk.
    run, step = max((int(n.split("/")[0][1:]), int(n.rsplit("-", 1)[1])) for n in common)
    return Path(output_dir) / project / f"v{run}" / f"checkpoint-{step}", every


def is_accelerate_state(path: Path) -> bool:
    """Whether a checkpoint holds `Accelerator.save_state` files (else: the older layout with
    optimizer.pt and scheduler.json)."""
    return not (Path(path) / "optimizer.pt").is_file()


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    file = Path(path) / "trainable.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"training.resume_from_checkpoint: {path} has no trainable.safetensors; it is not "
                                "a checkpoint of this trainer (or was written under FSDP / DeepSpeed: resume "
                                "with that launch config).")
    return load_file(str(file))


def load_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"training.resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no {STATE_FILE}); use 'latest' or another checkpoint-<step> folder.")
    rng_file = path / f"rng_state_{rank}.safetensors"
    if not rng_file.exists():  # resuming on more processes than saved: reuse rank 0's state
        rng_file = path / "rng_state_0.safetensors"
    state = {
        "trainable": load_trainable(path),
        "trainer_state": json.loads((path / STATE_FILE).read_text()),
        "rng": (load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text())),
    }
    if not is_accelerate_state(path):  # optimizer and schedule of the older layout (else: accelerate's files)
        state["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state["scheduler"] = json.loads((path / "scheduler.json").read_text())
    return state
