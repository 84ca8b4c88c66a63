"""Tiny random-weight versions of every model family, saved in the real on-disk layout.

Tests and the quickstart load them through the same `from_pretrained` code as real checkpoints,
so nothing needs to be downloaded. `build_tiny(name, out_dir)` builds one; `ensure_tiny(name)`
builds it once into a shared cache folder and reuses it afterwards.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

# name -> "module:function"; each function has the signature (out_dir: Path, seed: int) -> Path.
TINY_BUILDERS = {
    "sdxl": "glm_training.models.tiny.sdxl:build_tiny_sdxl",
    "flux_kontext": "glm_training.models.tiny.flux_kontext:build_tiny_flux_kontext",
    "qwen_image": "glm_training.models.tiny.qwen_image:build_tiny_qwen_image",
    "qwen_image_edit": "glm_training.models.tiny.qwen_image:build_tiny_qwen_image_edit",
    "qwen_image_edit_plus": "glm_training.models.tiny.qwen_image:build_tiny_qwen_image_edit_plus",
    "glm_image": "glm_training.models.tiny.glm_image:build_tiny_glm_image",
    "clip": "glm_training.models.tiny.clip:build_tiny_clip",
    "bagel": "glm_training.models.bagel.tiny:build_tiny_bagel",
    "prompt_policy_lm": "glm_training.models.tiny.prompt_policy:build_tiny_policy_lm",
    "prompt_policy_vl": "glm_training.models.tiny.prompt_policy:build_tiny_policy_vl",
    "sd3": "glm_training.models.tiny.prompt_policy:build_tiny_sd3",
}

# Bump when a builder changes, so cached tiny models are rebuilt.
TINY_VERSION = "2"


def build_tiny(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    if name not in TINY_BUILDERS:
        raise KeyError(f"No tiny builder named {name!r}; available: {sorted(TINY_BUILDERS)}")
    module_name, function_name = TINY_BUILDERS[name].split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    return Path(builder(Path(out_dir), seed=seed))


def default_tiny_root() -> Path:
    root = os.environ.get("GLM_TRAINING_TINY_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm_training" / "tiny"


def ensure_tiny(name: str, root: str | Path | None = None, seed: int = 0) -> Path:
    """Build the tiny model `name` once (atomically) and return its folder."""
    root = Path(root) if root is not None else default_tiny_root()
    target = root / f"{name}-v{TINY_VERSION}-seed{seed}"
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_tiny(name, staging, seed=seed)
        (staging / ".complete").write_text("ok\n")
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first: keep its copy.
            if not (target / ".complete").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _register_reward_models() -> None:
    # The rewards' `model: tiny:clip` resolves through this (rewards must not import models).
    from glm_training.rewards.clip import register_model_source

    register_model_source("tiny", ensure_tiny)


_register_reward_models()
