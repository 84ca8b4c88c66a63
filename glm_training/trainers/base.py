"""BaseTrainer: everything a training run needs except the loss.

accelerate provides the process group (DDP under torchrun / accelerate launch; NCCL on GPU,
Gloo on CPU) and mixed precision. This class adds: optimizer and schedule from the config,
gradient accumulation and clipping, atomic checkpoints with exact resume, SIGTERM/SIGINT
handling, TensorBoard/W&B logging, sample grids, and a rank-0 progress bar.

Subclasses implement `build_dataset(records)` and `compute_loss(batch)` (or `backward`), and say
which record fields their parts need (`needs_attribute`); the records are loaded and checked before
any weight is read.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from glm_training.config import Config, ConfigError
from glm_training.data.datasets import collate, load_records, make_batch_sampler
from glm_training.data.images import open_image
from glm_training.evaluation import validation
from glm_training.models.base import ModelFamily, build_family
from glm_training.parts import StepContext
from glm_training.trainers.optim import build_optimizer, build_scheduler
from glm_training.utils import checkpoint as ckpt
from glm_training.utils.memory import memory_stats
from glm_training.utils.tracking import Trackers, image_grid

logger = logging.getLogger(__name__)


def distributed_strategy(cfg: Config | None = None) -> str:
    """What `accelerate launch --config_file configs/accelerate/<name>.yaml` asked for (it sets these
    variables; torchrun users set them by hand) or `distributed.deepspeed`: "fsdp", "deepspeed" or
    "ddp" (also one process)."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if cfg is not None and cfg.distributed.deepspeed != "none":
        if fsdp:
            raise ConfigError(f"distributed.deepspeed: {cfg.distributed.deepspeed} but the launch asked for FSDP "
                              "(ACCELERATE_USE_FSDP, configs/accelerate/fsdp.yaml): choose one; set "
                              "distributed.deepspeed: none for FSDP.")
        return "deepspeed"
    if fsdp:
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        return "deepspeed"
    return "ddp"


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def deepspeed_plugin(cfg: Config):
    """accelerate's DeepSpeedPlugin: for `distributed.deepspeed: zero2|zero3` the settings of
    configs/accelerate/deepspeed_zero<N>.yaml; for `accelerate launch --config_file
    deepspeed_zero*.yaml` the ACCELERATE_DEEPSPEED_* variables it exported. Accumulation, clipping
    and the micro batch always come from the training config (they cannot disagree). Sets the
    environment accelerate and deepspeed read; checked before any weight is loaded."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("DeepSpeed was asked for (distributed.deepspeed / --deepspeed, or accelerate launch with a "
                          "deepspeed_zero*.yaml config, ACCELERATE_USE_DEEPSPEED=true) but the deepspeed package is "
                          "not installed: pip install -e '.[deepspeed]' (or launch with configs/accelerate/fsdp.yaml)."
                          ) from None
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.accelerator import get_accelerator

    key, training = cfg.distributed.deepspeed, cfg.training
    where = f"distributed.deepspeed: {key}" if key != "none" else "ACCELERATE_USE_DEEPSPEED"
    ds_device = get_accelerator().device_name()
    if not torch.cuda.is_available() and ds_device != "cpu":
        raise ConfigError(f"{where}: DeepSpeed's accelerator is {ds_device!r} (DS_ACCELERATOR) but this machine has "
                          "no CUDA GPU; unset DS_ACCELERATOR (DeepSpeed then runs on the CPU with gloo) or train with "
                          "DDP / FSDP.")
    stage = int(key[-1]) if key != "none" else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    if stage == 3 and training.ema is not None:
        # ZeRO-3 leaves each rank a partition of every parameter: an average of those is not the model's.
        raise ConfigError(f"{where}: training.ema is not supported with ZeRO-3 (the parameters are partitioned "
                          "across ranks); use ZeRO-2 (distributed.deepspeed: zero2), FSDP, or remove training.ema.")
    common = {"gradient_accumulation_steps": 1, "gradient_clipping": float(training.max_grad_norm or 0.0)}
    if key != "none":
        launched = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if launched is not None and int(launched) != stage:
            raise ConfigError(f"{where} but accelerate launch's config asks for ZeRO stage {launched}: make them agree "
                              "(or drop distributed.deepspeed and let the launch config decide).")
        path = ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml"
        if not path.is_file():
            raise ConfigError(f"{where}: {path} is missing; reinstall from the repository (pip install -e .).")
        import yaml

        settings = yaml.safe_load(path.read_text())["deepspeed_config"]
        plugin = DeepSpeedPlugin(zero_stage=stage, offload_optimizer_device=settings.get("offload_optimizer_device", "none"),
                                 offload_param_device=settings.get("offload_param_device", "none"),
                                 zero3_init_flag=bool(settings.get("zero3_init_flag", False)),
                                 zero3_save_16bit_model=bool(settings.get("zero3_save_16bit_model", False)), **common)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what accelerate launch sets; accelerate reads it
    else:
        plugin = DeepSpeedPlugin(**common)  # stage, offload, ... from accelerate launch's variables
    # accelerate.prepare gets no dataloader (the trainer makes its own), so DeepSpeed learns it here.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = training.batch_size
    if "LOCAL_RANK" not in os.environ:
        # One process without torchrun: accelerate starts DeepSpeed's process group only for a
        # launched rank, so this process is made rank 0 of 1 (as DeepSpeed's own launcher does).
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(port))})
    return plugin


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if cfg.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.distributed.find_unused_parameters)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch
        handlers.append(InitProcessGroupKwargs(
            backend=backend, timeout=datetime.timedelta(minutes=cfg.distributed.timeout_minutes)))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        # One process may run several trainers (notebooks, tests): accelerate's state is a
        # singleton that would otherwise keep the first run's mixed precision. accelerate 1.15
        # offers no public reset (only this, which its own tests use).
        AcceleratorState._reset_state(reset_partial_state=False)
    strategy, plugins = distributed_strategy(cfg), {}
    if strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        from glm_training.models.base import family_class

        family = family_class(cfg.model.family)
        group = cfg.model.component or family.default_component
        components = family.component_groups[group]
        blocks = [name for component in components for name in family.block_classes(component)]
        unsharded = "|".join(f"(?:{family.fsdp_unsharded[c]})" for c in components if c in family.fsdp_unsharded)
        # FSDP2 (fully_shard); the rest (state dict type, offload, reshard) from the launch config.
        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=blocks,
            ignored_modules=unsharded or None)
    elif strategy == "deepspeed":
        plugins["deepspeed_plugin"] = deepspeed_plugin(cfg)
    # step_scheduler_with_optimizer=False: the schedule counts optimizer steps, whatever the world size
    # (accelerate would otherwise step it once per process). cpu=True on machines without CUDA:
    # otherwise accelerate does not wrap DDP on CPU ranks. Not for DeepSpeed: accelerate disables it
    # with cpu=True; without it DeepSpeed runs on CPU ranks too (its CPU accelerator, gloo).
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision, kwargs_handlers=handlers,
                              cpu=not torch.cuda.is_available() and strategy != "deepspeed",
                              step_scheduler_with_optimizer=False, **plugins)
    if strategy == "fsdp" and accelerator.distributed_type.value != "FSDP":
        if accelerator.num_processes > 1 and not torch.cuda.is_available():
            from accelerate.utils import DistributedType

            # accelerate turns FSDP on only for accelerator devices; torch's fully_shard also runs on
            # CPU ranks (gloo), which is how the FSDP tests run on machines without a GPU.
            plugin = plugins["fsdp_plugin"]
            if cfg.training.mixed_precision != "no":  # as accelerate does on GPUs
                plugin.set_mixed_precision(cfg.training.mixed_precision)
            from accelerate.state import PartialState

            accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does
            accelerator.state.fsdp_plugin = plugin
        else:
            raise ConfigError(f"FSDP was asked for (ACCELERATE_USE_FSDP) but accelerate runs as "
                              f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es); "
                              "launch with accelerate launch --config_file configs/accelerate/fsdp.yaml.")
    if strategy == "deepspeed" and accelerator.distributed_type.value != "DEEPSPEED":
        raise ConfigError(f"DeepSpeed was asked for (distributed.deepspeed: {cfg.distributed.deepspeed}) but accelerate "
                          f"runs as {accelerator.distributed_type.value}; launch with torchrun / accelerate launch, "
                          "or train with DDP / FSDP.")
    if strategy == "deepspeed" and not accelerator.state.deepspeed_plugin.zero3_init_flag:
        from transformers.integrations import unset_hf_deepspeed_config

        # accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says, and
        # transformers' from_pretrained would then partition every model it loads (the frozen text
        # encoders too, which DeepSpeed never prepares): only the prepared module is sharded.
        unset_hf_deepspeed_config()
    return accelerator


def keep_output_capturing(roots: list[torch.nn.Module]) -> None:
    """transformers 5 looks up which layer outputs a model can return (`output_hidden_states`) by
    the name of its class; FSDP2 swaps a sharded module's class for `FSDP<Name>`: without the entry
    for the new class, hidden states come back None (SDXL's text encoders)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # other transformers versions keep it on the class itself
        return
    from torch.distributed.fsdp import FSDPModule

    for root in roots:
        for module in root.modules():
            if isinstance(module, FSDPModule) and not registry.get(module):
                original = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
                if dict.get(registry, str(original)):
                    registry[module] = dict.get(registry, str(original))


def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """DCP checkpoints refuse to load where a trained parameter has no optimizer state (torch 2.14:
    "requires gradients but has no saved optimizer state"), e.g. SDXL's last text-encoder layer,
    which never gets a gradient (the penultimate hidden state is used). After each step such
    parameters get their state as torch's `_init_optim_state` makes it: a step with zero gradients
    and lr, weight decay 0 (the parameters do not move)."""
    busy = []

    def complete_state(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        missing = [p for group in opt.param_groups for p in group["params"] if p.requires_grad and p not in opt.state]
        if busy or not missing:
            return
        busy.append(True)
        grads = {p: p.grad for group in opt.param_groups for p in group["params"]}
        settings = [{k: group[k] for k in ("lr", "weight_decay") if k in group} for group in opt.param_groups]
        try:
            for group in opt.param_groups:
                group.update({k: 0.0 for k in ("lr", "weight_decay") if k in group})
                for p in group["params"]:
                    p.grad = None
            for p in missing:
                p.grad = torch.zeros_like(p)
            opt.step()
        finally:
            for group, setting in zip(opt.param_groups, settings):
                group.update(setting)
            for p, grad in grads.items():
                p.grad = grad
            busy.clear()

    optimizer.register_step_post_hook(complete_state)


class BaseTrainer(ABC):
    method = "base"

    def __init__(self, cfg: Config, run_dir: Path | None = None):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stop_requested = False
        self.saved_step: int | None = None  # the step of this run's newest checkpoint
        self.resume_path = self._resolve_resume()
        self.run_dir = self._prepare_run_dir(run_dir)
        self.family: ModelFamily | None = None

    # ------------------------------------------------------------------------------------------
    # Hooks for subclasses

    @abstractmethod
    def build_dataset(self, records: list) -> torch.utils.data.Dataset:
        """The training dataset of the validated records; called once the family is loaded."""

    @abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch and the scalars to log (at least `loss`)."""

    def dataset_items_per_batch(self) -> int:
        """Dataset items in one micro-batch per device (GRPO: prompts, each sampled G times)."""
        return self.cfg.training.batch_size

    def backward(self, batch: dict[str, Any], scale: float) -> dict[str, float]:
        """Gradients of one micro-batch (`scale` = 1 / accumulation). Trainers whose loss comes in
        parts (GRPO: one backward per trained timestep) override this instead of compute_loss."""
        loss, metrics = self.compute_loss(batch)
        self.accelerator.backward(loss * scale)
        return metrics

    def sample_images(self, step: int) -> None:
        """A grid of the family's samples of `logging.sample_prompts` with the current weights."""
        log = self.cfg.logging
        prompts = list(log.sample_prompts)
        resolution = log.sample_resolution or self.cfg.data.resolution
        controls = [open_image(p) for p in log.sample_control_images] or None
        cached: dict[str, Any] = {}
        for part in self.parts:  # with the cache on, the text encoders stay unloaded
            cached = cached or part.cached_prompt_embeds(prompts)
        images = self.family.sample(prompts, height=resolution, width=resolution,
                                    num_inference_steps=log.sample_num_inference_steps,
                                    guidance_scale=log.sample_guidance_scale, seed=log.sample_seed,
                                    control_images=controls, **cached)
        self.save_samples(images, prompts, step)

    def save_extra_state(self, folder: Path) -> None:
        """Every rank: write this trainer's own resumable state (GRPO: the rollout buffer) into the
        checkpoint's tmp folder, before the rename that makes it complete. Write with
        `ckpt.write_tensors` / `ckpt.write_json` (durable; one file per rank). Here: the EMA
        averages and the evaluator's state (best value, patience, guardrail baseline); subclasses
        call super()."""
        validation.save_state(self, folder)

    def load_extra_state(self, folder: Path) -> None:
        """Every rank, on resume: read back what `save_extra_state` wrote into `folder`."""
        validation.load_state(self, folder)

    # -- evaluation hooks (glm_training/evaluation/validation.py runs them) ------------------------

    def eval_split(self) -> list:
        """The held-out records (`data.eval_path` / `data.eval_fraction` / the layout's eval_* files)
        with the fields this trainer reads; [] when the data has no eval split. Read once, in
        `setup` before any weight (`validation.load_eval_split`)."""
        if getattr(self, "_eval_split", None) is None:
            self._eval_split = validation.load_eval_split(type(self), self.cfg, self.parts)
        return self._eval_split

    def validation_losses(self, records: list) -> dict[str, float]:
        """`eval/*` losses on the eval records (inside `validation.evaluation_mode`); SFT and DPO give them."""
        return {}

    def has_evaluation(self, evaluator: Any) -> bool:
        """Whether an evaluation at the end of training has anything to compute."""
        return bool(evaluator.records) or evaluator.metrics is not None or evaluator.rewards is not None

    def log_eval(self, values: dict[str, float], step: int) -> None:
        """Log one evaluation's `eval/*` values (GRPO logs each step's evaluation once)."""
        self.trackers.log(values, step)

    def eval_metrics(self, step: int) -> dict[str, float]:
        """Main process: every `eval/*` value at this step: validation losses on the eval split, then
        `eval.metrics` / `eval.rewards` on images generated for the eval prompts (or logging.sample_prompts)."""
        evaluator = validation.evaluator_of(self)
        values: dict[str, float] = {}
        if evaluator.records:
            with validation.evaluation_mode(self, evaluator.records):
                values.update(self.validation_losses(evaluator.records))
        if evaluator.metrics is not None or evaluator.rewards is not None:
            from glm_training.data.records import Record

            records = evaluator.records or [Record(p) for p in self.cfg.logging.sample_prompts]
            if not records:
                raise ConfigError("eval.metrics / eval.rewards: there are no eval prompts; set data.eval_path or "
                                  "data.eval_fraction (targets for lpips/ssim/fid) or logging.sample_prompts.")
            with validation.evaluation_mode(self, records):
                values.update(validation.generated_metrics(self, evaluator, records))
        return values

    # ------------------------------------------------------------------------------------------
    # Run folder and resume

    def _resolve_resume(self) -> Path | None:
        value = self.cfg.training.resume_from_checkpoint
        if not value:
            return None
        # Every rank decides the same way (a collective each): nodes with their own disks each
        # read their own copy, and a rank resuming at another step would hang the others.
        if value == "latest":
            found, held = ckpt.latest_on_every_rank(self.cfg.logging.output_dir, self.cfg.logging.project)
            if found is None and any(held):
                where = "; ".join(f"rank {rank}: {names[-1] if names else 'none'}" for rank, names in enumerate(held))
                raise ConfigError(f"training.resume_from_checkpoint: latest: the nodes hold no checkpoint in common "
                                  f"under {self.cfg.logging.output_dir}/{self.cfg.logging.project} ({where}); copy "
                                  "one node's checkpoint-<step> folder to the others, or start a new run.")
            if found is None:
                logger.warning("training.resume_from_checkpoint: latest: no checkpoint under %s/%s; "
                               "starting a new run.", self.cfg.logging.output_dir, self.cfg.logging.project)
            return found
        path = Path(value)
        complete = (path / ckpt.STATE_FILE).is_file()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, complete)
            missing = [rank for rank, seen in enumerate(every) if not seen]
            if missing and len(missing) < len(every):
                raise ConfigError(f"training.resume_from_checkpoint: {path} is not a complete checkpoint on rank(s) "
                                  f"{missing} (their node's disk); copy it there, or put it on a disk every node "
                                  "shares.")
            complete = not missing
        if not complete:
            raise ConfigError(f"training.resume_from_checkpoint: {path} is not a complete checkpoint "
                              "folder (checkpoint-<step> with trainer_state.json); use 'latest'.")
        return path

    def _prepare_run_dir(self, run_dir: Path | None) -> Path:
        from glm_training.utils.preflight import check_output_dir

        if run_dir is None and self.resume_path is not None:
            run_dir = self.resume_path.parent  # a resumed run continues in its own folder
        # Checked before anything is created: a bad output_dir fails here, not as an OSError.
        check_output_dir(run_dir if run_dir is not None else self.cfg.logging.output_dir)
        created = run_dir is None or not run_dir.exists()
        before = ckpt.snapshot_entries(run_dir) if run_dir is not None and self.is_main else set()
        if run_dir is None:
            chosen = [str(ckpt.new_run_dir(self.cfg.logging.output_dir, self.cfg.logging.project))
                      if self.is_main else None]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast_object_list(chosen, src=0)
            run_dir = Path(chosen[0])
        # What a failed start must undo (cli.main calls ckpt.discard_failed_start with it).
        self.run_start = ckpt.RunStart(run_dir, created, before, step=0)
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        # Nodes that do not see rank 0's folder have their own disk: there each node's first rank
        # writes the run folder and every checkpoint (each node then holds a resumable copy).
        self.shared_disk = ckpt.all_ranks_see(run_dir)
        self.writes_files = self.is_main if self.shared_disk else self.accelerator.is_local_main_process
        self.accelerator.project_configuration.save_on_each_node = not self.shared_disk
        if not self.shared_disk and self.is_main:
            logger.warning("%s is not on a disk every node shares: each node writes its own copy of the run "
                           "folder and checkpoints (resume on the same nodes).", run_dir)
        if self.writes_files:
            if not self.is_main:
                self.run_start = ckpt.RunStart(run_dir, not run_dir.exists(), ckpt.snapshot_entries(run_dir), step=0)
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt.remove_stale_tmp(run_dir):  # half-written saves of killed runs
                logger.info("Removed %s (left by a killed run).", stale)
            # A resumed run keeps the original config.yaml and records what it resumed with.
            name = "config.yaml" if self.resume_path is None else f"config-resume-{self.resume_path.name}.yaml"
            (run_dir / name).write_text(self.cfg.to_yaml())
        return run_dir

    # ------------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        from glm_training.utils.preflight import run_preflight

        run_preflight(self.cfg)  # output dir and rewards: checked before any weight is read
        cfg, acc = self.cfg, self.accelerator
        # Declarations, then data, then weights: bad data fails in seconds, before any model load.
        with self.first_on_each_disk():  # a `tiny:` model is built once per disk, by its first process
            self.family = build_family(cfg, self.device, load=False)
        self.parts = self.family.parts()
        records = self.records_for(cfg, self.parts)
        self.eval_split()  # a bad eval split fails here too, before the weights
        with self.first_on_each_disk():  # one process builds/downloads, others reuse
            self.family.load()
        # Seed after loading (building a tiny model draws random numbers): LoRA init and dropout
        # then depend only on the seed.
        torch.manual_seed(cfg.training.seed)
        self.family.setup_training()
        self.dataset = self.build_dataset(records)
        base = make_batch_sampler(self.dataset, self.dataset_items_per_batch(), acc.num_processes,
                                  acc.process_index, seed=cfg.training.seed, shuffle=cfg.data.shuffle)
        self.sampler, self.batches_per_epoch = self.batch_sampler(base)
        steps_per_epoch = max(1, self.batches_per_epoch // cfg.training.gradient_accumulation_steps)
        self.max_steps = cfg.training.max_train_steps or steps_per_epoch * cfg.training.num_epochs
        groups = {name: [p for p in module.parameters() if p.requires_grad]
                  for name, module in self.family.components().items()}
        optimizer = build_optimizer(cfg, groups)
        scheduler = build_scheduler(cfg, optimizer, self.max_steps)
        self._prepare(optimizer, scheduler)
        if self.resume_path is not None:
            self._restore(self.resume_path)
        self.trackers = Trackers(self.run_dir, cfg.logging.report_to, cfg.logging.project,
                                 cfg.to_dict(), cfg.logging.wandb_mode, enabled=self.is_main)

    @contextlib.contextmanager
    def first_on_each_disk(self):
        """Rank 0 first, then each other node's first rank, then everyone else: what one process
        writes (a built tiny model, a download) is then written once per disk, whether or not the
        nodes share it (the caches are not necessarily where the run folder is)."""
        acc = self.accelerator
        with acc.main_process_first(), acc.local_main_process_first():
            yield

    def _prepare(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """One `accelerator.prepare` of the trained modules, the optimizer and the schedule (FSDP2
        shards the modules and swaps the optimizer's tensors for the sharded ones; DeepSpeed builds
        its engine from all three), and the hooks that put the user-facing files in its state."""
        acc, names = self.accelerator, list(self.family.trained)
        self.sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
        if acc.distributed_type.value == "DEEPSPEED" and len(names) > 1:
            raise ConfigError(f"model.component: {self.family.component_group} (model.train_text_encoder: "
                              f"{self.cfg.model.train_text_encoder}) trains {names} together; a DeepSpeed engine "
                              "wraps one model: train one component at a time, or launch with "
                              "configs/accelerate/fsdp.yaml (shards every trained component) or ddp.yaml.")
        if acc.distributed_type.value == "FSDP" and len(names) > 1:
            # accelerate's FSDP2 prepare shards one model per call (and the optimizer spans all):
            # a container of the trained modules is that model. Each module becomes its own FSDP unit
            # (its blocks first), the root of its own forward; the container itself is never called.
            class TrainedModules(torch.nn.ModuleDict):
                def forward(self, *args: Any, **kwargs: Any) -> None:  # fully_shard wants a forward
                    raise RuntimeError("call the trained modules themselves (family.modules[name])")

            container = TrainedModules({name: self.family.modules[name] for name in names})
            plugin = acc.state.fsdp_plugin
            plugin.transformer_cls_names_to_wrap = list(dict.fromkeys(
                [*(plugin.transformer_cls_names_to_wrap or []), *(type(m).__name__ for m in container.values())]))
            container, self.optimizer, self.scheduler = acc.prepare(container, optimizer, scheduler)
            self.family.modules.update({name: container[name] for name in names})
        else:
            prepared = acc.prepare(*[self.family.modules[name] for name in names], optimizer, scheduler)
            for name, module in zip(names, prepared[:len(names)]):
                self.family.modules[name] = module
            self.optimizer, self.scheduler = prepared[len(names):]
        if acc.distributed_type.value == "FSDP":
            self._shard_references()
            copies = {**(getattr(self.family, "_reference_modules", None) or {}),
                      **(getattr(self.family, "_old_modules", None) or {})}
            keep_output_capturing([*(self.family.modules[name] for name in names), *copies.values()])
            complete_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer))  # torch's, not accelerate's
        # After prepare: under FSDP2 these are the sharded tensors the optimizer now holds.
        self.trainable_params = [p for group in self.optimizer.param_groups for p in group["params"]]
        acc.register_save_state_pre_hook(self._save_state_hook)
        acc.register_load_state_pre_hook(self._load_state_hook)

    def _shard_references(self) -> None:
        """FSDP, full fine-tuning: shard the frozen reference / old-policy copies by the same blocks,
        so that they cost 1/N of a copy per rank instead of a full one."""
        from torch.distributed.fsdp import fully_shard

        copies = {**(getattr(self.family, "_reference_modules", None) or {}),
                  **(getattr(self.family, "_old_modules", None) or {})}
        for name, module in copies.items():
            blocks = set(type(self.family).fsdp_blocks.get(name, ()))  # none listed (text encoders): one unit
            for sub in module.modules():
                if type(sub).__name__ in blocks:
                    fully_shard(sub)
            fully_shard(module)

    def _save_state_hook(self, models: list, weights: list, output_dir: str) -> None:
        """`Accelerator.save_state`, every rank: the trainable tensors and the user-facing LoRA files
        (gathered from the shards under FSDP / ZeRO-3) go into the checkpoint; accelerate's full
        model files (frozen base included) are dropped where accelerate would write them unsharded."""
        weights.clear()
        folder = Path(output_dir)
        with self.family.full_weights():  # sharded: gathered on rank 0 (FSDP needs a shared disk to resume)
            if self.writes_files and (self.is_main or not self.sharded):
                ckpt.write_tensors(folder / "trainable.safetensors", self.family.trainable_state_dict())
                self.family.save_adapter(folder)

    def _load_state_hook(self, models: list, input_dir: str) -> None:
        """`Accelerator.load_state`: unsharded runs read the trainable tensors back themselves
        (accelerate then loads no model file); FSDP / DeepSpeed loaded their shards already."""
        if self.sharded:
            return
        state = ckpt.load_trainable(Path(input_dir))
        try:
            self.family.load_trainable_state_dict(state)
        except ConfigError as error:
            raise ConfigError(f"training.resume_from_checkpoint: {input_dir}: {error}") from None
        models.clear()

    # -- data: what the trainer needs, checked before the model loads ----------------------------

    #: The record fields of each part this trainer reads (`sft_needs`, `preference_needs`, ...).
    needs_attribute = "sft_needs"

    @classmethod
    def record_needs(cls, cfg: Config, parts: list) -> set[str]:
        needs = set().union(*(getattr(part, cls.needs_attribute) for part in parts))
        if cfg.training.mode == "i2i":
            needs.add("controls")
        if cfg.data.caption_dropout >= 1:
            needs.discard("prompt")  # every caption is dropped: prompts may be missing
        return needs

    @classmethod
    def records_for(cls, cfg: Config, parts: list) -> list:
        """The run's records (`data.path`), validated for what the parts need."""
        needs = cls.record_needs(cfg, parts)
        # Batches stack control images, unless a part packs whole conversations (BAGEL).
        same_controls = cfg.training.batch_size > 1 and "conversation" not in needs
        return load_records(cfg.data, needs, same_control_count=same_controls)

    @classmethod
    def validate_data(cls, cfg: Config) -> str:
        """`--validate`: the trainer's own record loading (training records, then the eval split),
        without loading any weight."""
        parts = build_family(cfg, "cpu", load=False).parts()
        records, held_out = cls.records_for(cfg, parts), validation.load_eval_split(cls, cfg, parts)
        return f"{len(records)} records" + (f" (+{len(held_out)} eval records)" if held_out else "")

    def batch_sampler(self, base: Any) -> tuple[Any, int]:
        """The sampler the loop iterates and the batches it serves per epoch (GRPO serves each block
        of batches `num_iterations` times). Asked before the LR schedule is built."""
        return base, len(base)

    @property
    def _deepspeed(self) -> bool:
        return self.accelerator.distributed_type.value == "DEEPSPEED"

    def context(self, epoch: int | None = None, scale: float = 1.0) -> StepContext:
        return StepContext(self.cfg.training.seed, self.epoch if epoch is None else epoch, self.global_step,
                           self.accelerator.backward, scale)

    def _restore(self, path: Path) -> None:
        where = f"training.resume_from_checkpoint: {path}"
        state = ckpt.load_checkpoint(path, self.accelerator.process_index)
        if ckpt.is_accelerate_state(path):
            try:
                # DeepSpeed checkpoints hold the trained tensors only (see save_checkpoint).
                deepspeed = {"load_module_strict": False} if self._deepspeed else {}
                self.accelerator.load_state(str(path), **deepspeed)
            except (ValueError, KeyError, RuntimeError) as error:  # torch: parameter groups / sizes differ
                raise ConfigError(f"{where}: the optimizer or model state does not fit this config ({error}); "
                                  "resume with the launch config (fsdp / ddp / deepspeed), optimizer and lora "
                                  "settings the checkpoint was written with.") from None
        else:  # written before accelerate's state: trainable tensors + optimizer.pt + scheduler.json
            try:
                self.family.load_trainable_state_dict(state["trainable"])
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as error:
                raise ConfigError(f"{where}: the optimizer state does not fit this config ({error}); resume with "
                                  "the optimizer and lora settings the checkpoint was written with.") from None
            self.scheduler.load_state_dict(state["scheduler"])
        # Ours last: accelerate restores RNG too but skips silently when it cannot.
        ckpt.set_rng_state(*state["rng"])
        trainer_state = state["trainer_state"]
        self.global_step = trainer_state["global_step"]
        self.epoch = trainer_state["epoch"]
        self.batch_in_epoch = trainer_state["batch_in_epoch"]
        self.load_extra_state(path)
        self.family.load_run_state(path)
        self.run_start.step = self.global_step
        self.saved_step = self.global_step  # the checkpoint resumed from holds this step
        if self.is_main:
            logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, self.global_step,
                        self.epoch, self.batch_in_epoch)

    def dataloader(self, start_batch: int) -> torch.utils.data.DataLoader:
        self.sampler.set_epoch(self.epoch, start_batch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate,
            num_workers=self.cfg.data.num_workers,
            # Its own generator: a new loader must not draw from the global RNG, or a resumed
            # run (which makes one more loader) would diverge from an unbroken one.
            generator=torch.Generator().manual_seed(self.cfg.training.seed + self.epoch))

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self) -> Path | None:
        """Every rank writes its files into one tmp folder (rank 0 names it): its RNG, its part of
        `Accelerator.save_state` (optimizer, schedule; FSDP / DeepSpeed shards; the hook adds the
        trainable tensors and LoRA files), its trainer extras. Once all are in, rank 0 (each node's
        first rank where nodes do not share the disk) writes trainer_state.json, renames the folder
        complete and prunes old ones."""
        acc = self.accelerator
        name = [ckpt.tmp_folder_name(self.global_step) if self.is_main else None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(name, src=0)
        folder = self.run_dir / name[0]
        if self.writes_files:
            ckpt.begin_checkpoint(self.run_dir, name[0])
        acc.wait_for_everyone()
        ckpt.write_rank_state(folder, acc.process_index, ckpt.rng_state())
        # DeepSpeed would write the whole module, the frozen base too (about 24 GB for FLUX).
        deepspeed = {"exclude_frozen_parameters": True} if self._deepspeed else {}
        ckpt.write_external(folder, lambda path: acc.save_state(path, **deepspeed))
        self.save_extra_state(folder)
        acc.wait_for_everyone()
        path = None
        if self.writes_files:
            state = {"global_step": self.global_step, "epoch": self.epoch,
                     "batch_in_epoch": self.batch_in_epoch, "method": self.method,
                     "family": self.cfg.model.family, "num_processes": acc.num_processes,
                     "distributed_type": acc.distributed_type.value}
            path = ckpt.commit_checkpoint(folder, self.global_step, state,
                                          self.cfg.training.checkpoints_total_limit)
            logger.info("Saved %s", path)
        acc.wait_for_everyone()
        self.saved_step = self.global_step
        return path

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.is_main:
            logger.warning("Received %s: saving a checkpoint at the next step boundary, then exiting.",
                           signal.Signals(signum).name)

    def _any_rank_stopping(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------------------------------
    # The loop

    def optimizer_step(self) -> float | None:
        grad_norm = None
        if self.cfg.training.max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable_params, self.cfg.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema = validation.ema_of(self)
        if ema is not None:  # training.ema: the averages follow every optimizer step
            ema.step(validation.trainable_parameters(self.family))
        return None if grad_norm is None else float(grad_norm)

    def train(self) -> Path:
        if self.family is None:
            self.setup()
        acc = self.accelerator
        validation.ema_of(self)  # built from the weights as set up (or resumed)
        evaluator = validation.evaluator_of(self)
        stopped_early = False
        accumulation = self.cfg.training.gradient_accumulation_steps
        deepspeed = self._deepspeed
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        progress = tqdm(total=self.max_steps, initial=self.global_step, disable=not self.is_main,
                        desc=f"{self.method} {self.cfg.model.family}", dynamic_ncols=True)
        stopped_by_signal = False
        try:
            for window in self._windows(accumulation) if self.global_step < self.max_steps else ():
                self.start_window([batch for _, _, batch in window], [epoch for epoch, _, _ in window])
                logged: list[dict[str, float]] = []
                for micro, (self.epoch, self.batch_in_epoch, batch) in enumerate(window):
                    last = micro == len(window) - 1  # gradients are synchronised on the last one
                    if deepspeed:  # its engine steps at a backward with sync_gradients (no public switch)
                        acc.gradient_state._set_sync_gradients(last)
                    with contextlib.ExitStack() as stack:
                        if not last:
                            for name in self.family.trained:
                                stack.enter_context(acc.no_sync(self.family.modules[name]))
                        logged.append(self.backward(batch, 1.0 / accumulation))
                self.batch_in_epoch += 1
                grad_norm = self.optimizer_step()
                self.global_step += 1
                self._log_step(logged, grad_norm, progress)
                # Before the checkpoint: it then holds this evaluation's best / patience state.
                if evaluator.due(self.global_step):
                    stopped_early = evaluator.run(self.global_step)
                if self.global_step % self.cfg.training.checkpointing_steps == 0:
                    self.save_checkpoint()
                if self.cfg.logging.sample_steps and self.global_step % self.cfg.logging.sample_steps == 0:
                    self._sample(self.global_step)
                if self._any_rank_stopping():
                    stopped_by_signal = True
                    break
                if self.global_step >= self.max_steps or stopped_early:
                    break
            if not stopped_by_signal and evaluator.active and evaluator.last_step != self.global_step:
                evaluator.run(self.global_step)  # the final weights are always evaluated
            # Known alike on every rank (not read from each node's own folder, which may differ).
            if self.saved_step != self.global_step:
                self.save_checkpoint()
            if not stopped_by_signal:
                sample_steps = self.cfg.logging.sample_steps
                if not sample_steps or self.global_step % sample_steps:
                    self._sample(self.global_step)
                self.save_final()
        finally:
            progress.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if getattr(self, "trackers", None) is not None:
                self.trackers.close()
        acc.wait_for_everyone()
        return self.run_dir

    def _windows(self, accumulation: int) -> Iterator[list[tuple[int, int, dict[str, Any]]]]:
        """The micro-batches from the current data position on, `accumulation` at a time (one
        optimizer step, which may span two epochs), as (epoch, index in epoch, batch): the whole
        window is known before its first backward (`start_window`)."""
        epoch, position, window = self.epoch, self.batch_in_epoch, []
        while True:
            if position >= self.batches_per_epoch:
                epoch, position = epoch + 1, 0
            self.epoch = epoch  # the loader of this epoch (its sampler, dataset and generator) reads it
            for batch in self.dataloader(position):
                window.append((epoch, position, batch))
                position += 1
                if len(window) == accumulation:
                    yield window
                    window = []

    def start_window(self, batches: list[dict[str, Any]], epochs: list[int]) -> None:
        """An optimizer step's micro-batches, before the first backward (SFT: parts that normalise
        over the whole step)."""

    def _log_step(self, window: list[dict[str, float]], grad_norm: float | None, progress: tqdm) -> None:
        averaged = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
        if self.accelerator.num_processes > 1:
            keys = sorted(averaged)
            values = torch.tensor([averaged[k] for k in keys], device=self.device, dtype=torch.float64)
            values = self.accelerator.reduce(values, reduction="mean")
            averaged = dict(zip(keys, values.tolist()))
        for group in self.optimizer.param_groups:
            averaged[f"lr/{group.get('name', 'default')}"] = float(group["lr"])  # some optimizers keep a tensor
        if grad_norm is not None and math.isfinite(grad_norm):
            averaged["grad_norm"] = grad_norm
        averaged.update(memory_stats(self.device))  # peak CUDA memory (or RSS) of this step
        progress.update(1)
        memory = averaged.get("memory/peak_allocated_gb", averaged.get("memory/peak_rss_gb", 0.0))
        progress.set_postfix(loss=f"{averaged.get('loss', float('nan')):.4f}",
                             lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", mem=f"{memory:.1f}G")
        if self.global_step % self.cfg.logging.log_steps == 0 or self.global_step == self.max_steps:
            self.trackers.log(averaged, self.global_step)

    def _sample(self, step: int) -> None:
        if not self.cfg.logging.sample_prompts:
            return
        # Sharded modules (FSDP / ZeRO-3) run forward only with every rank taking part: all sample.
        if self.is_main or getattr(self, "sharded", False):
            started = time.time()
            with validation.weights(self):  # the EMA weights when training.ema is on
                self.sample_images(step)
            logger.info("Sampled %d images in %.1fs", len(self.cfg.logging.sample_prompts), time.time() - started)
        self.accelerator.wait_for_everyone()

    def save_final(self) -> None:
        """The trained weights in the user-facing layout, in `<run>/final`."""
        with self.family.full_weights():  # FSDP / ZeRO-3: every rank gathers, one writes (consolidated)
            if self.writes_files and (self.is_main or not getattr(self, "sharded", False)):
                written = self.family.save_adapter(self.run_dir / "final")
                if validation.ema_of(self) is not None:  # the averages, in the same layout
                    with validation.weights(self):
                        written += self.family.save_adapter(self.run_dir / "final" / "ema")
                logger.info("Saved final weights: %s", ", ".join(str(p) for p in written))
        self.accelerator.wait_for_everyone()

    def save_samples(self, images: list, captions: list[str], step: int, notes: list[str] | None = None,
                     name: str = "samples") -> Path:
        """`samples/step-<step>.png` (`samples/<name>-step-<step>.png` for other names). `notes`
        (e.g. each image's rewards) are written in full under each image's caption."""
        if notes is None:
            grid = image_grid(images, captions)
        else:
            from PIL import Image, ImageDraw

            # Small images (tiny models) are enlarged so that a line of scores stays readable.
            width = max(160, images[0].size[0])
            height = images[0].size[1] * width // images[0].size[0]
            lines = [[caption[: width // 6]] + note.split(" ") for caption, note in zip(captions, notes)]
            strip = 11 * max(len(lines_) for lines_ in lines) + 4
            columns = min(4, len(images))
            rows = (len(images) + columns - 1) // columns
            canvas = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
            draw = ImageDraw.Draw(canvas)
            for index, image in enumerate(images):
                x, y = (index % columns) * width, (index // columns) * (height + strip)
                canvas.paste(image.convert("RGB").resize((width, height)), (x, y))
                draw.multiline_text((x + 2, y + height + 2), "\n".join(lines[index]), fill="black", spacing=1)
            grid = canvas
        stem = f"step-{step:06d}" if name == "samples" else f"{name}-step-{step:06d}"
        path = self.run_dir / "samples" / f"{stem}.png"
        if self.writes_files:  # under FSDP / ZeRO-3 every rank samples; one per disk writes
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
        self.trackers.log_image(name, grid, step)
        return path
