"""Checks that run before any model weight is read, so a bad path, reward or data file fails in
seconds with a message naming the key, instead of after minutes of loading.

- `check_output_dir`: `logging.output_dir` is not a file, can be written, and has free space.
- `check_rewards`: every used reward resolves (a registered type with valid options; `python:`
  module and function importable, without calling it; `http` url well-formed). Nothing is built.

The data files are read and validated by `BaseTrainer.setup` before it loads weights.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from glm_training.config import Config, ConfigError

#: Below this much free space at logging.output_dir a run would fail at its first checkpoint.
MIN_FREE_BYTES = 256 * 1024**2


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output_dir(path: str | Path, key: str = "logging.output_dir", min_free: int = MIN_FREE_BYTES) -> None:
    """Raise ConfigError (naming `key`) when runs cannot be written under `path`."""
    path = Path(path).expanduser()
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise ConfigError(f"{key}: {base} is a file, not a folder{'' if base == path else f' (on the way to {path})'}; "
                          "set it to a folder, or remove the file.")
    # Writability is probed by creating a file: os.access() says yes to root even on read-only mounts.
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        why = "is on a read-only filesystem" if error.errno == errno.EROFS else "is not writable"
        raise ConfigError(f"{key}: {base} {why} ({error.strerror}); choose a folder you can write to, e.g. "
                          f"--set {key}=./output.") from None
    free = shutil.disk_usage(base).free
    if free < min_free:
        raise ConfigError(f"{key}: only {free / 1024**2:.0f} MiB free on the disk of {base} (checkpoints need "
                          f"at least {min_free / 1024**2:.0f} MiB); free some space or choose another folder.")


def _used_rewards(reward_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Rewards with a non-zero weight somewhere (their own, or in a reward.weights table)."""
    rewards = reward_cfg.get("rewards") or {}
    tables = [t for t in (reward_cfg.get("weights") or {}).values() if isinstance(t, Mapping)]
    used = {}
    for name, options in rewards.items():
        options = dict(options or {}) if isinstance(options, Mapping) else {}
        weights = [options.get("weight", 1.0)] + [t[name] for t in tables if name in t]
        if any(w != 0 for w in weights):
            used[name] = options
    return used


def check_rewards(reward_cfg: Mapping[str, Any]) -> None:
    """Resolve every used reward without building it (no model is loaded, no function called)."""
    from glm_training.rewards.base import _REGISTRY, _load_builtins, build_reward, check_options
    from glm_training.rewards.external import _import_target

    for name, options in _used_rewards(reward_cfg).items():
        kind = options.pop("type", name)
        for key in ("weight", "batch_size"):  # the calculator's options, not the reward's
            options.pop(key, None)
        if not isinstance(kind, str) or not kind:
            build_reward(kind, reward_name=name)  # raises its ConfigError
        if kind.startswith("python:"):
            _import_target(kind[len("python:"):], name)  # imports the module; the function is not run
            continue
        _load_builtins()
        if kind not in _REGISTRY:
            build_reward(kind, reward_name=name)  # unknown type: raises with the close matches
        factory = _REGISTRY[kind]
        check_options(name, factory, options)
        if kind == "http":
            url = str(options.get("url", ""))
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"reward.rewards.{name}.url: {url!r} is not an http(s) URL with a host, e.g. "
                                  "http://localhost:8000/score.")
            try:
                parts.port
            except ValueError:
                raise ConfigError(f"reward.rewards.{name}.url: {url!r} has an invalid port.") from None


def uses_rewards(cfg: Config) -> bool:
    return cfg.training.method == "grpo" or (cfg.training.method == "dpo" and cfg.dpo.online)


def run_preflight(cfg: Config) -> None:
    """What can be checked before the model family loads, besides the data (BaseTrainer.setup
    reads and validates the data itself before loading weights)."""
    check_output_dir(cfg.logging.output_dir)
    if uses_rewards(cfg):
        check_rewards(cfg.to_dict()["reward"])
