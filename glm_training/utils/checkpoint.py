"""Run folders and checkpoints that never lose data.

- Run folders are `output_dir/<project>/v0, v1, ...`; a new run takes the next free number
  (created with mkdir, which fails rather than reuse a folder).
- A checkpoint is written into `checkpoint-<step>.tmp-<pid>` and renamed to `checkpoint-<step>`
  only when complete, with `trainer_state.json` written last; `latest` only ever considers
  complete folders, so a killed save is never resumed from.
- Nothing is pickled except the optimizer state, which is read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


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


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


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


def save_checkpoint(run_dir: Path, step: int, *, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    rank_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
                    extra_writer: Any = None, total_limit: int | None = None) -> Path:
    """Write a complete checkpoint atomically; `extra_writer(folder)` adds user-facing files."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f"checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    for rank, (tensors, meta) in enumerate(rank_rng):
        save_file(tensors, str(tmp / f"rng_state_{rank}.safetensors"))
        (tmp / f"rng_state_{rank}.json").write_text(json.dumps(meta))
    if extra_writer is not None:
        extra_writer(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    if final.exists():  # same step saved again (e.g. signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"training.resume_from_checkpoint: {path} is not a complete checkpoint "
                                f"(no {STATE_FILE}); use 'latest' or another checkpoint-<step> folder.")
    rng_file = path / f"rng_state_{rank}.safetensors"
    if not rng_file.exists():  # resuming on more processes than saved: reuse rank 0's state
        rng_file = path / "rng_state_0.safetensors"
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "scheduler": json.loads((path / "scheduler.json").read_text()),
        "trainer_state": json.loads((path / STATE_FILE).read_text()),
        "rng": (load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text())),
    }
