"""Metric and image logging: TensorBoard always, W&B when configured, plus metrics.jsonl.

W&B runs offline when no API key is configured (or `logging.wandb_mode: offline`), so a run
without network never hangs on a login.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)


def image_grid(images: list[Image.Image], captions: list[str] | None = None, columns: int = 4) -> Image.Image:
    """Images side by side, with an optional caption strip under each."""
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    strip = 12 if captions else 0
    grid = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * (height + strip)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y))
        if captions:
            draw.text((x + 2, y + height), captions[index][: max(4, width // 6)], fill="black")
    return grid


class Trackers:
    def __init__(self, run_dir: Path, report_to: list[str], project: str, config: dict[str, Any],
                 wandb_mode: str = "auto", enabled: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.metrics_file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        unknown = set(report_to) - {"tensorboard", "wandb"}
        if unknown:
            logger.warning("logging.report_to: ignoring unknown trackers %s", sorted(unknown))
        if "wandb" in report_to:
            self.wandb = self._init_wandb(project, config, wandb_mode)

    def _init_wandb(self, project: str, config: dict[str, Any], mode: str) -> Any:
        try:
            import wandb
        except ImportError:
            logger.warning("logging.report_to has wandb but the wandb package is missing "
                           "(pip install wandb); logging to TensorBoard only.")
            return None
        if mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
            mode = "online" if has_key and os.environ.get("WANDB_MODE") != "offline" else "offline"
        return wandb.init(project=project, config=config, dir=str(self.run_dir), mode=mode,
                          name=self.run_dir.name, settings=wandb.Settings(init_timeout=60))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        if not self.enabled:
            return
        import numpy as np

        self.tensorboard.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.tensorboard.close()
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()
