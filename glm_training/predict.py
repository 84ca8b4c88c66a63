"""Inference with trained weights, for every family, through the family interface.

    python -m glm_training.predict --run output/project/v0 --prompt "a red circle" --seed 0 1
    glm-predict --run output/project/v0/checkpoint-500 --prompts prompts.txt --steps 30 --out preds
    glm-predict --base tiny:flux_kontext --lora output/project/v0/final --prompt "make it blue" --image in.png
    glm-predict --run output/project/v0 --prompt "a cat" --compare      # base | trained grid

    from glm_training.predict import load
    predictor = load("output/project/v0")
    images = predictor.generate(["a red circle"], seed=0, steps=20)

The run's `config.yaml` rebuilds the family (model, LoRA rank/targets, component); the
adapter files of `final/` (or of a checkpoint) are loaded into it with the family's own
`load_adapter_weights`, and images come from the family's `sample` - the real diffusers pipeline
around those weights - so a seed means what it means there: image k of a call with seed s is the
pipeline's image for `generator=torch.Generator("cpu").manual_seed(s)`, one prompt per call.
Every image is written with a JSON of the settings that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from glm_training.config import Config, ConfigError, config_from_dict, load_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"


# ------------------------------------------------------------------------------------------------
# Finding the config and the weights


def _config_near(path: Path) -> Path | None:
    """config.yaml of the run that holds `path` (a run folder, its final/, a checkpoint, or a file in them)."""
    for folder in [path, *path.parents][:3]:
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return None


def resolve_run(run: str | Path) -> tuple[Path, Path]:
    """(config.yaml, weights folder) of `--run`: a run folder (its final/, else its newest
    checkpoint), its final/, or one of its checkpoint-<step> folders."""
    from glm_training.utils import checkpoint as ckpt

    path = Path(run).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--run: {path} does not exist.")
    if (path / CONFIG_FILE).is_file():  # the run folder itself
        if (path / FINAL_DIR).is_dir():
            return path / CONFIG_FILE, path / FINAL_DIR
        checkpoints = ckpt.list_checkpoints(path)
        if not checkpoints:
            raise FileNotFoundError(f"--run: {path} has neither {FINAL_DIR}/ nor a complete checkpoint-<step>/ "
                                    "(did the run save anything yet?).")
        return path / CONFIG_FILE, checkpoints[-1]
    config = _config_near(path)
    if config is None:
        raise FileNotFoundError(f"--run: no {CONFIG_FILE} in {path} or the folders above it; pass a run folder "
                                f"(output_dir/project/vN), its {FINAL_DIR}/ or a checkpoint-<step>/ folder, or use "
                                "--base MODEL --lora PATH --config TRAINING_CONFIG.")
    return config, path


def family_name_of(model: str) -> str | None:
    """The family of a base model from its name (`tiny:<family>`) or its diffusers `model_index.json`."""
    from glm_training.models.base import _FAMILIES

    if model.startswith("tiny:"):
        return model.split(":", 1)[1]
    index = Path(model).expanduser() / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name", "")
        by_pipeline = {"StableDiffusionXLPipeline": "sdxl", "FluxKontextPipeline": "flux_kontext",
                       "QwenImagePipeline": "qwen_image", "QwenImageEditPipeline": "qwen_image_edit",
                       "QwenImageEditPlusPipeline": "qwen_image_edit_plus", "GlmImagePipeline": "glm_image"}
        found = by_pipeline.get(class_name)
        return found if found in _FAMILIES else None
    return None


def _lora_metadata(path: Path) -> dict[str, Any] | None:
    """The single-component peft LoRA config diffusers writes into a LoRA file's metadata, or a
    peft folder's adapter_config.json: {rank, alpha, target_modules}; None when absent."""
    folder = path if path.is_dir() else path.parent
    if (folder / "adapter_config.json").is_file():
        config = json.loads((folder / "adapter_config.json").read_text())
        return {"rank": config["r"], "alpha": config["lora_alpha"], "target_modules": config["target_modules"]}
    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    flat = json.loads(raw)
    prefixes = {key.split(".", 1)[0] for key in flat}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    return {"rank": flat[f"{prefix}.r"], "alpha": flat[f"{prefix}.lora_alpha"],
            "target_modules": sorted(flat[f"{prefix}.target_modules"])}


def build_config(*, run: str | Path | None = None, base: str | None = None, lora: str | Path | None = None,
                 config: str | Path | None = None, family: str | None = None) -> tuple[Config, Path | None]:
    """The config to rebuild the model with, and the folder/file of the trained weights (None: base only)."""
    weights: Path | None = None
    config_path: Path | None = Path(config).expanduser() if config else None
    if run is not None:
        if lora is not None:
            raise ConfigError("--run and --lora both give trained weights; pass one of them.")
        found, weights = resolve_run(run)
        config_path = config_path or found
    elif lora is not None:
        weights = Path(lora).expanduser()
        if not weights.exists():
            raise FileNotFoundError(f"--lora: {weights} does not exist.")
        config_path = config_path or _config_near(weights)
    if config_path is not None:
        cfg_raw = load_config(config_path).to_dict()
    else:
        if base is None:
            raise ConfigError("Pass --run DIR, or --base MODEL [--lora PATH].")
        name = family or family_name_of(base)
        if name is None:
            raise ConfigError(f"--base {base}: cannot tell its model family (no tiny: prefix or known "
                              "model_index.json); pass --family NAME.")
        cfg_raw = {"model": {"family": name, "pretrained_model_name_or_path": base}, "data": {"path": "."}}
        if weights is not None:
            settings = _lora_metadata(weights)
            if settings is None:
                raise ConfigError(f"--lora {weights}: no {CONFIG_FILE} next to it and no LoRA config in its metadata; "
                                  "pass --config with the training config that produced it.")
            cfg_raw["lora"] = settings
    model = cfg_raw.setdefault("model", {})
    if base is not None:
        model["pretrained_model_name_or_path"] = base
    if family is not None and model.get("family") != family:
        raise ConfigError(f"--family {family}: the run's config says model.family {model.get('family')}.")
    # Inference only: nothing to resume, the adapter is loaded explicitly, and the base model may
    # sit in fp32 on a CPU-only machine.
    cfg_raw.setdefault("training", {})["resume_from_checkpoint"] = None
    lora_raw = cfg_raw.setdefault("lora", {})
    lora_raw["pretrained_weight"] = None
    for component in (lora_raw.get("components") or {}).values():
        if component and component.get("pretrained_weight") and weights is None:
            component["pretrained_weight"] = None
    source = str(config_path) if config_path else "predict arguments"
    return config_from_dict(cfg_raw, source=source), weights


# ------------------------------------------------------------------------------------------------
# The predictor


@dataclass
class Predictor:
    """A family with the trained weights loaded, ready to sample. `generate` returns PIL images;
    `base()` is a context in which the adapters are disabled (the base model)."""

    family: Any
    cfg: Config
    weights: Path | None
    description: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        log = self.cfg.logging
        size = log.sample_resolution or self.cfg.data.resolution
        return {"steps": log.sample_num_inference_steps, "guidance": log.sample_guidance_scale,
                "height": size, "width": size, "seed": log.sample_seed}

    def settings(self, *, seed: int | None = None, steps: int | None = None, guidance: float | None = None,
                 height: int | None = None, width: int | None = None) -> dict[str, Any]:
        chosen = self.defaults()
        for key, value in (("seed", seed), ("steps", steps), ("guidance", guidance), ("height", height),
                           ("width", width)):
            if value is not None:
                chosen[key] = value
        return chosen

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, images: Sequence[Any] | None = None,
                 seed: int | None = None, steps: int | None = None, guidance: float | None = None,
                 height: int | None = None, width: int | None = None) -> list:
        """One image per prompt; `images` (paths or PIL) are the control / source images given to
        every prompt. Each prompt is its own pipeline call seeded with `seed`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        chosen = self.settings(seed=seed, steps=steps, guidance=guidance, height=height, width=width)
        controls = _open_images(images)
        if not hasattr(self.family, "sample"):
            raise ConfigError(f"model.family {self.cfg.model.family}: this family cannot sample images.")
        out = []
        for prompt in prompts:
            out += self.family.predict_images(prompt, controls, height=int(chosen["height"]),
                                              width=int(chosen["width"]), steps=int(chosen["steps"]),
                                              guidance=float(chosen["guidance"]), seed=int(chosen["seed"]))
        return out

    @torch.no_grad()
    def answer(self, prompts: str | Sequence[str], *, images: Sequence[Any] | None = None,
               max_new_tokens: int = 64) -> list[str]:
        """Text answers (families with a text side: `family.answer`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not hasattr(self.family, "answer"):
            raise ConfigError(f"model.family {self.cfg.model.family}: this family gives no text answers "
                              "(it has no `answer` method).")
        return list(self.family.answer(prompts, images=_open_images(images) or None, max_new_tokens=max_new_tokens))

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        """The base model (LoRA adapters disabled, or the frozen copy for full fine-tuning)."""
        if self.weights is None:
            yield
            return
        if not self.cfg.lora.enabled:
            # reference() would copy the loaded (trained) weights: there is no base left to show.
            raise ConfigError("--compare: a full fine-tuning run replaces the base weights; run glm-predict "
                              "--base MODEL for the base images instead.")
        with self.family.reference():
            yield


def _open_images(images: Sequence[Any] | None) -> list:
    if not images:
        return []
    from PIL import Image

    opened = []
    for image in images:
        if isinstance(image, Image.Image):
            opened.append(image.convert("RGB"))
            continue
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--image: {path} does not exist.")
        try:
            with Image.open(path) as handle:
                opened.append(handle.convert("RGB"))
        except OSError as error:
            raise ValueError(f"--image: {path} is not a readable image ({error}).") from None
    return opened


def load(run: str | Path | None = None, *, base: str | None = None, lora: str | Path | None = None,
         config: str | Path | None = None, family: str | None = None, device: str | None = None) -> Predictor:
    """A Predictor for a run folder / final / checkpoint (`run`), or a base model with an optional LoRA."""
    from glm_training.models.base import build_family

    cfg, weights = build_config(run=run, base=base, lora=lora, config=config, family=family)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_family(cfg, device)
    if weights is not None:
        # The run's trainable layout (LoRA of the same rank/targets, or the full components), then
        # the saved weights into it.
        model.setup_training()
        if cfg.lora.enabled:
            model.load_adapter_weights(str(weights))
        else:
            _load_full_weights(model, weights)
    for module in model.modules.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    description = {"family": cfg.model.family, "base": cfg.model.pretrained_model_name_or_path,
                   "weights": str(weights) if weights is not None else None}
    return Predictor(model, cfg, weights, description)


def _load_full_weights(model: Any, weights: Path) -> None:
    """Full fine-tuning: a checkpoint's trainable.safetensors (the exact trained tensors)."""
    from safetensors.torch import load_file

    from glm_training.utils import checkpoint as ckpt

    file = weights / "trainable.safetensors"
    if not file.is_file() and weights.name == FINAL_DIR and ckpt.list_checkpoints(weights.parent):
        file = ckpt.list_checkpoints(weights.parent)[-1] / "trainable.safetensors"  # the same weights, exactly
    if not file.is_file():
        raise FileNotFoundError(f"{weights}: full fine-tuning (lora.enabled: false) runs are loaded from a "
                                "checkpoint-<step>/ folder (trainable.safetensors); pass one with --run.")
    model.load_trainable_state_dict(load_file(str(file)))


# ------------------------------------------------------------------------------------------------
# Writing outputs


def _slug(text: str, length: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return "-".join(part for part in keep.split("-") if part)[:length] or "prompt"


def predict(predictor: Predictor, prompts: Sequence[str], out_dir: str | Path, *, seeds: Sequence[int] = (),
            images: Sequence[Any] | None = None, steps: int | None = None, guidance: float | None = None,
            height: int | None = None, width: int | None = None, compare: bool = False,
            answer: bool = False, max_new_tokens: int = 64) -> list[Path]:
    """Generate every (prompt, seed), write `NNN-<prompt>-seed<S>.png` + `.json` (settings), and
    with `compare` also `compare.png` (row 1: base, row 2: trained). `answer`: text answers
    (`NNN-<prompt>.txt` + `.json`) instead of images."""
    from glm_training.utils.tracking import image_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    image_paths = [str(Path(i).expanduser().resolve()) if not hasattr(i, "size") else "<PIL image>"
                   for i in (images or [])]
    common = {**predictor.description, "images": image_paths}
    if answer:
        texts = predictor.answer(prompts, images=images, max_new_tokens=max_new_tokens)
        for index, (prompt, text) in enumerate(zip(prompts, texts)):
            stem = out / f"{index:03d}-{_slug(prompt)}"
            stem.with_suffix(".txt").write_text(text + "\n")
            stem.with_suffix(".json").write_text(json.dumps(
                {**common, "prompt": prompt, "answer": text, "max_new_tokens": max_new_tokens}, indent=2))
            written.append(stem.with_suffix(".txt"))
        return written
    seeds = list(seeds) or [predictor.defaults()["seed"]]
    trained, base, captions = [], [], []
    for index, prompt in enumerate(prompts):
        for seed in seeds:
            chosen = predictor.settings(seed=seed, steps=steps, guidance=guidance, height=height, width=width)
            image = predictor.generate([prompt], images=images, **chosen)[0]
            stem = out / f"{index:03d}-{_slug(prompt)}-seed{seed}"
            image.save(stem.with_suffix(".png"))
            stem.with_suffix(".json").write_text(json.dumps({**common, "prompt": prompt, **chosen}, indent=2))
            written.append(stem.with_suffix(".png"))
            trained.append(image)
            captions.append(f"{prompt} (seed {seed})")
            if compare:
                with predictor.base():
                    base.append(predictor.generate([prompt], images=images, **chosen)[0])
    if compare:
        if predictor.weights is None:
            raise ConfigError("--compare needs trained weights (--run, or --base with --lora).")
        grid = image_grid(base + trained, [f"base: {c}" for c in captions] + [f"trained: {c}" for c in captions],
                          columns=len(trained))
        grid.save(out / "compare.png")
        (out / "compare.json").write_text(json.dumps(
            {**common, "rows": ["base", "trained"], "columns": captions, "prompts": list(prompts), "seeds": seeds,
             **{k: v for k, v in predictor.settings(steps=steps, guidance=guidance, height=height,
                                                    width=width).items() if k != "seed"}}, indent=2))
        written.append(out / "compare.png")
    return written


# ------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glm-predict", description="Generate with trained weights (any family).")
    source = parser.add_argument_group("weights")
    source.add_argument("--run", help="A run folder (output_dir/project/vN), its final/, or a checkpoint-<step>/.")
    source.add_argument("--base", help="Base model (diffusers folder, hub id or tiny:<family>); with --run it "
                                       "replaces the run's model path.")
    source.add_argument("--lora", help="LoRA folder or file to apply to --base (instead of --run).")
    source.add_argument("--config", help="Training config that produced --lora (when no config.yaml is next to it).")
    source.add_argument("--family", help="Model family of --base when it cannot be told from the folder.")
    what = parser.add_argument_group("inputs")
    what.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
    what.add_argument("--prompts", help="A text file with one prompt per line.")
    what.add_argument("--image", action="append", default=[], help="Control / source image (repeatable).")
    what.add_argument("--answer", action="store_true", help="Text answers instead of images (BAGEL).")
    what.add_argument("--max-new-tokens", type=int, default=64, help="Length limit of text answers.")
    settings = parser.add_argument_group("settings (default: the run's logging.sample_* values)")
    settings.add_argument("--seed", type=int, nargs="+", default=[], help="One or more seeds.")
    settings.add_argument("--steps", type=int, help="Inference steps.")
    settings.add_argument("--guidance", type=float, help="Guidance scale (the family's own: CFG, Kontext's "
                                                         "distilled guidance, Qwen's true CFG, BAGEL's text CFG).")
    settings.add_argument("--height", type=int)
    settings.add_argument("--width", type=int)
    settings.add_argument("--out", default="predictions", help="Output folder.")
    settings.add_argument("--compare", action="store_true", help="Also write compare.png: base and trained.")
    settings.add_argument("--device", help="cuda, cpu, ... (default: cuda when available).")
    args = parser.parse_args(argv)
    if not args.run and not args.base:
        parser.error("pass --run DIR, or --base MODEL [--lora PATH]")
    if not args.prompt and not args.prompts:
        parser.error("pass --prompt TEXT (repeatable) or --prompts FILE")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--prompts: {path} does not exist.")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompts: {path} holds no prompt (one per line).")
    return prompts


def main(argv: list[str] | None = None) -> int:
    from glm_training.cli import setup_logging
    from glm_training.data.datasets import DataError

    args = parse_args(argv)
    setup_logging()
    try:
        prompts = read_prompts(args)
        predictor = load(args.run, base=args.base, lora=args.lora, config=args.config, family=args.family,
                         device=args.device)
        written = predict(predictor, prompts, args.out, seeds=args.seed, images=args.image, steps=args.steps,
                          guidance=args.guidance, height=args.height, width=args.width, compare=args.compare,
                          answer=args.answer, max_new_tokens=args.max_new_tokens)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("Wrote %d files to %s", len(written), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
