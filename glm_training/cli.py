"""Command line: build the config, then the trainer for `training.method`, then run it.

    python train.py --config configs/quickstart.yaml [--set training.learning_rate=1e-4 ...]
    python train.py --config X.yaml --cache          # fill the embedding/latent cache only
    python train.py --config X.yaml --validate       # check the config and data, then stop
    torchrun --nproc_per_node=2 train.py --config X.yaml
"""

from __future__ import annotations

import argparse
import importlib
import json
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
    "nft": "glm_training.trainers.nft:NFTTrainer",
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


#: ms-swift-style flags (for people coming from seed 002's `swift rlhf` command lines) -> the
#: config keys they set. The README's "Prompt-policy GRPO" section prints this table.
SWIFT_FLAGS: dict[str, tuple[str, str]] = {
    "--train_type": ("lora|qlora|full", "prompt_policy.train_type (prompt_policy only) and lora.enabled (false for full)"),
    "--model": ("PATH", "model.pretrained_model_name_or_path"),
    "--lora_rank": ("N", "lora.rank"),
    "--lora_alpha": ("A", "lora.alpha"),
    "--target_modules": ("NAME ...", "lora.target_modules (all-linear: every Linear layer but the head)"),
    "--learning_rate": ("LR", "training.learning_rate"),
    "--per_device_train_batch_size": ("N", "training.batch_size"),
    "--gradient_accumulation_steps": ("N", "training.gradient_accumulation_steps"),
    "--num_train_epochs": ("N", "training.num_epochs"),
    "--output_dir": ("DIR", "logging.output_dir"),
    "--torch_dtype": ("bfloat16|float16|float32", "training.mixed_precision (bf16|fp16|no) and model.weight_dtype"),
    "--gradient_checkpointing": ("true|false", "model.gradient_checkpointing"),
    "--deepspeed": ("zero2|zero3", "distributed.deepspeed (ZeRO settings of configs/accelerate/deepspeed_zero*.yaml)"),
    "--use_wandb": ("true|false", "logging.report_to: [tensorboard, wandb]"),
    "--log_completions": ("true|false", "prompt_policy.log_completions"),
    "--device": ("auto|cuda|mps|cpu", "the training device (cpu hides CUDA; cuda / mps must exist)"),
}


def swift_flag_table() -> str:
    """The README's table of the ms-swift-style flags (tests/test_prompt_policy.py checks it)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a bare | would split the cell (GitHub tables)

    rows = [f"| `{flag} {cell(value)}` | {cell(target)} |" for flag, (value, target) in SWIFT_FLAGS.items()]
    return "\n".join(["| flag | config key |", "|---|---|", *rows])


_DTYPES = {"bfloat16": ("bf16", "bf16"), "bf16": ("bf16", "bf16"), "float16": ("fp16", "fp16"),
           "fp16": ("fp16", "fp16"), "float32": ("no", "fp32"), "fp32": ("no", "fp32")}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def swift_overrides(args: argparse.Namespace, family: str | None) -> list[str]:
    """The `--set` overrides the ms-swift-style flags stand for (SWIFT_FLAGS)."""
    out: list[str] = []

    def put(key: str, value: object) -> None:
        out.append(f"{key}={json.dumps(value)}")

    if args.train_type is not None:
        if family == "prompt_policy":
            put("prompt_policy.train_type", args.train_type)
        elif args.train_type == "qlora":
            raise ConfigError(f"--train_type qlora: only model.family prompt_policy trains a 4-bit base; "
                              f"{family} takes lora or full.")
        put("lora.enabled", args.train_type != "full")
    simple = {"model": "model.pretrained_model_name_or_path", "lora_rank": "lora.rank", "lora_alpha": "lora.alpha",
              "target_modules": "lora.target_modules", "learning_rate": "training.learning_rate",
              "per_device_train_batch_size": "training.batch_size",
              "gradient_accumulation_steps": "training.gradient_accumulation_steps",
              "num_train_epochs": "training.num_epochs", "output_dir": "logging.output_dir",
              "gradient_checkpointing": "model.gradient_checkpointing",
              "log_completions": "prompt_policy.log_completions"}
    for name, key in simple.items():
        value = getattr(args, name)
        if value is not None:
            put(key, value)
    if args.torch_dtype is not None:
        precision, weights = _DTYPES[args.torch_dtype]
        put("training.mixed_precision", precision)
        put("model.weight_dtype", weights)
    if args.use_wandb is not None:
        put("logging.report_to", ["tensorboard", "wandb"] if args.use_wandb else ["tensorboard"])
    if args.deepspeed is not None:
        put("distributed.deepspeed", args.deepspeed)
    return out


def apply_device(device: str | None) -> None:
    """`--device`: cpu hides CUDA from this process; cuda / mps must be present."""
    import torch

    if device in (None, "auto"):
        return
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible; use --device cpu or auto.")
    elif device == "mps":
        raise ConfigError("--device mps: the trainers run on CUDA (accelerate / DDP) or the CPU; use --device cpu "
                          "or auto on this machine.")


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
    swift = parser.add_argument_group("ms-swift-style flags (each sets config keys, see the README table)")
    kinds = {"--lora_rank": int, "--per_device_train_batch_size": int, "--gradient_accumulation_steps": int,
             "--num_train_epochs": int, "--lora_alpha": float, "--learning_rate": float,
             "--gradient_checkpointing": _bool, "--use_wandb": _bool, "--log_completions": _bool}
    choices = {"--train_type": ("lora", "qlora", "full"), "--torch_dtype": tuple(_DTYPES),
               "--deepspeed": ("zero2", "zero3"), "--device": ("auto", "cuda", "mps", "cpu")}
    for flag, (metavar, keys) in SWIFT_FLAGS.items():
        swift.add_argument(flag, type=kinds.get(flag, str), choices=choices.get(flag), default=None,
                           metavar=None if flag in choices else metavar, help=f"-> {keys}",
                           nargs="+" if flag == "--target_modules" else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib

        known = [option for action in parser._actions for option in action.option_strings]
        flag = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        parser.error(f"unknown argument {flag}" + (f"; did you mean {close[0]}?" if close else "") +
                     " (see --help; any config key can be set with --set section.key=value)")
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
    swift = swift_overrides(args, _config_family(args.config, overrides))
    return load_config(args.config, swift + overrides)  # --set wins over a flag


def _config_family(path: str, overrides: list[str]) -> str | None:
    """model.family of the config file (and --set), read before the flags are mapped."""
    from glm_training.config import ModelConfig, parse_override

    family = None
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["model", "family"]:
            family = value
    if family is None:
        try:
            import yaml

            raw = yaml.safe_load(open(path, encoding="utf-8")) or {}  # JSON is YAML too
            family = (raw.get("model") or {}).get("family", ModelConfig.family)
        except (OSError, yaml.YAMLError, AttributeError):
            return None  # load_config reports it
    return str(family)


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
        apply_device(args.device)
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
