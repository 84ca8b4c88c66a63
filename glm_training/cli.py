"""Command line: build the config, then the trainer for `training.method`, then run it.

    python train.py --config configs/quickstart.yaml [--set training.learning_rate=1e-4 ...]
    python train.py --config X.yaml --cache          # fill the embedding/latent cache only
    python train.py --config X.yaml --validate       # check the config and data, then stop
    torchrun --nproc_per_node=2 train.py --config X.yaml
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from glm_training.config import Config, ConfigError, describe_schema, load_config
from glm_training.data.datasets import DataError

logger = logging.getLogger("glm_training")

TRAINERS = {
    "sft": "glm_training.trainers.sft:SFTTrainer",
    "dpo": "glm_training.trainers.dpo:DPOTrainer",
    "grpo": "glm_training.trainers.grpo:GRPOTrainer",
}


def trainer_class(method: str) -> type:
    module_name, class_name = TRAINERS[method].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise ConfigError(f"training.method: {method} is not available in this version.") from None
        raise
    return getattr(module, class_name)


def parse_args(argv: list[str] | None, component: str | None) -> argparse.Namespace:
    what = {"ar": " (GLM-Image autoregressive generator only)", "dit": " (GLM-Image DiT decoder only)"}
    parser = argparse.ArgumentParser(description="glm_training: fine-tune image generators" +
                                     what.get(component or "", ""))
    parser.add_argument("--config", help="YAML config file (see configs/).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set training.learning_rate=1e-4 (repeatable).")
    parser.add_argument("--cache", action="store_true",
                        help="Fill the prompt-embedding/latent cache (cache.dir) and exit without training.")
    parser.add_argument("--validate", action="store_true", help="Check the config and the data, then exit.")
    parser.add_argument("--print-schema", action="store_true", help="Print every config key with its default.")
    parser.add_argument("--estimate", action="store_true",
                        help="Print the memory plan (real architecture on the meta device, no weights) and exit.")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                        help="--estimate: the budget in GiB; prints the cheapest changes that make it fit.")
    parser.add_argument("--quantize", action="append", default=[], metavar="PART=KIND",
                        help="--estimate what-if: fp8|int8|nf4|none per part, e.g. transformer=nf4 (repeatable).")
    parser.add_argument("--block-swap", type=int, default=0, metavar="N",
                        help="--estimate what-if: N transformer blocks held in CPU memory.")
    if component is None:
        parser.add_argument("--train_both", "--train-both", action="store_true",
                            help="GLM-Image: train the AR generator and the DiT decoder together.")
    args = parser.parse_args(argv)
    if not args.print_schema and not args.config:
        parser.error("--config is required")
    return args


def build_config(args: argparse.Namespace, component: str | None) -> Config:
    overrides = list(args.overrides)
    if component is not None:
        overrides.append(f"model.component={component}")
    elif getattr(args, "train_both", False):
        overrides.append("model.component=both")
    if args.cache:
        overrides.append("cache.enabled=true")
    return load_config(args.config, overrides)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def validate_data(cfg: Config) -> str:
    """Read and check the data the way training will (the trainer's own record loading); -> what was found."""
    return trainer_class(cfg.training.method).validate_data(cfg)


def fill_cache(cfg: Config) -> None:
    """Compute every cache entry for the dataset and the sample prompts (sharded over ranks)."""
    from accelerate import PartialState

    from glm_training.data.datasets import collate, same_size_chunks
    from glm_training.models.base import build_family
    from glm_training.trainers.sft import build_diffusion_data

    if cfg.training.method != "sft":
        raise ConfigError(f"--cache pre-fills SFT datasets; with training.method: {cfg.training.method} the "
                          "cache (cache.enabled: true) fills itself during the first epoch.")
    state = PartialState()
    device = cfg.cache.device or state.device
    family = build_family(cfg, device)
    dataset, encoder = build_diffusion_data(cfg, family)
    started = time.time()
    indices = list(range(state.process_index, len(dataset), state.num_processes))
    batch_size = cfg.training.batch_size
    for chunk in same_size_chunks(dataset, indices, batch_size):  # buckets: one image size per batch
        encoder.fill(collate([dataset[i] for i in chunk]))
    if state.is_main_process and cfg.logging.sample_prompts and not family.prompt_uses_images:
        encoder.encode_prompts(list(cfg.logging.sample_prompts))
        encoder.encode_prompts([""])
    state.wait_for_everyone()
    if state.is_main_process:
        logger.info("Cache %s holds %d entries (%d samples, %.1fs).", encoder.cache.dir,
                    len(encoder.cache), len(dataset), time.time() - started)


def main(argv: list[str] | None = None, component: str | None = None) -> int:
    args = parse_args(argv, component)
    if args.print_schema:
        print(describe_schema())
        return 0
    setup_logging()
    from glm_training.rewards.base import RewardError

    cfg = None
    try:
        cfg = build_config(args, component)
        if args.estimate:  # builds on the meta device: never loads a weight
            from glm_training.planner import WhatIf, parse_quantize, plan_memory

            what_if = WhatIf(quantize=parse_quantize(args.quantize), block_swap=args.block_swap)
            plan = plan_memory(cfg, what_if, budget_gb=args.gpu_memory)
            print(plan.report())
            return 0 if plan.fits() else 3
        if args.validate:
            from glm_training.planner import check_fits_cuda

            check_fits_cuda(cfg)  # with a CUDA device: refuse what cannot fit, before loading weights
            print(f"{args.config}: config valid; {validate_data(cfg)} in {cfg.data.path}.")
            return 0
        if args.cache:
            fill_cache(cfg)
            return 0
        trainer = trainer_class(cfg.training.method)(cfg)
        try:
            run_dir = trainer.train()
        except BaseException:
            # A start that trained nothing leaves nothing: its new run folder, or what it added
            # to the run it tried to resume (config-resume-*.yaml, logs), is removed.
            if trainer.is_main and trainer.global_step == trainer.run_start.step:
                from glm_training.utils.checkpoint import discard_failed_start

                discard_failed_start(trainer.run_start)
            raise
    except (ConfigError, DataError, FileNotFoundError, RewardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as error:  # a text file (prompts, captions) in another encoding
        where = f"data.path: {cfg.data.path}" if cfg is not None else f"--config {args.config}"
        print(f"error: a text file is not UTF-8 ({error}); {where}. Re-save it as UTF-8.", file=sys.stderr)
        return 2
    except OSError as error:
        import errno

        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise  # not the user's disk: a genuine bug keeps its traceback
        print(f"error: cannot write {error.filename or 'the run folder'}: {error.strerror}. Free some space or "
              "choose a writable logging.output_dir.", file=sys.stderr)
        return 2
    if trainer.is_main:
        logger.info("Run finished: %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
