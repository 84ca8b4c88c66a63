"""Validation during training, the best checkpoint, early stopping and the EMA weights, written once
for every trainer and family on the parts' methods.

- Validation loss (SFT, DPO) on the eval split (`load_records(cfg.data, needs, split="eval")`): the
  parts' own losses at FIXED draws: draw `d` of `eval.draws` is `StepContext(epoch=d)`, so noise and
  timesteps come from (training.seed, d, eval index) and the value is comparable across steps and
  runs (bitwise equal for equal weights). Denoisers also give per-sample timesteps
  (`sft_eval_losses`): `eval/loss_t<lo>-<hi>` per quarter of [0, 1] (1 = pure noise). DPO gives
  the held-out implicit accuracy and margins. No caption/control dropout, no cache, modules in eval
  mode, the global RNG untouched (`torch.random.fork_rng`).
- Metrics against targets (`eval.metrics`) and rewards not trained on (`eval.rewards`) on images
  generated for the eval prompts with `family.eval_images` (deterministic ODE, logging.sample_seed).
- `eval.best_metric` / `eval.mode`: `<run>/best/` holds the family's user-facing weights (the EMA
  weights when training.ema is on: what was evaluated) and `best.json`; written to a tmp folder and
  renamed, like checkpoints. `eval.patience`: stop after that many evaluations without improvement.
- EMA (`training.ema`): `utils.ema.TrainableEMA` over the trained tensors; evaluation, samples and
  best/ use the averages (`weights(trainer)`), the raw weights keep training.

Everything runs on the main process (unwrapped modules: a DDP forward on one rank would hang),
except with sharded modules (FSDP / ZeRO-3), whose forward passes need every rank: then every
rank evaluates the same eval split (the values agree) and rank 0's are kept; best/ is gathered by
every rank and written by rank 0. The metrics are broadcast so every rank takes the same best /
stop decision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from glm_training.config import ConfigError

logger = logging.getLogger(__name__)

EVAL_STATE_FILE = "eval_state.json"
BEST_DIR = "best"
BEST_FILE = "best.json"
TIMESTEP_BUCKETS = 4


# ---------------------------------------------------------------------------------------------
# Weights: EMA and evaluation mode
# ---------------------------------------------------------------------------------------------

def trainable_parameters(family: Any) -> dict[str, torch.Tensor]:
    """The trained tensors by checkpoint name (`component.parameter`), unwrapped."""
    return {f"{name}.{pname}": p for name in family.trained
            for pname, p in family.unwrapped(name).named_parameters() if p.requires_grad}


def build_ema(trainer: Any) -> Any:
    """`training.ema` -> a TrainableEMA over the trained tensors (None when off)."""
    settings = trainer.cfg.training.ema
    if settings is None:
        return None
    from glm_training.utils.ema import TrainableEMA

    return TrainableEMA(trainable_parameters(trainer.family), decay=settings.decay,
                        update_after_step=settings.update_after_step, device=settings.device)


def ema_of(trainer: Any) -> Any:
    """The trainer's EMA, built on first use (after the trained parts exist)."""
    if not hasattr(trainer, "ema"):
        trainer.ema = build_ema(trainer)
    return trainer.ema


@contextlib.contextmanager
def weights(trainer: Any) -> Iterator[None]:
    """The weights to evaluate / sample / publish with: the EMA averages when training.ema is on."""
    ema = ema_of(trainer)
    if ema is None:
        yield
        return
    with ema.swapped(trainable_parameters(trainer.family)):
        yield


@contextlib.contextmanager
def evaluation_mode(trainer: Any, records: list | None = None) -> Iterator[None]:
    """Eval weights, unwrapped trained modules in eval mode, no grad, the global RNG restored after;
    with `records`, every part reads them (the eval split) instead of the training records."""
    family = trainer.family
    saved = {name: family.modules[name] for name in family.trained}
    modes = {name: family.unwrapped(name).training for name in saved}
    devices = [trainer.device] if torch.device(trainer.device).type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(weights(trainer))
        family.modules.update({name: family.unwrapped(name) for name in saved})
        stack.callback(family.modules.update, saved)
        for name in saved:
            family.modules[name].eval()
            stack.callback(family.unwrapped(name).train, modes[name])
        if records is not None:
            for part in trainer.parts:
                stack.enter_context(part.evaluating(records))
        yield


# ---------------------------------------------------------------------------------------------
# The eval split (read and checked before any weight, with the training records)
# ---------------------------------------------------------------------------------------------

def load_eval_split(trainer_cls: Any, cfg: Any, parts: list) -> list:
    """The held-out records (`data.eval_path` / `data.eval_fraction` / the layout's eval_* files)
    with the fields `trainer_cls` reads from `parts`, checked like the training records, and
    checked for what `eval.metrics` needs (text answers for bleu / rouge); [] when there is none.
    Needs only the parts' declarations: `BaseTrainer.setup` and `--validate` call it before the
    model loads."""
    from glm_training.data.datasets import DataError
    from glm_training.data.records import load_records
    from glm_training.evaluation.metrics import TEXT_METRICS

    needs = trainer_cls.record_needs(cfg, parts)
    same_controls = cfg.training.batch_size > 1 and "conversation" not in needs
    eval_path = getattr(cfg.data, "eval_path", None)
    records = load_records(cfg.data, needs, split="eval", same_control_count=same_controls)
    texts = [name for name in cfg.eval.metrics if name in TEXT_METRICS]
    if texts and not any(text_questions(r) for r in records):
        where = f"data.eval_path {eval_path}" if eval_path else "the eval split (data.eval_fraction / eval_* files)"
        raise DataError(f"eval.metrics: {', '.join(texts)} score text answers against the held-out conversations' "
                        f"assistant text, and {where} has no conversation with an assistant text answer"
                        f"{'' if records else ' (it is empty)'}; add such conversations to the eval split or remove "
                        f"{', '.join(texts)} from eval.metrics.")
    return records


def text_questions(record: Any) -> list[tuple[list, str]]:
    """The text questions of a held-out conversation (`record.metadata["conversation"]`, a BAGEL
    sequence plan): for each assistant text answer (a learned text item), the items before it as
    the question's context and the answer as the reference. [] for records without one."""
    plan = getattr(record, "metadata", {}).get("conversation")
    items = getattr(plan, "items", None) or []
    questions = []
    for index, item in enumerate(items):
        if getattr(item, "loss", False) and isinstance(getattr(item, "text", None), str):
            questions.append((list(items[:index]), item.text))
    return questions


def text_metrics(trainer: Any, evaluator: "Evaluator", records: list) -> dict[str, float]:
    """`eval.metrics` bleu / rouge: the family's greedy answers (`family.answer`) to every held-out
    conversation's questions against their reference answers. Call inside `evaluation_mode`."""
    metrics = evaluator.metrics
    questions = [q for record in records for q in text_questions(record)]
    answers = trainer.family.answer([context for context, _ in questions], max_new_tokens=ANSWER_MAX_NEW_TOKENS)
    metrics.reset()
    metrics.update_texts(list(answers), [reference for _, reference in questions])
    return {f"eval/{key}": value for key, value in metrics.compute().items()}


#: Length limit of the answers scored by bleu / rouge (held-out answers are short).
ANSWER_MAX_NEW_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# Validation losses
# ---------------------------------------------------------------------------------------------

def _batches(trainer: Any, dataset: Any) -> Iterator[dict[str, Any]]:
    from glm_training.data.datasets import collate

    # Buckets give items of several sizes: one at a time (they are fixed, so the value is too).
    size = 1 if trainer.cfg.data.buckets else trainer.cfg.training.batch_size
    for start in range(0, len(dataset), size):
        yield collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])


def _draws(trainer: Any, draws: int) -> int:
    # Token losses are exact (nothing is drawn): one draw says it all.
    return 1 if all(getattr(part, "kind", "") == "tokens" for part in trainer.parts) else draws


def _context(trainer: Any, draw: int) -> Any:
    from glm_training.parts import StepContext

    def no_backward(_: torch.Tensor) -> None:
        raise RuntimeError("validation computes no gradients")

    return StepContext(trainer.cfg.training.seed, draw, trainer.global_step, no_backward, 1.0)


def _per_sample(part: Any) -> bool:
    """Whether `part.sft_eval_losses` computes the same loss as its `sft_loss`: not when a subclass
    replaced `sft_loss` only (BAGEL's packed sequences), which then gives its batch loss."""
    def owner(name: str) -> type | None:
        return next((cls for cls in type(part).__mro__ if name in vars(cls)), None)

    evaluated, trained = owner("sft_eval_losses"), owner("sft_loss")
    return evaluated is not None and trained is not None and issubclass(evaluated, trained)


def bucket_name(index: int) -> str:
    lo, hi = index / TIMESTEP_BUCKETS, (index + 1) / TIMESTEP_BUCKETS
    return f"loss_t{lo:.2f}-{hi:.2f}"


def sft_validation(trainer: Any, records: list, draws: int) -> dict[str, float]:
    """SFT loss on `records` (the eval split), averaged over every sample and draw; per trained
    part (`<part>/loss` with several) and per timestep bucket for denoisers. Call inside
    `evaluation_mode(trainer, records)`."""
    from glm_training.parts import prefixed

    several = len(trainer.parts) > 1
    dataset = trainer.family.dataset(records, "images")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(key: str, values: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.double().sum())
        counts[key] = counts.get(key, 0) + values.numel()

    for batch in _batches(trainer, dataset):
        count = len(batch["index"])
        for draw in range(_draws(trainer, draws)):
            ctx = _context(trainer, draw)
            total = torch.zeros(count, dtype=torch.float64)
            for part in trainer.parts:
                if _per_sample(part):
                    losses, timesteps = part.sft_eval_losses(batch, ctx)
                else:  # a part with only a batch loss (BAGEL's packed sequences)
                    loss, _ = part.sft_loss(batch, ctx)
                    losses, timesteps = torch.full((count,), float(loss)), None
                total += losses.double()
                keys = {"loss": losses}
                if timesteps is not None:
                    bucket = (timesteps.clamp(0, 1) * TIMESTEP_BUCKETS).long().clamp(max=TIMESTEP_BUCKETS - 1)
                    for b in range(TIMESTEP_BUCKETS):
                        if (bucket == b).any():
                            keys[bucket_name(b)] = losses[bucket == b]
                if several:
                    for key, values in prefixed(part.name, keys, True).items():
                        add(key, values)
                else:
                    for key, values in keys.items():
                        if key != "loss":
                            add(key, values)
            add("loss", total)
    return {f"eval/{key}": sums[key] / counts[key] for key in sums}


def preference_validation(trainer: Any, records: list, draws: int) -> dict[str, float]:
    """DPO loss, implicit accuracy and margins on held-out pairs, averaged over samples and draws
    (`trainer.dpo_loss` at `epoch = draw`). Call inside `evaluation_mode(trainer, records)`."""
    if all(getattr(part, "exact_preference", False) for part in trainer.parts):
        draws = 1  # token log-probs are exact: nothing is drawn
    dataset = trainer.family.dataset(records, "pairs")
    sums: dict[str, float] = {}
    seen = 0
    for batch in _batches(trainer, dataset):
        pairs = [records[i] for i in batch["index"]]
        count = len(pairs)
        for draw in range(draws):
            loss, metrics = trainer.dpo_loss(batch, epoch=draw, pairs=pairs)
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * count
        seen += count
    return {key: value / (seen * draws) for key, value in sums.items()}


# ---------------------------------------------------------------------------------------------
# Images for metrics and independent rewards
# ---------------------------------------------------------------------------------------------

def prompts_batch(trainer: Any, records: list) -> dict[str, Any]:
    from glm_training.data.datasets import collate

    dataset = trainer.family.dataset(records, "prompts")
    return collate([dataset[i] for i in range(len(dataset))])


def target_images(trainer: Any, records: list, batch: dict[str, Any]) -> torch.Tensor | None:
    """Targets in [0, 1] for the metrics: the records' target images, else the preferred image of
    each pair; None when the eval records have neither."""
    if "target_pixel_values" in batch:
        return (batch["target_pixel_values"].float() + 1) / 2
    if records and all(r.chosen is not None for r in records):
        dataset = trainer.family.dataset(records, "pairs")
        return torch.stack([(dataset[i]["chosen_pixel_values"].float() + 1) / 2 for i in range(len(dataset))])
    return None


def independent_rewards(cfg: Any) -> Any:
    """The calculator of `eval.rewards` (rewards not trained on), or None."""
    if not cfg.eval.rewards:
        return None
    from glm_training.rewards import build_reward_calculator

    reward = cfg.to_dict()["reward"]
    section = {"rewards": dict(cfg.eval.rewards), "device": reward.get("device"),
               "batch_size": reward.get("batch_size"), "on_error": reward.get("on_error", "raise")}
    try:
        return build_reward_calculator(section)
    except ConfigError as error:
        raise ConfigError(f"eval.rewards: {str(error).replace('reward.rewards', 'eval.rewards')}") from None


def score_images(evaluator: "Evaluator", images: torch.Tensor, batch: dict[str, Any],
                 targets: torch.Tensor | None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """`eval.metrics` against the targets and `eval.rewards` on generated images (B, 3, H, W) in [0, 1]
    -> (scalars to log, each independent reward's per-image scores)."""
    from glm_training.parts.sampler import reward_inputs

    values: dict[str, float] = {}
    scores: dict[str, torch.Tensor] = {}
    images = images.float().cpu()
    if evaluator.metrics is not None:
        if targets is not None and targets.shape[-2:] != images.shape[-2:]:  # buckets: other crops
            targets = torch.nn.functional.interpolate(targets, size=images.shape[-2:], mode="bilinear",
                                                      antialias=True, align_corners=False)
        prompts = list(batch["prompt"])
        values.update({f"eval/{k}": v for k, v in evaluator.metrics.evaluate(images, prompts, targets).items()})
    if evaluator.rewards is not None:
        _, scores = evaluator.rewards(reward_inputs(batch, images, 1))
        for name, value in scores.items():
            finite = value[torch.isfinite(value)]
            values[f"eval/independent/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
    return values, scores


def generated_metrics(trainer: Any, evaluator: "Evaluator", records: list) -> dict[str, float]:
    """SFT / DPO: eval images of the eval prompts (ODE, logging.sample_*), scored, and the text
    metrics on the held-out conversations' answers. Call inside `evaluation_mode(trainer, records)`."""
    values: dict[str, float] = {}
    metrics = evaluator.metrics
    if metrics is not None and metrics.text_metrics:  # bleu / rouge: text answers (load_eval_split checked them)
        values.update(text_metrics(trainer, evaluator, records))
    if evaluator.rewards is None and (metrics is None or not metrics.image_metrics):
        return values
    log = trainer.cfg.logging
    batch = prompts_batch(trainer, records)
    generation = trainer.family.eval_images(batch, records, log.sample_seed, log.sample_num_inference_steps,
                                            log.sample_guidance_scale)
    scored, _ = score_images(evaluator, generation.images, batch, target_images(trainer, records, batch))
    values.update(scored)
    return values


# ---------------------------------------------------------------------------------------------
# Best checkpoint and early stopping
# ---------------------------------------------------------------------------------------------

class BestTracker:
    """The best value of one logged eval key and how many evaluations passed without improving it."""

    def __init__(self, metric: str | None, mode: str = "min", patience: int | None = None):
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.stale = 0  # evaluations since the last improvement

    def update(self, step: int, values: dict[str, float]) -> bool:
        """-> whether this evaluation is the new best."""
        if self.metric is None:
            return False
        if self.metric not in values:
            raise ConfigError(f"eval.best_metric: {self.metric!r} is not among this run's eval values "
                              f"{sorted(values)}; pick one of them.")
        value = float(values[self.metric])
        better = math.isfinite(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best))
        if better:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.stale = state["best"], state["best_step"], state["stale"]


def publish_best(trainer: Any, step: int, metric: str, value: float, values: dict[str, float]) -> Path | None:
    """`<run>/best/`: the evaluated weights in the user-facing layout and best.json, written into a
    tmp folder first and renamed (a killed run never leaves a half-written best/). Sharded modules
    (FSDP / ZeRO-3): every rank calls it to gather the full weights, rank 0 writes; -> the folder
    where this process wrote it, else None."""
    from glm_training.utils import checkpoint as ckpt

    writer = trainer.writes_files and (trainer.is_main or not sharded(trainer))
    run_dir = Path(trainer.run_dir)
    final = run_dir / BEST_DIR
    tmp = run_dir / f"{BEST_DIR}{ckpt.TMP_MARK}{os.getpid()}"
    if writer:
        ckpt.remove_tree(tmp)
        tmp.mkdir(parents=True)
    with weights(trainer), trainer.family.full_weights():  # a collective when sharded
        if writer:
            ckpt.write_external(tmp, trainer.family.save_adapter)
    if not writer:
        return None
    ckpt.write_json(tmp / BEST_FILE, {"step": step, "metric": metric, "value": value,
                                      "mode": trainer.cfg.eval.mode, "ema": trainer.cfg.training.ema is not None,
                                      "eval": values}, indent=2)
    if final.exists():
        aside = run_dir / f"{BEST_DIR}{ckpt.TMP_MARK}replaced-{os.getpid()}"
        os.replace(final, aside)
        ckpt.publish(tmp, final)
        ckpt.remove_tree(aside)
    else:
        ckpt.publish(tmp, final)
    return final


def recover_best(run_dir: Path) -> None:
    """Main process, at start: a kill between the two renames of `publish_best` leaves only the
    previous best aside: put it back; drop half-written tmp folders."""
    from glm_training.utils import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    leftovers = sorted(p for p in run_dir.iterdir() if p.name.startswith(f"{BEST_DIR}{ckpt.TMP_MARK}"))
    for path in leftovers:
        if "replaced-" in path.name and not (run_dir / BEST_DIR).exists():
            os.replace(path, run_dir / BEST_DIR)
        else:
            ckpt.remove_tree(path)


# ---------------------------------------------------------------------------------------------
# The evaluator the training loop calls
# ---------------------------------------------------------------------------------------------

class Evaluator:
    """Evaluation of one run: what to compute (the trainer's `eval_metrics(step)`), when
    (`eval.steps`, and at the end), the best checkpoint, early stopping, the guardrails' state."""

    def __init__(self, trainer: Any):
        from glm_training.evaluation.guardrails import RewardGuard
        from glm_training.evaluation.metrics import build_metrics

        self.trainer, cfg = trainer, trainer.cfg
        ev = cfg.eval
        self.records = trainer.eval_split()
        self.metrics = build_metrics(ev.metrics, ev.metric_options) if ev.metrics else None
        self.rewards = independent_rewards(cfg)
        self.best = BestTracker(ev.best_metric, ev.mode, ev.patience)
        self.guard = RewardGuard(ev.hacking_threshold, ev.collapse_std)
        self.last_step: int | None = None  # step of the last evaluation
        self.last_values: dict[str, float] = {}
        if trainer.writes_files:  # each node's writer where nodes do not share the disk
            recover_best(trainer.run_dir)

    @property
    def active(self) -> bool:
        """Whether this run evaluates at all (periodically and at the end)."""
        ev = self.trainer.cfg.eval
        return bool(self.trainer.has_evaluation(self) or ev.steps or ev.best_metric)

    def due(self, step: int) -> bool:
        steps = self.trainer.cfg.eval.steps
        return bool(steps) and step % steps == 0 and step != self.last_step

    def run(self, step: int) -> bool:
        """Evaluate at `step` (main process; every rank when the modules are sharded), log `eval/*`
        from the main process, keep best/; every rank -> whether to stop early."""
        trainer = self.trainer
        values: dict[str, float] = {}
        if trainer.is_main or sharded(trainer):
            values = dict(trainer.eval_metrics(step))
            if not values:
                raise ConfigError(
                    "eval: nothing to evaluate: this run has no eval split (set data.eval_path or "
                    "data.eval_fraction, or ship eval_* files) and no eval.metrics / eval.rewards; remove "
                    "eval.steps / eval.best_metric or give it eval data.")
        values = _broadcast(values)
        improved = self.best.update(step, values)
        self.last_step, self.last_values = step, values
        if trainer.is_main:
            trainer.log_eval(values, step)
            shown = ", ".join(f"{k[len('eval/'):]} {v:.5g}" for k, v in sorted(values.items())[:8])
            logger.info("Step %d eval: %s", step, shown)
        if improved and (trainer.writes_files or sharded(trainer)):
            path = publish_best(trainer, step, self.best.metric, self.best.best, values)
            if path is not None:
                logger.info("New best %s %.6g at step %d: %s", self.best.metric, self.best.best, step, path)
        trainer.accelerator.wait_for_everyone()
        if self.best.exhausted:
            if trainer.is_main:
                logger.warning("Early stopping at step %d: %s did not improve for %d evaluations (eval.patience); "
                               "best %.6g at step %d (%s/%s).", step, self.best.metric, self.best.patience,
                               self.best.best, self.best.best_step, trainer.run_dir, BEST_DIR)
            return True
        return False

    # -- resumable state (written by the base trainer's save_extra_state) -------------------------

    def state_dict(self) -> dict:
        return {"best": self.best.state_dict(), "guard": self.guard.state_dict(), "last_step": self.last_step,
                "last_values": self.last_values}

    def load_state_dict(self, state: dict) -> None:
        self.best.load_state_dict(state["best"])
        self.guard.load_state_dict(state["guard"])
        self.last_step, self.last_values = state["last_step"], state["last_values"]


def sharded(trainer: Any) -> bool:
    """Whether the trained modules are sharded over the ranks (FSDP / DeepSpeed): then a forward
    pass, and gathering the full weights, needs every rank."""
    return bool(getattr(trainer, "sharded", False)) and trainer.accelerator.num_processes > 1


def evaluator_of(trainer: Any) -> Evaluator:
    """The trainer's evaluator, built on first use (after setup: it reads the eval split)."""
    if getattr(trainer, "evaluator", None) is None:
        trainer.evaluator = Evaluator(trainer)
    return trainer.evaluator


def _broadcast(values: dict[str, float]) -> dict[str, float]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [values]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return values


# ---------------------------------------------------------------------------------------------
# Checkpoint state: EMA averages and the evaluator's state
# ---------------------------------------------------------------------------------------------

def save_state(trainer: Any, folder: Path) -> None:
    """The checkpoint's writer(s): `ema.safetensors` (when training.ema is on) and `eval_state.json`
    into the checkpoint's tmp folder (every rank holds the same values)."""
    if not trainer.writes_files:
        return
    from glm_training.utils import checkpoint as ckpt
    from glm_training.utils.ema import EMA_FILE

    ema = ema_of(trainer)
    if ema is not None:
        ckpt.write_tensors(Path(folder) / EMA_FILE, ema.state_dict())
    ckpt.write_json(Path(folder) / EVAL_STATE_FILE, evaluator_of(trainer).state_dict())


def load_state(trainer: Any, folder: Path) -> None:
    """Every rank, on resume: the EMA averages and the evaluator's state written by `save_state`."""
    from glm_training.utils.ema import EMA_FILE

    folder = Path(folder)
    ema = ema_of(trainer)
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise ConfigError(f"training.resume_from_checkpoint: {folder} has no {EMA_FILE}: it was written without "
                              "training.ema. Resume with training.ema: null, or start a new run.")
        try:
            ema.load(folder / EMA_FILE)
        except ValueError as error:
            raise ConfigError(f"training.resume_from_checkpoint: {folder}/{EMA_FILE}: {error}") from None
    state = folder / EVAL_STATE_FILE
    if state.is_file():
        evaluator_of(trainer).load_state_dict(json.loads(state.read_text()))
