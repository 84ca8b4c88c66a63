"""GRPO, one recipe for every family: rollout -> score -> advantages -> per-part loss -> step.

Per micro-batch (a rank gets whole prompts, so groups never cross processes):
1. rollout: the family samples `grpo.num_generations` members per prompt with its trained parts
   (`ModelFamily.rollout`: a denoiser's SDE / DDIM trajectory with per-step log-probs; a token
   policy's sequences with per-token log-probs; GLM-Image chains its AR tokens into its DiT);
2. score: the reward calculator scores every image once; each trained part's total is its own
   weighted sum (`reward.weights.<part>`, else `reward.rewards.*.weight`);
3. advantages: group-normalised per part (`algorithms.grpo.compute_advantages`, `scale_rewards`,
   zero-std groups masked, clamped); with `grpo.dynamic_sample` the groups that tie on every part
   are sampled again (new noise) up to `grpo.max_resample_rounds` times, logged;
4. loss: each part back-propagates its clipped objective (+ `grpo.beta` x KL to the reference)
   on its own record (`part.policy_backward`); one optimizer step updates every part.

`grpo.num_iterations` > 1 (TRL's inner epochs): the rollouts of one optimizer step's micro-batches
are kept (`Rollout`) and trained on for `num_iterations` consecutive optimizer steps; the old
log-probs stay the rollout's, so the ratio is exactly 1 on the first iteration and the clip acts on
later ones. A checkpoint inside such a block stores the buffer in the checkpoint folder before it
is made complete, so resume is exact.

Evaluation (every `logging.sample_steps` and at the end): the eval prompts are sampled
deterministically (`ModelFamily.eval_images`, `grpo.eval_steps` ODE steps), scored, logged as
`eval/reward/*` (`eval/<part>/reward/*` with several parts) and saved as a grid with each image's
rewards under it, next to a grid of the latest rollout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from glm_training.algorithms.grpo import compute_advantages
from glm_training.config import ConfigError
from glm_training.data.datasets import Record, ShardedBatchSampler, collate
from glm_training.parts import prefixed
from glm_training.parts.sampler import reward_inputs, reward_notes
from glm_training.trainers.base import BaseTrainer

logger = logging.getLogger(__name__)

BUFFER_FILE = "rollout_buffer_rank{rank}.safetensors"
EVAL_PROMPTS_FALLBACK = 4  # eval on the first training prompts when logging.sample_prompts is empty
RESAMPLE_SEED_STRIDE = 1_000_003  # dynamic_sample round r draws from seed + r * stride


@dataclass
class Rollout:
    """One micro-batch of rollouts: each trained part's record, advantages and valid mask."""

    indices: list[int]  # dataset index of each prompt (each sampled `group` times, prompt-major)
    group: int
    records: dict[str, Any]  # part name -> DenoiserRollout / TokenRollout
    advantages: dict[str, torch.Tensor]  # part name -> (B*G,)
    valid: dict[str, torch.Tensor]  # part name -> (B*G,) bool, False in zero-std groups
    metrics: dict[str, dict[str, float]]  # part name -> reward statistics

    @property
    def members(self) -> list[int]:
        """Each member's id, prompt index x group + member: seeds its per-member draws."""
        return [int(index) * self.group + m for index in self.indices for m in range(self.group)]

    def to_tensors(self, micro: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, parts = {}, {}
        for name, record in self.records.items():
            prefix = f"{micro}.{name}"
            part_tensors, parts[name] = record.to_tensors(prefix)
            tensors.update(part_tensors)
            tensors[f"{prefix}.advantages"] = self.advantages[name].detach().cpu().contiguous()
            tensors[f"{prefix}.valid"] = self.valid[name].cpu().to(torch.uint8)
        return tensors, {"indices": self.indices, "group": self.group, "parts": parts, "metrics": self.metrics}

    @classmethod
    def from_tensors(cls, handle: Any, micro: str, meta: dict[str, Any], parts: list, device: torch.device
                     ) -> "Rollout":
        records, advantages, valid = {}, {}, {}
        for part in parts:
            prefix = f"{micro}.{part.name}"
            records[part.name] = part.record_class.from_tensors(handle, prefix, meta["parts"][part.name], device)
            advantages[part.name] = handle.get_tensor(f"{prefix}.advantages").to(device)
            valid[part.name] = handle.get_tensor(f"{prefix}.valid").bool().to(device)
        return cls(meta["indices"], meta["group"], records, advantages, valid, meta["metrics"])


class IterationBatchSampler:
    """Each block of `accumulation` consecutive batches of `base`, served `iterations` times in a
    row (one rollout, `iterations` optimizer steps). The ragged end of an epoch (fewer than
    `accumulation` batches) is dropped so blocks never cross epochs. Positions (`start_batch`)
    count served batches, as the trainer's `batch_in_epoch` does."""

    def __init__(self, base: ShardedBatchSampler, accumulation: int, iterations: int):
        self.base, self.accumulation, self.iterations = base, accumulation, iterations
        self.blocks = (base.num_samples // base.global_batch_size) // accumulation
        if self.blocks == 0:
            raise ConfigError(
                f"grpo.num_iterations > 1 needs at least training.gradient_accumulation_steps "
                f"({accumulation}) batches of prompts per epoch; the data has "
                f"{base.num_samples // base.global_batch_size}. Add prompts or lower the accumulation.")
        self.start_batch = 0

    @property
    def served_per_epoch(self) -> int:
        return self.blocks * self.accumulation * self.iterations

    def position(self, served: int) -> tuple[int, int]:
        """(iteration, micro-batch within the block) of the served batch number `served`."""
        within = served % (self.accumulation * self.iterations)
        return within // self.accumulation, within % self.accumulation

    def __len__(self) -> int:
        return self.served_per_epoch - self.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.base.set_epoch(epoch, 0)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.base)
        for served in range(self.start_batch, self.served_per_epoch):
            block = served // (self.accumulation * self.iterations)
            yield batches[block * self.accumulation + self.position(served)[1]]


def select_batch(batch: dict[str, Any], positions: list[int]) -> dict[str, Any]:
    """The prompts at `positions` of a prompts batch (lists, tensors and control groups indexed)."""
    def pick(value: Any) -> Any:
        return value[positions] if isinstance(value, torch.Tensor) else [value[p] for p in positions]

    return {key: [pick(g) for g in value] if key == "control_pixel_values" else pick(value)
            for key, value in batch.items()}


class GRPOTrainer(BaseTrainer):
    method = "grpo"
    needs_attribute = "rollout_needs"

    def dataset_items_per_batch(self) -> int:
        return self.cfg.training.batch_size // self.cfg.grpo.num_generations

    def build_dataset(self, records: list[Record]) -> torch.utils.data.Dataset:
        from glm_training.rewards import build_reward_calculator, resolve_weights

        grpo = self.cfg.grpo
        if grpo.beta > 0:
            self.family.snapshot_reference()  # full fine-tuning: frozen copy before any update
        self.records = records
        # Rollouts render the user's prompts (no caption dropout: the config check refuses it).
        self.family.prepare(records, caption_dropout=0.0)
        self.guidance = grpo.guidance_scale if grpo.train_cfg or grpo.guidance_scale == 1.0 else 1.0
        self.family.setup_rollouts(grpo.sample_steps, self.guidance, grpo.noise_level, grpo.sde_window)
        reward_cfg = self.cfg.to_dict()["reward"]
        # Each part's total is its own weighted sum of the rewards (`reward.weights.<part>`); one
        # calculator runs every reward any part uses, once per image.
        self.reward_weights: dict[str, dict[str, float]] = {}
        for part in self.parts:
            table = {n: w for n, w in resolve_weights(reward_cfg, part.name).items() if w != 0.0}
            if not table:
                raise ConfigError(f"reward.weights.{part.name}: every reward has weight 0 for the {part.name}; "
                                  "give it at least one reward.")
            self.reward_weights[part.name] = table
        used = [n for n in reward_cfg["rewards"] if any(n in t for t in self.reward_weights.values())]
        self.rewards = build_reward_calculator({**reward_cfg, "weights": {"used": {n: 1.0 for n in used}}}, "used")
        if len(self.parts) > 1:
            logger.info("Reward weights: %s", ", ".join(f"{k} {v}" for k, v in self.reward_weights.items()))
        self.buffer: dict[int, Rollout] = {}
        self.last_rollout: tuple[list[str], torch.Tensor, list[str]] | None = None  # prompts, images, notes
        return self.family.dataset(records, "prompts")

    def batch_sampler(self, base: Any) -> tuple[Any, int]:
        iterations = self.cfg.grpo.num_iterations
        if iterations == 1:
            return base, len(base)
        sampler = IterationBatchSampler(base, self.cfg.training.gradient_accumulation_steps, iterations)
        return sampler, sampler.served_per_epoch

    def optimizer_step(self) -> float | None:
        acc = self.accelerator
        if acc.num_processes > 1 and any(part.rollout_bypasses_wrapper for part in self.parts):
            # Their backward never went through DDP's forward, so DDP did not average the gradients.
            for param in self.trainable_params:
                if param.grad is not None:
                    param.grad = acc.reduce(param.grad, reduction="mean")
        return super().optimizer_step()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Not used: each part back-propagates its own loss in `backward`."""
        raise TypeError("GRPOTrainer back-propagates per part in backward().")

    # -- rollout -> score -> advantages --------------------------------------------------------

    @torch.no_grad()
    def make_rollout(self, batch: dict[str, Any]) -> Rollout:
        group = self.cfg.grpo.num_generations
        generation = self.family.rollout(batch, group, self.cfg.training.seed, self.global_step)
        inputs, totals, per_reward = self.score(batch, generation, group)
        resampled = 0
        if self.cfg.grpo.dynamic_sample:
            resampled = self.resample_tied_groups(batch, group, generation, inputs, totals, per_reward)
        self.family.on_scored(generation, totals, per_reward, self.global_step)
        advantages, valid, metrics = {}, {}, {}
        for part in self.parts:
            advantages[part.name], valid[part.name], metrics[part.name] = self.group_advantages(
                batch, totals, per_reward, part.name)
            if self.cfg.grpo.dynamic_sample:
                metrics[part.name]["dynamic_sample/resampled_groups"] = float(resampled)
        captions = self.family.rollout_captions(generation) or inputs.prompts
        self.last_rollout = (captions, generation.images, self.notes(totals, per_reward))
        return Rollout(list(batch["index"]), group, generation.records, advantages, valid, metrics)

    def score(self, batch: dict[str, Any], generation: Any, group: int
              ) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(reward inputs, each part's total, each reward's scores). Per-member metadata of the
        generation (e.g. the sampled `image_tokens`) reaches token-level rewards."""
        inputs = reward_inputs(batch, generation.images, group)
        if generation.metadata is not None:
            inputs.metadata = generation.metadata
        _, per_reward = self.rewards(inputs)
        count = len(inputs.prompts)
        totals = {name: sum((weight * per_reward[reward] for reward, weight in table.items()),
                            torch.zeros(count, dtype=torch.float32))
                  for name, table in self.reward_weights.items()}
        return inputs, totals, per_reward

    def tied_groups(self, totals: dict[str, torch.Tensor], group: int) -> list[int]:
        """Prompt positions whose members tie on every part's total (no signal anywhere)."""
        tied = None
        for total in totals.values():
            spread = total.view(-1, group)
            flat = (spread == spread[:, :1]).all(dim=1)
            tied = flat if tied is None else tied & flat
        return [int(p) for p in torch.nonzero(tied).flatten()]

    def resample_tied_groups(self, batch: dict[str, Any], group: int, generation: Any, inputs: Any,
                             totals: dict[str, torch.Tensor], per_reward: dict[str, torch.Tensor]) -> int:
        """`grpo.dynamic_sample`: sample tied groups again with new noise, in place; -> groups replaced."""
        replaced = 0
        for round_ in range(1, self.cfg.grpo.max_resample_rounds + 1):
            positions = self.tied_groups(totals, group)
            if not positions:
                break
            sub = select_batch(batch, positions)
            fresh = self.family.rollout(sub, group, self.cfg.training.seed + round_ * RESAMPLE_SEED_STRIDE,
                                        self.global_step)
            _, fresh_totals, fresh_scores = self.score(sub, fresh, group)
            members = [p * group + m for p in positions for m in range(group)]
            index = torch.tensor(members)
            generation.images[index] = fresh.images
            for name, record in generation.records.items():
                record.replace_members(members, fresh.records[name])
            if generation.metadata is not None:
                for j, member in enumerate(members):
                    generation.metadata[member] = fresh.metadata[j]
                inputs.metadata = generation.metadata
            for table, new in ((totals, fresh_totals), (per_reward, fresh_scores)):
                for key in table:
                    table[key][index] = new[key]
            replaced += len(positions)
        if replaced:
            logger.info("dynamic_sample: %d tied group(s) sampled again at step %d.", replaced, self.global_step)
        return replaced

    def group_advantages(self, batch: dict[str, Any], totals: dict[str, torch.Tensor],
                         per_reward: dict[str, torch.Tensor], name: str
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Group-normalised advantages of one part's total, its valid mask and its reward metrics.
        Group = one prompt of this rank's batch: all G members were sampled here."""
        grpo, acc = self.cfg.grpo, self.accelerator
        rewards = totals[name].float()
        count, ranks = len(rewards), acc.num_processes
        if grpo.scale_rewards == "batch" and ranks > 1:
            # One std over the whole global batch: every rank's rewards (rank order), groups kept apart.
            rewards = acc.gather(rewards.to(self.device)).cpu()
        group_ids = torch.arange(len(rewards) // grpo.num_generations).repeat_interleave(grpo.num_generations)
        advantages, valid, adv_stats = compute_advantages(rewards, group_ids, grpo.scale_rewards, grpo.adv_clip_max)
        if len(rewards) != count:  # this rank's members
            start = acc.process_index * count
            advantages, valid = advantages[start:start + count], valid[start:start + count]
        metrics = {**self.reward_stats(totals, per_reward, name),
                   **{key: float(value) for key, value in adv_stats.items() if key.endswith("_fraction")},
                   "advantage_abs_mean": float(advantages.abs().mean())}
        return advantages.to(self.device), valid.to(self.device), metrics

    def reward_stats(self, totals: dict[str, torch.Tensor], per_reward: dict[str, torch.Tensor],
                     name: str) -> dict[str, float]:
        """`reward/*` statistics of one part's total and of the rewards that make it."""
        return self.rewards.log_stats(totals[name], {r: per_reward[r] for r in self.reward_weights[name]})

    def notes(self, totals: dict[str, torch.Tensor], per_reward: dict[str, torch.Tensor]) -> list[str]:
        """Grid captions: `R=<total> name=<score> ...` (several parts: `R_<part>=...` each)."""
        names = list(totals)
        if len(names) == 1:
            return reward_notes(totals[names[0]], per_reward)
        first, *others = names
        lines = reward_notes(totals[first], {**{f"R_{n}": totals[n] for n in others}, **per_reward})
        return [line.replace("R=", f"R_{first}=", 1) for line in lines]

    # -- the policy update ---------------------------------------------------------------------

    def position(self) -> tuple[int, int]:
        """(iteration, micro-batch) of the batch being trained: (0, 0) without num_iterations."""
        if self.cfg.grpo.num_iterations > 1:
            return self.sampler.position(self.batch_in_epoch)
        return 0, 0

    def rollout_for(self, batch: dict[str, Any]) -> tuple[Rollout, int]:
        iteration, micro = self.position()
        if iteration == 0:
            rollout = self.make_rollout(batch)
            if self.cfg.grpo.num_iterations > 1:
                self.buffer[micro] = rollout
        else:
            rollout = self.buffer.get(micro)
            if rollout is None or rollout.indices != list(batch["index"]):
                raise RuntimeError(
                    f"GRPO num_iterations: no stored rollout for iteration {iteration}, micro-batch {micro} at "
                    f"step {self.global_step}. The checkpoint resumed from lacks {BUFFER_FILE.format(rank='<r>')}: "
                    "resume from an earlier checkpoint.")
        for part in self.parts:  # conditions dropped by a resume or dynamic_sample are rebuilt
            part.restore(rollout.records[part.name], batch, rollout.group)
        return rollout, iteration

    def backward(self, batch: dict[str, Any], scale: float) -> dict[str, float]:
        rollout, iteration = self.rollout_for(batch)
        ctx, several = self.context(scale=scale), len(self.parts) > 1
        metrics: dict[str, float] = {}
        loss = 0.0
        for part in self.parts:  # every part's loss into the same gradients: one optimizer step
            name = part.name
            part_metrics = part.policy_backward(rollout.records[name], rollout.advantages[name],
                                                rollout.valid[name], iteration, rollout.members, ctx)
            loss += part_metrics["loss"]
            metrics.update(prefixed(name, {**rollout.metrics[name], **part_metrics}, several))
        metrics["loss"] = loss
        metrics["iteration"] = float(iteration)
        return metrics

    # -- resumable rollout buffer (num_iterations > 1) ------------------------------------------

    def save_extra_state(self, folder: Path) -> None:
        """Every rank's rollout buffer, inside the tmp folder (a kill can never leave a `latest`
        without it)."""
        super().save_extra_state(folder)  # EMA and evaluation state
        if self.position()[0] != 0 and self.buffer:  # the next steps still train on this buffer
            from glm_training.utils import checkpoint as ckpt

            tensors, meta = {}, {}
            for micro, rollout in self.buffer.items():
                part_tensors, meta[str(micro)] = rollout.to_tensors(micro)
                tensors.update(part_tensors)
            ckpt.write_tensors(folder / BUFFER_FILE.format(rank=self.accelerator.process_index), tensors,
                               metadata={"rollouts": json.dumps(meta)})

    def load_extra_state(self, folder: Path) -> None:
        super().load_extra_state(folder)
        file = folder / BUFFER_FILE.format(rank=self.accelerator.process_index)
        if not file.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            meta = json.loads(handle.metadata()["rollouts"])
            for micro, info in meta.items():
                self.buffer[int(micro)] = Rollout.from_tensors(handle, micro, info, self.buffer_parts(), self.device)

    def buffer_parts(self) -> list:
        """What reads each part's stored record back (`.name`, `.record_class`): the parts themselves."""
        return self.parts

    # -- evaluation ------------------------------------------------------------------------------

    def eval_records(self) -> list[Record]:
        """The eval split (data.eval_path / data.eval_fraction / eval_* files), else
        `logging.sample_prompts` (+ `sample_control_images`), else the first training prompts."""
        from glm_training.evaluation import validation

        held_out = validation.evaluator_of(self).records
        if held_out:
            return held_out
        log = self.cfg.logging
        if log.sample_prompts:
            controls = log.sample_control_images or [None] * len(log.sample_prompts)
            return [Record(p, controls=[Path(c)] if c else []) for p, c in zip(log.sample_prompts, controls)]
        return self.records[:EVAL_PROMPTS_FALLBACK]

    @torch.no_grad()
    def _evaluation(self, step: int) -> dict[str, float]:
        """Deterministic samples of the eval prompts with the evaluation weights (EMA when on),
        scored by the trained rewards and `eval.rewards`, `eval.metrics` against targets, the
        guardrails; the grid saved once. Computed once per (step, weights)."""
        from glm_training.evaluation import validation
        from glm_training.evaluation.guardrails import guard_scalars

        key = (step, self.global_step)
        memo = getattr(self, "_eval_memo", None)
        if memo is not None and memo["key"] == key:
            return memo["metrics"]
        evaluator = validation.evaluator_of(self)
        records = self.eval_records()
        batch = collate([self.family.dataset(records, "prompts")[i] for i in range(len(records))])
        collapse = self.cfg.eval.collapse_std > 0
        with validation.evaluation_mode(self, records):
            generation = self.family.eval_images(batch, records, self.cfg.logging.sample_seed,
                                                 self.cfg.grpo.eval_steps, self.guidance)
            group = self.family.rollout(batch, self.cfg.grpo.num_generations, self.cfg.logging.sample_seed,
                                        0) if collapse else None
        _, totals, per_reward = self.score(batch, generation, 1)
        several = len(self.parts) > 1
        metrics: dict[str, float] = {}
        for name in totals:
            stats = self.reward_stats(totals, per_reward, name)
            metrics.update({f"eval/{name}/{k}" if several else f"eval/{k}": v for k, v in stats.items()})
        extra, independent = validation.score_images(evaluator, generation.images, batch,
                                                     validation.target_images(self, records, batch))
        metrics.update(extra)
        notes = self.notes(totals, per_reward)
        notes = [" ".join([line] + [f"{n}*={float(v[i]):.3f}" for n, v in independent.items()])
                 for i, line in enumerate(notes)]  # `*`: not trained on
        group_std = None
        if group is not None:
            _, group_totals, _ = self.score(batch, group, self.cfg.grpo.num_generations)
            group_std = {name: float(total.view(-1, self.cfg.grpo.num_generations).std(dim=1, unbiased=False).mean())
                         for name, total in group_totals.items()}
            metrics.update({f"eval/{n}/group_reward_std" if several else "eval/group_reward_std": v
                            for n, v in group_std.items()})
        if evaluator.rewards is not None or collapse:
            trained = {name: metrics[f"eval/{name}/reward/total_mean" if several else "eval/reward/total_mean"]
                       for name in totals}
            means = {name: metrics[f"eval/independent/{name}"] for name in independent}
            warnings = evaluator.guard.check(step, trained, means, group_std)
            metrics.update(guard_scalars(warnings))
            for warning in warnings:
                logger.warning("GRPO guardrail: %s", warning.message)
            tags = " ".join(w.tag for w in warnings)
            notes = [f"{note} {tags}" if tags else note for note in notes]
        if self.is_main:  # sharded runs evaluate on every rank; one grid
            self.save_samples(_pil(generation.images), list(batch["prompt"]), step, notes=notes)
        self._eval_memo = {"key": key, "metrics": metrics, "logged": False}
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """Deterministic samples of the eval prompts, scored; returns (and logs once) `eval/reward/*`."""
        metrics = self._evaluation(step)
        self.log_eval(metrics, step)
        return metrics

    def eval_metrics(self, step: int) -> dict[str, float]:
        """For the evaluator (eval.steps, best_metric, patience), which logs them with `log_eval`."""
        return self._evaluation(step)

    def log_eval(self, values: dict[str, float], step: int) -> None:
        """Once per step: the sample grid and the evaluator may both ask for this step's evaluation."""
        if not self._eval_memo["logged"]:
            self.trackers.log(values, step)
            self._eval_memo["logged"] = True

    def has_evaluation(self, evaluator: Any) -> bool:
        return True  # the eval prompts are always there (training prompts at worst)

    def sample_images(self, step: int) -> None:
        metrics = self.evaluate(step)
        reward = ", ".join(f"{k[len('eval/'):-len('/reward/total_mean')] or 'total'} {v:.4f}"
                           for k, v in metrics.items() if k.endswith("reward/total_mean"))
        logger.info("Step %d: eval reward %s (%d steps)", step, reward, self.cfg.grpo.eval_steps)
        if self.last_rollout is not None and self.is_main:
            prompts, images, notes = self.last_rollout
            self.save_samples(_pil(images), prompts, step, notes=notes, name="rollout")

    def _sample(self, step: int) -> None:
        from glm_training.evaluation.validation import sharded

        # Unlike the base class, GRPO evaluates even without logging.sample_prompts. Sharded modules
        # (FSDP / ZeRO-3) run forward only with every rank taking part: all sample, rank 0 writes.
        if self.is_main or sharded(self):
            self.sample_images(step)
        self.accelerator.wait_for_everyone()


def _pil(images: torch.Tensor) -> list:
    from PIL import Image

    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in array]
