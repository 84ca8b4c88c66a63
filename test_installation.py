#!/usr/bin/env python
"""Installation self-check: Python and packages, optional extras, accelerators, configs, data.

    python test_installation.py

Prints a table and exits non-zero, with the fix, when something required is missing.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

REQUIRED = ["torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "safetensors",
            "yaml", "PIL", "tensorboard", "tqdm"]
OPTIONAL = {
    "wandb": "W&B logging (logging.report_to: [wandb])",
    "lpips": "LPIPS reward",
    "skimage": "SSIM reward (scikit-image)",
    "rapidocr_onnxruntime": "OCR reward",
    "datasets": "Pick-a-Pic parquet preference data",
    "bitsandbytes": "optimizer.name: adamw8bit",
    "prodigyopt": "optimizer.name: prodigy",
}


def version_of(module: str) -> str | None:
    try:
        imported = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(imported, "__version__", "installed"))


def main() -> int:
    rows: list[tuple[str, str, str]] = []
    failures: list[str] = []

    ok_python = sys.version_info >= (3, 10)
    rows.append(("python", sys.version.split()[0], "ok" if ok_python else "FAIL"))
    if not ok_python:
        failures.append("Python 3.10 or newer is required (make quickstart uses python3.11 when present).")

    for module in REQUIRED:
        version = version_of(module)
        rows.append((module, version or "missing", "ok" if version else "FAIL"))
        if not version:
            failures.append(f"{module} is missing: run `make install` (or pip install -r requirements.txt).")

    for module, purpose in OPTIONAL.items():
        version = version_of(module)
        rows.append((module, version or "not installed", "ok" if version else f"optional: {purpose}"))

    try:
        import torch

        cuda = f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "none"
        mps = "yes" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "no"
        rows.append(("cuda", cuda, "ok" if torch.cuda.is_available() else "info: training runs on CPU"))
        rows.append(("mps", mps, "info"))
    except Exception as error:  # torch itself failed to import: already reported above
        rows.append(("cuda", f"unknown ({error})", "FAIL"))

    try:
        from glm_training.config import ConfigError, DataConfig, load_config
        from glm_training.data.datasets import DataError, load_records

        version = version_of("glm_training")
        rows.append(("glm_training", version or "?", "ok"))
        for config in sorted((ROOT / "configs").glob("*.yaml")):
            try:
                cfg = load_config(config)
                rows.append((f"configs/{config.name}", cfg.model.family, "ok"))
            except ConfigError as error:
                rows.append((f"configs/{config.name}", "invalid", "FAIL"))
                failures.append(str(error))
        quickstart = ROOT / "data" / "quickstart"
        try:
            samples = load_records(DataConfig(path=str(quickstart)), {"prompt", "target"})
            rows.append(("data/quickstart", f"{len(samples)} samples", "ok"))
        except DataError as error:
            rows.append(("data/quickstart", "invalid", "FAIL"))
            failures.append(str(error))
    except Exception as error:
        rows.append(("glm_training", "import failed", "FAIL"))
        failures.append(f"glm_training does not import ({error}); run `make install`.")

    width = max(len(name) for name, _, _ in rows)
    vwidth = max(len(value) for _, value, _ in rows)
    for name, value, status in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {status}")
    if failures:
        print("\nProblems:")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print("\nAll required checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
