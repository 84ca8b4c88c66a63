"""Test-only wrapper: runs training jobs, each in a forked child process, with a fault hook
monkeypatched into the write functions of `glm_training.utils.checkpoint`.

    python tests/kill_point_worker.py jobs.json results.json

jobs.json is a list of {"config": path, "env": {...}}; each job's `env` is set in its child
before `glm_training.cli.main(["--config", path])` runs. Children are forked from this process
after the imports, so one job costs a training run, not a Python start. results.json gets one
{"returncode": ..., "signal": ...} per job.

The hook reads two variables (set per job; production code never reads them):

- GLM_TEST_CKPT_LOG=<file>: append one line `<step> <event>` per checkpoint event, in order.
  Events: each file name written (`write_bytes`), `external` (the family's LoRA files,
  `write_external`), `rename` (`publish`), `prune` (deleting a pruned checkpoint).
- GLM_TEST_KILL=<step>:<event>:<mode>: SIGKILL this process at that event of the save of
  `step`. Modes: `before` (nothing of the event done), `torn` (the file(s) half written),
  `after` (rename done), `mid` (prune: one file of the old checkpoint deleted).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm_training.utils import checkpoint as ckpt  # noqa: E402

STEP_RE = re.compile(r"^checkpoint-(\d+)")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_hook() -> None:
    kill = os.environ.get("GLM_TEST_KILL")
    log = os.environ.get("GLM_TEST_CKPT_LOG")
    target = None
    if kill:
        step, event, mode = kill.split(":")
        target = (int(step), event, mode)
    current = {"step": None}  # the step being saved (prune happens after its rename)

    def record(step: int, event: str) -> str | None:
        """Log the event; -> the kill mode when this is the event to die at."""
        if log:
            with open(log, "a") as handle:
                handle.write(f"{step} {event}\n")
        if target is not None and target[:2] == (step, event):
            return target[2]
        return None

    def step_of(folder: Path) -> int:
        return int(STEP_RE.match(folder.name).group(1))

    original_write_bytes, original_external = ckpt.write_bytes, ckpt.write_external
    original_publish, original_remove = ckpt.publish, ckpt.remove_tree

    def write_bytes(path: Path, data: bytes) -> None:
        current["step"] = step = step_of(Path(path).parent)
        mode = record(step, Path(path).name)
        if mode == "before":
            _die()
        if mode == "torn":
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
            _die()
        original_write_bytes(path, data)

    def write_external(folder: Path, writer):
        current["step"] = step = step_of(Path(folder))
        mode = record(step, "external")
        if mode == "before":
            _die()
        before = {p for p in Path(folder).rglob("*") if p.is_file()}
        result = original_external(folder, writer)
        if mode == "torn":
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p not in before):
                size = path.stat().st_size
                with open(path, "r+b") as handle:
                    handle.truncate(size // 2)
            _die()
        return result

    def publish(tmp: Path, final: Path) -> None:
        step = step_of(Path(final))
        mode = record(step, "rename")
        if mode == "before":
            _die()
        original_publish(tmp, final)
        if mode == "after":
            _die()

    def remove_tree(path: Path) -> None:
        path = Path(path)
        if f"{ckpt.TMP_MARK}pruned-" in path.name and current["step"] is not None:
            mode = record(current["step"], "prune")
            if mode == "mid":
                files = sorted(p for p in path.rglob("*") if p.is_file())
                files[0].unlink()
                _die()
        original_remove(path)

    ckpt.write_bytes, ckpt.write_external = write_bytes, write_external
    ckpt.publish, ckpt.remove_tree = publish, remove_tree


def run_job(job: dict) -> dict:
    started = time.time()
    pid = os.fork()
    if pid == 0:  # child: one training run; never returns into the parent's code
        code = 1
        try:
            os.environ.update(job.get("env", {}))
            install_hook()
            from glm_training import cli

            code = cli.main(["--config", job["config"]])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    seconds = round(time.time() - started, 2)
    if os.WIFSIGNALED(status):
        return {"returncode": None, "signal": os.WTERMSIG(status), "seconds": seconds}
    return {"returncode": os.WEXITSTATUS(status), "signal": None, "seconds": seconds}


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    # Imported before forking, so that each child starts with torch, diffusers (whose lazy
    # submodules take seconds) and peft loaded. The tests here use the tiny SDXL.
    import peft  # noqa: F401
    from diffusers import (AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler,  # noqa: F401
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    import importlib

    from glm_training import cli

    for target in cli.TRAINERS.values():
        try:
            importlib.import_module(target.split(":")[0])
        except ImportError:  # the child that needs it reports the error
            pass

    results = [run_job(job) for job in jobs]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
