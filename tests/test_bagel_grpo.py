"""Flow-GRPO on BAGEL's generation expert (tiny model, 16 px) through the shared GRPOTrainer path:
BagelFamily presents the sampler interface (objective with the official sampling shift,
latent_shape, predict = BAGEL's guided velocity on per-prompt KV-cached contexts, decode_latents)
and builds its own rollout conditions (text-to-image, or edits of a source image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from glm_training.config import ConfigError, config_from_dict, load_config
from glm_training.models.base import build_family
from glm_training.models.bagel.generate import SAMPLING_TIMESTEP_SHIFT, BagelSampler
from glm_training.parts.sampler import DiffusionSampler

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "bagel_grpo.yaml"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(tmp_path: Path, data_path: Path, training=None, grpo=None, reward=None) -> dict:
    """The shipped config, scaled down to the tiny model on CPU."""
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["model"].update(pretrained_model_name_or_path="tiny:bagel", gradient_checkpointing=False)
    raw["data"].update(path=str(data_path), resolution=16)
    raw["training"].update({"mixed_precision": "no", "batch_size": 8, "gradient_accumulation_steps": 1,
                            "learning_rate": 1e-2, "max_train_steps": 30, "checkpointing_steps": 1000, "seed": 0,
                            **(training or {})})
    raw["grpo"].update({"num_generations": 4, "sample_steps": 4, "eval_steps": 4, "noise_level": 0.9, "beta": 0.0,
                        "timestep_fraction": 1.0, **(grpo or {})})
    raw["reward"] = {"rewards": reward or {"brightness": {"weight": 1.0}}}
    raw["lora"].update(rank=8, alpha=8)
    raw["logging"].update(output_dir=str(tmp_path / "out"), report_to=[], sample_steps=1000)
    return raw


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def edits_file(tmp_path: Path) -> Path:
    lines = []
    for i, colour in enumerate(("blue", "white")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"source{i}.png")
        lines.append(json.dumps({"prompt": f"make it red {i}", "source_image": f"source{i}.png"}))
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sde_with_noise_level_zero_is_bagels_euler_ode(tmp_path):
    """The shared sampler at noise level 0 on the family interface = BagelSampler.generate (same
    noise, S steps = S + 1 official timesteps), bitwise; also with cfg 4 through the official interval."""
    family = build_family(config_from_dict(tiny_config(tmp_path, prompts_file(tmp_path))))
    for cfg_text_scale in (1.0, 4.0):
        check_ode(family, cfg_text_scale)


def check_ode(family, cfg_text_scale: float) -> None:
    steps, size, prompts = 4, 16, PROMPTS[:2]
    condition, uncondition = family.rollout_conditions({"prompt": prompts, "index": [0, 1]}, 1, size,
                                                       cfg_text_scale)
    assert uncondition is None
    sampler = family.generation_sampler()
    noise = []
    for i, prompt in enumerate(prompts):  # generate's draws: prepare, then the initial noise
        generator = torch.Generator().manual_seed(10 + i)
        noise.append(sampler.initial_noise(sampler.prepare(prompt, height=size, width=size, generator=generator),
                                           generator))
    noise = torch.stack(noise)
    assert noise.shape == (2, *family.latent_shape(size, size))
    ode = DiffusionSampler(family, steps, noise_level=0.0)
    sigmas = [sigma for _, sigma, _ in ode.schedule(noise)] + [0.0]
    assert sigmas == BagelSampler.timesteps(steps + 1, SAMPLING_TIMESTEP_SHIFT).tolist()
    with torch.no_grad():
        trajectory = ode.rollout(noise, condition)
        assert torch.equal(trajectory.log_probs, torch.zeros(2, steps))
        images = family.decode_latents(trajectory.final)
        official = torch.stack([sampler.generate(prompt, height=size, width=size, num_timesteps=steps + 1,
                                                 cfg_text_scale=cfg_text_scale, seed=10 + i, output_type="pt")
                                for i, prompt in enumerate(prompts)])
        assert torch.equal(images, official)
        # The velocity of a member does not depend on the batch around it.
        t = torch.full((2,), 0.75)
        both = family.predict(noise, t, condition)
        alone = family.predict(noise[1:], t[1:], {**condition, "members": condition["members"][1:]})
        assert torch.equal(both[1:], alone)


def test_edit_rollouts_are_on_policy_at_the_first_iteration_with_zero_kl(tmp_path):
    """Edits (source image in the context, rebuilt under gradients): recomputed log-probs equal the
    rollout's bitwise, so the first iteration's ratio is exactly 1; KL to the reference is 0."""
    from glm_training.data.datasets import collate
    from glm_training.trainers.grpo import GRPOTrainer

    raw = tiny_config(tmp_path, edits_file(tmp_path), training={"mode": "i2i", "max_train_steps": 2, "batch_size": 4},
                      grpo={"num_generations": 2, "beta": 0.04, "num_iterations": 2, "sample_steps": 2,
                            "eval_steps": 2},
                      reward={"ssim": {"weight": 1.0, "compare_to": "source"}})
    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    batch = collate([trainer.dataset[i] for i in (0, 1)])
    rollout = trainer.make_rollout(batch).records[trainer.parts[0].name]
    assert rollout.uncondition is None and all(source is not None for _, source in rollout.condition["inputs"])
    schedule = trainer.parts[0].sampler.schedule(rollout.trajectory.states[0])
    for k in range(trainer.cfg.grpo.sample_steps):
        step = trainer.parts[0].sampler.step(k, rollout.trajectory.states[k], rollout.condition, None,
                                     prev_sample=rollout.trajectory.states[k + 1], schedule=schedule)
        assert step.log_prob.requires_grad
        assert torch.equal(step.log_prob.detach(), rollout.trajectory.log_probs[:, k])
    trainer.optimizer.zero_grad(set_to_none=True)

    first, second = [row for row in read_rows(trainer.train()) if "ratio_mean" in row]
    assert first["ratio_min"] == first["ratio_max"] == first["ratio_mean"] == 1.0 and first["clip_fraction"] == 0.0
    assert first["kl"] == 0.0
    assert second["iteration"] == 1.0 and second["kl"] > 0.0 and second["ratio_min"] != second["ratio_max"]
    print(f"\nBAGEL edit GRPO: iteration 0 ratio {first['ratio_min']}..{first['ratio_max']} kl {first['kl']}; "
          f"iteration 1 ratio {second['ratio_min']:.6f}..{second['ratio_max']:.6f} kl {second['kl']:.2e}")


def test_only_the_generation_expert(tmp_path):
    raw = tiny_config(tmp_path, prompts_file(tmp_path))
    raw["model"]["component"] = "und"
    with pytest.raises(ConfigError, match="model.component: gen"):
        build_family(config_from_dict(raw))


def test_shipped_config_grpo_raises_the_brightness_and_the_lora_reloads(tmp_path):
    """30 steps, 4 prompts x 4 members, 4 SDE steps. The tiny random VAE makes brightness nearly
    insensitive to the latents (within-group std about 0.001 at step 1), so the rise is small but
    steady: 0.5511 -> 0.5546 (seed 0), 0.5506 -> 0.5564 (seed 1), means of the first and last 6 steps."""
    from glm_training.trainers.grpo import GRPOTrainer

    shipped = load_config(SHIPPED)  # validated as shipped
    assert (shipped.model.family, shipped.model.component, shipped.training.method) == ("bagel", "gen", "grpo")
    cfg = config_from_dict(tiny_config(tmp_path, prompts_file(tmp_path)))
    trainer = GRPOTrainer(cfg)
    run_dir = trainer.train()
    train = [row for row in read_rows(run_dir) if "reward/total_mean" in row]
    assert len(train) == 30
    rewards = [row["reward/total_mean"] for row in train]
    start, end = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    print(f"\nBAGEL Flow-GRPO brightness: rollout mean reward (first 6 -> last 6 steps) {start:.4f} -> {end:.4f}; "
          f"within-group std at step 1 {train[0]['reward/total_std']:.4f}")
    assert train[0]["ratio_min"] == 1.0 == train[0]["ratio_max"]
    assert end > start + 0.002, (start, end)
    eval_rows = [row for row in read_rows(run_dir) if "eval/reward/total_mean" in row]
    assert eval_rows and (run_dir / "samples").is_dir()

    # The saved LoRA reloads into a fresh family and gives the trained velocities.
    final = run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file()
    fresh = build_family(cfg)
    fresh.load_adapter_weights(str(final))
    trained = trainer.family
    condition, _ = trained.rollout_conditions({"prompt": PROMPTS[:2], "index": [0, 1]}, 2, 16, 4.0)
    noise = torch.randn(4, *trained.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.9)
    with torch.no_grad():
        expected = trained.predict(noise, t, condition)
        reloaded = fresh.predict(noise, t, fresh.rollout_conditions({"prompt": PROMPTS[:2], "index": [0, 1]}, 2,
                                                                     16, 4.0)[0])
        with trained.reference():
            base = trained.predict(noise, t, condition)
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-6)
    assert (expected - base).abs().max() > 1e-4


def test_two_process_grpo_keeps_the_ranks_identical(tmp_path):
    """BAGEL's rollout predictions bypass the DDP wrapper (BagelSampler calls the model's own
    methods): the GRPO trainer averages their gradients itself, so ranks stay bitwise equal."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO

    raw = tiny_config(tmp_path, prompts_file(tmp_path), training={"max_train_steps": 2, "batch_size": 4},
                      grpo={"num_generations": 2, "sample_steps": 2, "eval_steps": 2})
    raw["logging"].update(sample_steps=0)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "weights"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "ddp_worker.py"), str(config), str(out)]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert any(value.abs().sum() > 0 for key, value in rank0.items() if "lora_B" in key)  # it trained
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
