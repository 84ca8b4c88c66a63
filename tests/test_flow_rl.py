"""Acceptance tests of the RL trainers on the flow-matching families (tiny models, CPU).

- Flow-DPO on FLUX.1 Kontext through DPOTrainer: held-out implicit accuracy rises from 0.5 on a
  colour preference set; the saved adapter loads into FluxKontextPipeline and changes its output.
- Flow-GRPO on FLUX.1 Kontext through GRPOTrainer (SDE rollouts): the brightness reward rises
  (rollouts and ODE evaluation); the sampler's SDE with noise level 0 is the Euler ODE (and the
  pipeline's own sampling); on-policy ratios are exactly 1 and the clip acts from the second
  inner iteration.
- Image-to-image GRPO on FLUX.1 Kontext with SSIM to the source image as reward.
- Qwen-Image: one DPO step and one GRPO step (smoke).

Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_lora_messages, unmatched_key_messages
from glm_training.config import ConfigError, config_from_dict
from glm_training.data.datasets import DataError
from glm_training.models.flux_kontext import FLUX_ATTENTION_TARGETS

T5_TOKENS = 32  # instead of 512: the text tokens dominate the tiny transformer's cost
# The attention projections alone barely move the tiny model's output; with the output
# projections (of the single blocks and the final layer) both objectives learn in a few seconds.
FLUX_TARGETS = FLUX_ATTENTION_TARGETS + ["proj_mlp", "proj_out"]


@pytest.fixture(scope="module", autouse=True)
def short_prompts():
    from glm_training.models.flux_kontext import FluxKontextFamily

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxKontextFamily, "max_sequence_length", T5_TOKENS)
        yield


def flux_config(tmp_path: Path, data_path: Path, resolution: int = 32, **sections) -> dict:
    raw = {
        "model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext"},
        "data": {"path": str(data_path), "resolution": resolution},
        "training": {"max_train_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "checkpointing_steps": 1000,
                     "seed": 0},
        "lora": {"rank": 8, "alpha": 8, "target_modules": FLUX_TARGETS},
        "logging": {"output_dir": str(tmp_path / "output"), "project": "flow_rl", "report_to": ["tensorboard"]},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def all_finite(row: dict) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    return path


@pytest.fixture(scope="module")
def flux_pipe():
    from diffusers import FluxKontextPipeline

    from glm_training.models.tiny import ensure_tiny

    return FluxKontextPipeline.from_pretrained(ensure_tiny("flux_kontext"))


# ----------------------------------------------------------------------------------------------
# 1. Flow-DPO


def test_flow_dpo_learns_the_preference_and_the_adapter_loads_into_the_pipeline(tmp_path, flux_pipe):

    from glm_training.config import DataConfig
    from glm_training.data.datasets import load_records
    from glm_training.data.synthetic import make_colour_preference_pairs
    from glm_training.trainers.dpo import DPOTrainer

    # Chosen images: a yellow shape on red; rejected: the same shape at the same place on blue.
    train_pairs = make_colour_preference_pairs(tmp_path / "train", count=8, size=32, seed=0)
    held_out = load_records(DataConfig(path=make_colour_preference_pairs(tmp_path / "eval", count=8, size=32, seed=1)),
                            {"prompt", "chosen", "rejected"})
    raw = flux_config(tmp_path, train_pairs, training={"method": "dpo", "max_train_steps": 150, "batch_size": 4,
                                                       "learning_rate": 3e-3},
                      dpo={"beta": 1000.0})
    trainer = DPOTrainer(config_from_dict(raw))
    trainer.setup()
    before = trainer.evaluate(held_out, draws=8)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert before["implicit_acc"] == pytest.approx(0.5) and before["reward_margin"] == 0.0
    run_dir = trainer.train()
    after = trainer.evaluate(held_out, draws=8)
    print(f"\nFlow-DPO held-out (8 pairs x 8 draws): implicit_acc {before['implicit_acc']:.3f} -> "
          f"{after['implicit_acc']:.3f}, reward_margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f}, "
          f"policy_mse_gap {before['policy_mse_gap']:.5f} -> {after['policy_mse_gap']:.5f}")
    assert after["implicit_acc"] >= 0.75, (before, after)
    assert after["reward_margin"] > 0 and after["policy_mse_gap"] < after["ref_mse_gap"]
    rows = read_rows(run_dir)
    assert len(rows) == 150 and all(all_finite(row) for row in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("implicit_acc", "reward_margin", "policy_mse_gap", "ref_mse_gap"):
        assert key in rows[-1]

    # The preference reaches the samples: ODE samples of the held-out prompts move (in latent
    # space) from the base model's towards the chosen images' latents, away from the rejected ones.
    from glm_training.data.datasets import PreferenceDataset, collate
    from glm_training.parts.sampler import DiffusionSampler

    family = trainer.family
    dataset = PreferenceDataset(held_out, 32, center_crop=True, random_flip=False)
    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        direction = (family.encode_images(batch["chosen_pixel_values"]).mean(0)
                     - family.encode_images(batch["rejected_pixel_values"]).mean(0)).float()
        condition = family.condition(family.encode_prompt([p.prompt for p in held_out]), {})
        noise = torch.randn(len(held_out), *family.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
        sampler = DiffusionSampler(family, 8, noise_level=0.0)
        trained = sampler.rollout(noise, condition).final
        with family.reference():
            base = sampler.rollout(noise, condition).final
    towards = ((trained - base) * direction).flatten(1).sum(1) / direction.norm()
    moved = (trained - base).flatten(1).norm(dim=1).mean()
    print(f"Flow-DPO ODE samples: shift towards chosen-minus-rejected latents {towards.mean():.3f} "
          f"(per sample min {towards.min():.3f}), |trained - base| {moved:.3f}")
    assert (towards > 0).all()

    # The adapter in the real pipeline: loads without warnings about the transformer, changes the
    # output, and unloads back to the base model.
    def generate():
        return flux_pipe(prompt="a yellow circle", height=32, width=32, max_area=32 * 32, _auto_resize=False,
                         num_inference_steps=2, guidance_scale=1.0, max_sequence_length=T5_TOKENS,
                         output_type="pt", generator=torch.Generator().manual_seed(0)).images

    base = generate()
    problems = [m for m in unmatched_key_messages(load_lora_messages(flux_pipe, run_dir / "final"))
                if "text_encoder" not in m]
    assert not problems, problems
    transformer = flux_pipe.transformer
    assert hasattr(transformer.proj_out, "lora_A") and hasattr(transformer.single_transformer_blocks[0].proj_mlp,
                                                                "lora_A")
    try:
        with_lora = generate()
        change = float((with_lora - base).abs().max())
        print(f"Flow-DPO adapter in FluxKontextPipeline: max |output change| {change:.4f}")
        assert change > 1e-3
    finally:
        flux_pipe.unload_lora_weights()
    torch.testing.assert_close(generate(), base)


# ----------------------------------------------------------------------------------------------
# 2. Flow-GRPO


def grpo_config(tmp_path: Path, prompts: Path, resolution: int = 16, training=None, **grpo) -> dict:
    return flux_config(tmp_path, prompts, resolution,
                       training={"method": "grpo", "max_train_steps": 50, "batch_size": 8, "learning_rate": 3e-2,
                                 **(training or {})},
                       grpo={"num_generations": 4, "sample_steps": 4, "noise_level": 0.9, "eval_steps": 8, **grpo},
                       reward={"rewards": {"brightness": {"weight": 1.0}}})


def test_flow_grpo_raises_the_brightness_reward(tmp_path):
    """16 px (one packed token, 64 latent values: a clean policy-gradient signal). The tiny random
    VAE's brightness depends little on the latents (rollout std about 0.005), so a rise of 0.01
    is clear; with training seeds 0-2 it was 0.02-0.03 in 50 steps."""
    from glm_training.trainers.grpo import GRPOTrainer

    raw = grpo_config(tmp_path, prompts_file(tmp_path))
    raw["logging"]["sample_steps"] = 25
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    eval_before = trainer.evaluate(0)["eval/reward/total_mean"]
    run_dir = trainer.train()
    rows = read_rows(run_dir)
    train = [row for row in rows if "reward/total_mean" in row]
    assert len(train) == 50 and all(all_finite(row) for row in train)
    rewards = [row["reward/total_mean"] for row in train]
    start, end = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    evals = {row["step"]: row["eval/reward/total_mean"] for row in rows if "eval/reward/total_mean" in row}
    assert sorted(evals) == [0, 25, 50]
    print(f"\nFlow-GRPO brightness: rollout mean reward (first 10 -> last 10 steps) {start:.4f} -> {end:.4f}; "
          f"ODE eval {eval_before:.4f} -> {evals[25]:.4f} (step 25) -> {evals[50]:.4f} (step 50); "
          f"within-group reward std at step 1 {train[0]['reward/total_std']:.4f}")
    assert end > start + 0.01, (start, end)
    assert evals[50] > evals[25] > eval_before and evals[50] > eval_before + 0.01, (eval_before, evals)
    assert train[0]["ratio_min"] == 1.0 == train[0]["ratio_max"] and train[0]["clip_fraction"] == 0.0
    for name in ("step-000050.png", "rollout-step-000050.png"):
        assert (run_dir / "samples" / name).is_file()


def test_sde_with_noise_level_zero_is_the_ode_and_the_pipelines_sampler(tmp_path, flux_pipe):
    from glm_training.models.base import build_family
    from glm_training.parts.sampler import DiffusionSampler

    cfg = config_from_dict(flux_config(tmp_path, prompts_file(tmp_path)))
    family = build_family(cfg)
    steps, size = 4, 32
    prompts = ["a red circle", "a blue square"]
    embeds = family.encode_prompt(prompts)
    condition = family.condition(embeds, {})
    noise = torch.randn(2, *family.latent_shape(size, size), generator=torch.Generator().manual_seed(0))

    ode = DiffusionSampler(family, steps, noise_level=0.0)
    with torch.no_grad():
        trajectory = ode.rollout(noise, condition)
        assert trajectory.stochastic == [False] * steps and torch.equal(trajectory.log_probs, torch.zeros(2, steps))
        # Euler by hand on the same sigmas: bitwise equal.
        x = noise.clone()
        schedule = ode.schedule(noise)
        assert schedule[0][1] == 1.0 and schedule[-1][2] == 0.0
        for k, (t, sigma, sigma_next) in enumerate(schedule):
            x = x + (sigma_next - sigma) * family.predict(x, t.expand(2), condition).float()
            assert torch.equal(x, trajectory.states[k + 1]), k

        # FluxKontextPipeline's own scheduler and transformer calls from the same noise.
        packed = flux_pipe(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
                           latents=family.pack(noise), height=size, width=size, max_area=size * size,
                           _auto_resize=False, num_inference_steps=steps, guidance_scale=1.0,
                           output_type="latent").images
    pipeline_final = family.unpack(packed, size // 8, size // 8)
    torch.testing.assert_close(trajectory.final, pipeline_final, rtol=1e-5, atol=1e-5)


def test_first_inner_iteration_is_on_policy_and_the_clip_acts_on_the_second(tmp_path):
    from glm_training.data.datasets import collate
    from glm_training.trainers.grpo import GRPOTrainer

    raw = grpo_config(tmp_path, prompts_file(tmp_path), training={"max_train_steps": 2},
                      num_iterations=2, epsilon=1e-4, eval_steps=2)
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    # Recomputing a rollout's log-probs with the unchanged policy (with gradients) gives the
    # stored ones bitwise.
    batch = collate([trainer.dataset[i] for i in (0, 1)])
    rollout = trainer.make_rollout(batch).records[trainer.parts[0].name]
    schedule = trainer.parts[0].sampler.schedule(rollout.trajectory.states[0])
    for k in range(trainer.cfg.grpo.sample_steps):
        step = trainer.parts[0].sampler.step(k, rollout.trajectory.states[k], rollout.condition, rollout.uncondition,
                                     prev_sample=rollout.trajectory.states[k + 1], schedule=schedule)
        assert step.log_prob.requires_grad
        assert torch.equal(step.log_prob.detach(), rollout.trajectory.log_probs[:, k])
    trainer.optimizer.zero_grad(set_to_none=True)

    first, second = [row for row in read_rows(trainer.train()) if "ratio_mean" in row]
    assert first["iteration"] == 0.0 and second["iteration"] == 1.0
    assert first["ratio_mean"] == first["ratio_min"] == first["ratio_max"] == 1.0
    assert first["clip_fraction"] == 0.0
    # Same rollout, updated policy: the ratio leaves 1 and, with epsilon 1e-4, the clip acts.
    assert second["ratio_min"] < 1.0 < second["ratio_max"] and second["clip_fraction"] > 0
    assert second["reward/total_mean"] == first["reward/total_mean"]  # no new rollout
    print(f"\nGRPO inner iterations: ratio [{first['ratio_min']}, {first['ratio_max']}] clip {first['clip_fraction']}"
          f" -> ratio [{second['ratio_min']:.4f}, {second['ratio_max']:.4f}] clip {second['clip_fraction']:.3f}")


def test_each_member_trains_its_own_timestep_subset_scored_exactly(tmp_path):
    """Flow-GRPO permutes the trained steps per sample: with grpo.timestep_fraction 0.5 each member
    draws its own subset from (seed, step, member id), the same whatever the batch split (so also
    on any rank count); one forward at mixed steps scores each stored transition bitwise."""
    from glm_training.data.datasets import collate
    from glm_training.parts import StepContext
    from glm_training.trainers.grpo import GRPOTrainer

    raw = grpo_config(tmp_path, prompts_file(tmp_path), training={"max_train_steps": 1}, timestep_fraction=0.5)
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    part = trainer.parts[0]
    rollout = trainer.make_rollout(collate([trainer.dataset[i] for i in (0, 1)]))
    record, members = rollout.records[part.name], rollout.members
    ctx = StepContext(seed=0, epoch=0, step=3, backward=lambda loss: None)
    steps = part.trained_steps(record.trajectory, members, ctx)
    assert len(steps) == 2 and all(len(k) == len(members) for k in steps)  # half of 4 steps, per member
    subsets = {tuple(sorted(column)) for column in zip(*steps)}
    assert len(subsets) > 1  # members differ (8 members, 6 possible subsets)
    # The first member half alone (another rank / batch split) draws the same subsets.
    half = part.trained_steps(record.trajectory, members[:4], ctx)
    assert half == [k[:4] for k in steps]
    assert part.trained_steps(record.trajectory, members, StepContext(0, 0, 4, lambda loss: None)) != steps

    trajectory = record.trajectory
    schedule = part.sampler.schedule(trajectory.states[0])
    for k in steps:
        state = torch.stack([trajectory.states[j][i] for i, j in enumerate(k)])
        target = torch.stack([trajectory.states[j + 1][i] for i, j in enumerate(k)])
        with torch.no_grad():
            step = part.sampler.step(k, state, record.condition, record.uncondition, prev_sample=target,
                                     schedule=schedule)
        assert torch.equal(step.log_prob, trajectory.log_probs[torch.arange(len(k)), torch.tensor(k)])


# ----------------------------------------------------------------------------------------------
# 3. Image-to-image GRPO with SSIM to the source image


def test_i2i_grpo_with_ssim_to_the_source_runs_with_finite_metrics(tmp_path):
    import random

    from glm_training.data.synthetic import draw_shape
    from glm_training.trainers.grpo import GRPOTrainer

    rng = random.Random(0)
    edits = []
    for i, shape in enumerate(("circle", "square")):
        draw_shape(shape, "blue", "white", 32, rng).save(tmp_path / f"{i}_source.png")
        edits.append({"prompt": f"make the {shape} red", "source_image": f"{i}_source.png"})
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in edits) + "\n")
    raw = flux_config(tmp_path, manifest, 32,
                      training={"method": "grpo", "mode": "i2i", "max_train_steps": 2, "batch_size": 4,
                                "learning_rate": 1e-3},
                      grpo={"num_generations": 2, "sample_steps": 3, "noise_level": 0.9, "eval_steps": 2,
                            "beta": 0.04, "timestep_fraction": 0.7},
                      reward={"rewards": {"ssim": {"weight": 1.0, "compare_to": "source"}}})
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    assert [len(s.controls) for s in trainer.records] == [1, 1]
    condition, _ = trainer.parts[0].generation_conditions(next(iter(trainer.dataloader(0))), 2, trainer.guidance)
    assert condition["control_tokens"].shape == (4, 4, 64)  # 2 prompts x G=2, 2x2 packed control tokens
    run_dir = trainer.train()
    rows = read_rows(run_dir)
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1, 2]
    for row in train:
        assert all_finite(row), row
        assert -1.0 <= row["reward/ssim_mean"] <= 1.0 and "kl" in row
    evals = [row for row in rows if "eval/reward/ssim_mean" in row]
    assert evals and all_finite(evals[-1])
    # Prompts without a source image in i2i mode are an error, not a silent text-to-image run.
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("\n".join(json.dumps({"prompt": e["prompt"]}) for e in edits) + "\n")
    with pytest.raises((ConfigError, DataError), match="source_image"):
        GRPOTrainer(config_from_dict({**raw, "data": {**raw["data"], "path": str(wrong)}})).setup()
    print(f"\ni2i GRPO (SSIM to source): rollout ssim {train[0]['reward/ssim_mean']:.4f}, "
          f"{train[1]['reward/ssim_mean']:.4f}; kl {train[1]['kl']:.2e}; "
          f"eval ssim {evals[-1]['eval/reward/ssim_mean']:.4f}")


# ----------------------------------------------------------------------------------------------
# 4. Qwen-Image (smoke)


def qwen_config(tmp_path: Path, data_path: Path, **sections) -> dict:
    raw = flux_config(tmp_path, data_path, **sections)
    raw["model"] = {"family": "qwen_image", "pretrained_model_name_or_path": "tiny:qwen_image"}
    raw["lora"] = {"rank": 4, "alpha": 4}
    return raw


def test_qwen_image_dpo_and_grpo_steps_have_finite_metrics(tmp_path):
    from glm_training.data.synthetic import make_colour_preference_pairs
    from glm_training.trainers.dpo import DPOTrainer
    from glm_training.trainers.grpo import GRPOTrainer

    pairs = make_colour_preference_pairs(tmp_path / "pairs", count=2, size=32)
    raw = qwen_config(tmp_path / "dpo", pairs, training={"method": "dpo", "max_train_steps": 1, "batch_size": 2})
    (row,) = read_rows(DPOTrainer(config_from_dict(raw)).train())
    assert all_finite(row) and row["loss"] == pytest.approx(math.log(2), abs=1e-5)

    raw = qwen_config(tmp_path / "grpo", prompts_file(tmp_path),
                      training={"method": "grpo", "max_train_steps": 1, "batch_size": 4},
                      grpo={"num_generations": 2, "sample_steps": 2, "noise_level": 0.7, "eval_steps": 2},
                      reward={"rewards": {"brightness": {"weight": 1.0}}})
    rows = read_rows(GRPOTrainer(config_from_dict(raw)).train())
    (train,) = [row for row in rows if "loss" in row]
    assert all_finite(train) and train["ratio_mean"] == 1.0
    assert any("eval/reward/total_mean" in row and all_finite(row) for row in rows)
