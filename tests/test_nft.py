"""DiffusionNFT (`training.method: nft`, glm_training/trainers/nft.py) on the parts interface.

Mechanics on the throwaway toy family (tests/toy_family.py, seconds): the old policy trails the
trained one by the decay schedule, exactly; r = 0.5 gives no gradient and the gradient is linear
in r; zero-std groups do not move the weights; the nft options act; resume inside a run (old
LoRA adapter, rollout buffer) is bitwise. Then one short run per real tiny family (SDXL, FLUX
Kontext t2i and i2i, Qwen-Image, GLM-Image DiT, BAGEL generation) with finite metrics and an old
policy that really samples (it differs from the trained one after the first step). Last, a short
benchmarks/rl_compare.py: per optimizer step, NFT learns at least as fast as tuned Flow-GRPO.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from toy_family import ToyFamily, ToyNet, logged, toy_config
from glm_training.config import ConfigError, config_from_dict
from glm_training.data.datasets import collate
from glm_training.models.base import register_family
from glm_training.parts import StepContext
from glm_training.trainers.grpo import BUFFER_FILE
from glm_training.trainers.nft import OLD_POLICY_FILE, NFTTrainer


class LoraToyNet(ToyNet):
    """The toy network with the adapter API the family interface uses (peft injection)."""

    def add_adapter(self, config, adapter_name: str = "default") -> None:
        inject_adapter_in_model(config, self, adapter_name=adapter_name)

    def _enable(self, enabled: bool) -> None:
        for layer in self.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(enabled)

    def disable_adapters(self) -> None:
        self._enable(False)

    def enable_adapters(self) -> None:
        self._enable(True)


class LoraToyFamily(ToyFamily):
    name = "toy_lora"
    default_lora_targets = {"net": ["text", "body.0", "body.2"]}

    def load(self) -> None:
        super().load()
        torch.manual_seed(0)
        self.modules = {"net": LoraToyNet().to(self.device)}


register_family("toy_lora", LoraToyFamily)

BRIGHTNESS = {"rewards": {"brightness": {"weight": 1.0}}}


def prompts(tmp_path: Path, count: int = 2) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(count)))
    return path


def nft_raw(tmp_path: Path, **sections) -> dict:
    settings = {"training": {"max_train_steps": 3, "batch_size": 8}, "grpo": {"num_generations": 4, "sample_steps": 3,
                                                                              "eval_steps": 2},
                "reward": copy.deepcopy(BRIGHTNESS)}
    for key, value in sections.items():
        settings.setdefault(key, {}).update(value)
    return toy_config(tmp_path, prompts(tmp_path), "nft", **settings)


def setup_trainer(raw: dict) -> NFTTrainer:
    trainer = NFTTrainer(config_from_dict(raw))
    trainer.setup()
    return trainer


def trainable(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a checkpoint holds (`component.parameter` names)."""
    return load_file(str(checkpoint / "trainable.safetensors"))


# -- the old policy ---------------------------------------------------------------------------


def test_old_policy_trails_the_trained_one_by_the_schedule(tmp_path):
    schedule = {"flat": 1, "rate": 0.25, "cap": 0.4}  # decay 0, 0.25, then 0.5 capped to 0.4
    raw = nft_raw(tmp_path, training={"checkpointing_steps": 1}, nft={"decay_schedule": schedule})
    trainer = setup_trainer(raw)
    with trainer.family.old_policy() as pairs:  # before any step: an exact fp32 copy
        assert all(torch.equal(old, trained) and old.dtype == torch.float32 and not old.requires_grad
                   for old, trained in pairs.values())
    run = trainer.train()
    assert [row["old_policy_decay"] for row in logged(run)] == [0.0, 0.25, 0.4]
    states = {step: (trainable(run / f"checkpoint-{step}"),
                     load_file(str(run / f"checkpoint-{step}" / OLD_POLICY_FILE))) for step in (1, 2, 3)}
    for key in states[1][0]:
        assert torch.equal(states[1][1][key], states[1][0][key])  # decay 0: old = trained
        for step, decay in ((2, 0.25), (3, 0.4)):
            expected = decay * states[step - 1][1][key] + (1 - decay) * states[step][0][key]
            torch.testing.assert_close(states[step][1][key], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(states[3][1][key], states[3][0][key])  # it trails


def test_nft_refuses_token_parts_and_bad_schedules(tmp_path):
    data = prompts(tmp_path)
    raw = {"model": {"family": "glm_image", "pretrained_model_name_or_path": "tiny:glm_image", "component": "ar"},
           "data": {"path": str(data), "resolution": 32},
           "training": {"method": "nft", "batch_size": 2}, "grpo": {"num_generations": 2}, "reward": BRIGHTNESS}
    with pytest.raises(ConfigError, match=r"nft trains denoisers only.*\['ar'\].*model.component: dit"):
        NFTTrainer.validate_data(config_from_dict(raw))
    with pytest.raises(ConfigError, match=r"nft.decay_schedule: unknown preset 'linear_to_05'.*linear_to_0.5"):
        config_from_dict(nft_raw(tmp_path, nft={"decay_schedule": "linear_to_05"}))
    with pytest.raises(ConfigError, match="nft.decay_schedule.*flat, rate and cap"):
        config_from_dict(nft_raw(tmp_path, nft={"decay_schedule": {"flat": 0, "rate": 0.1}}))
    from glm_training.algorithms.nft import OLD_POLICY_SCHEDULES
    from glm_training.config import check_nft_schedule

    assert {name: check_nft_schedule(name) for name in OLD_POLICY_SCHEDULES} == {
        name: (s.flat, s.rate, s.cap) for name, s in OLD_POLICY_SCHEDULES.items()}
    assert check_nft_schedule({"flat": "3", "rate": "1e-3", "cap": 0.9}) == (3, 0.001, 0.9)
    with pytest.raises(ConfigError, match="nft.beta must be > 0"):
        config_from_dict(nft_raw(tmp_path, nft={"beta": 0.0}))
    with pytest.raises(ConfigError, match="batch_size .* multiple of grpo.num_generations"):
        config_from_dict(nft_raw(tmp_path, training={"batch_size": 6}))


def test_sde_and_ratio_keys_are_warned_under_nft(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="glm_training.config"):
        config_from_dict(nft_raw(tmp_path, grpo={"noise_level": 0.9, "epsilon": 0.2}, nft={"beta": 0.1}))
    warned = " ".join(r.getMessage() for r in caplog.records if "do nothing" in r.getMessage())
    assert "grpo.noise_level (" in warned and "grpo.epsilon (" in warned and "nft.beta" not in warned


# -- the loss through the part ---------------------------------------------------------------


def part_gradients(trainer: NFTTrainer, rollout, weights: torch.Tensor, valid: torch.Tensor | None = None,
                   step: int = 0) -> tuple[torch.Tensor, dict]:
    (part,) = trainer.parts
    params = [p for p in trainer.family.unwrapped("net").parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    members = [int(i) * rollout.group + m for i in rollout.indices for m in range(rollout.group)]
    valid = torch.ones(len(weights), dtype=torch.bool) if valid is None else valid
    metrics = part.nft_backward(rollout.records[part.name], weights, valid, members,
                                StepContext(0, 0, step, lambda loss: loss.backward()))
    return torch.cat([p.grad.flatten() for p in params]), metrics


def test_half_weight_gives_no_update_and_the_gradient_is_linear_in_r(tmp_path):
    trainer = setup_trainer(nft_raw(tmp_path))
    batch = collate([trainer.dataset[i] for i in (0, 1)])
    rollout = trainer.make_rollout(batch)  # old == trained here: the implicit policies coincide
    count = len(rollout.advantages["net"])
    good, _ = part_gradients(trainer, rollout, torch.ones(count))
    bad, _ = part_gradients(trainer, rollout, torch.zeros(count))
    half, metrics = part_gradients(trainer, rollout, torch.full((count,), 0.5))
    assert good.norm() > 0 and metrics["old_deviation"] == 0.0
    torch.testing.assert_close(bad, -good, rtol=1e-4, atol=1e-6 * float(good.abs().max()))
    assert float(half.abs().max()) < 1e-5 * float(good.abs().max())  # (2r - 1) x SFT's gradient
    # Left-out (zero-std) members contribute nothing: all masked -> zero gradient, loss 0.
    masked, metrics = part_gradients(trainer, rollout, torch.ones(count), torch.zeros(count, dtype=torch.bool))
    assert torch.count_nonzero(masked) == 0 and metrics["loss"] == 0.0


def test_constant_reward_groups_do_not_move_the_weights(tmp_path):
    reward = tmp_path / "constant.py"
    reward.write_text("def reward(images, prompts):\n    return [0.5] * len(prompts)\n")
    raw = nft_raw(tmp_path, training={"max_train_steps": 2}, optimizer={"weight_decay": 0.0},
                  reward={"rewards": {"constant": {"type": f"python:{reward}:reward"}}})
    trainer = setup_trainer(raw)
    before = {k: v.clone() for k, v in trainer.family.trainable_state_dict().items()}
    rows = logged(trainer.train())
    assert [row["zero_std_fraction"] for row in rows] == [1.0, 1.0]
    assert all(row["valid_fraction"] == 0.0 and row["loss"] == 0.0 for row in rows)
    after = trainer.family.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nft_options_act(tmp_path):
    """nft.beta, adv_mode and timesteps_per_sample change what the part computes; grpo.beta adds
    the KL term (0 while the policy is the reference)."""
    results = {}
    for name, nft, grpo in (("base", {}, {}), ("beta", {"beta": 0.1}, {}), ("positive", {"adv_mode": "positive_only"}, {}),
                            ("three", {"timesteps_per_sample": 3}, {}), ("kl", {}, {"beta": 0.01})):
        trainer = setup_trainer(nft_raw(tmp_path / name, nft=nft, grpo=grpo))
        rollout = trainer.make_rollout(collate([trainer.dataset[i] for i in (0, 1)]))
        from glm_training.algorithms.nft import optimality_weight

        weights = optimality_weight(rollout.advantages["net"], trainer.cfg.grpo.adv_clip_max, trainer.cfg.nft.adv_mode)
        results[name] = (weights, *part_gradients(trainer, rollout, weights))
    base_weights, base_grad, base = results["base"]
    assert bool((base_weights < 0.5).any()) and bool((results["positive"][0] >= 0.5).all())
    assert not torch.allclose(results["positive"][1], base_grad)
    # beta 0.1: the loss is divided by beta, its gradient (at old == trained) is beta-free.
    torch.testing.assert_close(results["beta"][1], base_grad, rtol=1e-3, atol=1e-6 * float(base_grad.abs().max()))
    assert results["beta"][2]["unweighted_policy_loss"] == pytest.approx(base["unweighted_policy_loss"] / 0.1, rel=1e-4)
    assert results["three"][2]["timestep_mean"] != base["timestep_mean"]
    assert "kl" not in base and results["kl"][2]["kl"] == 0.0


# -- resume -----------------------------------------------------------------------------------


def test_resume_is_bitwise_with_an_old_adapter_and_a_rollout_buffer(tmp_path):
    settings = {"model": {"family": "toy_lora"}, "lora": {"enabled": True, "rank": 2, "alpha": 2},
                "training": {"max_train_steps": 3, "checkpointing_steps": 1, "batch_size": 4},
                "grpo": {"num_iterations": 2, "beta": 0.01}, "nft": {"decay_schedule": {"flat": 0, "rate": 0.3, "cap": 0.6}}}
    raw = nft_raw(tmp_path, **settings)
    run = NFTTrainer(config_from_dict(raw)).train()
    unbroken = logged(run)
    assert [row["iteration"] for row in unbroken] == [0.0, 1.0, 0.0]
    assert (run / "checkpoint-1" / BUFFER_FILE.format(rank=0)).is_file()  # iteration 1 still to come
    old_keys = load_file(str(run / "checkpoint-3" / OLD_POLICY_FILE))
    assert old_keys and all(".lora_" in k for k in old_keys)
    final = {"trainable": trainable(run / "checkpoint-3"), "old": old_keys}
    assert any(not torch.equal(final["old"][k], final["trainable"][k]) for k in final["old"])
    raw["training"]["resume_from_checkpoint"] = str(run / "checkpoint-1")
    resumed = NFTTrainer(config_from_dict(raw)).train()
    assert resumed == run
    again = {"trainable": trainable(run / "checkpoint-3"),
             "old": load_file(str(run / "checkpoint-3" / OLD_POLICY_FILE))}
    for kind in ("trainable", "old"):
        assert all(torch.equal(final[kind][k], again[kind][k]) for k in final[kind]), kind
    rows = logged(run)
    for key in ("loss", "kl", "old_deviation", "reward/total_mean"):
        assert rows[-1][key] == unbroken[2][key] and rows[-2][key] == unbroken[1][key], key


def test_resume_needs_the_old_policy(tmp_path):
    raw = nft_raw(tmp_path, training={"max_train_steps": 1, "checkpointing_steps": 1})
    run = NFTTrainer(config_from_dict(raw)).train()
    (run / "checkpoint-1" / OLD_POLICY_FILE).unlink()
    raw["training"].update(resume_from_checkpoint=str(run / "checkpoint-1"), max_train_steps=2)
    with pytest.raises(ConfigError, match=f"has no {OLD_POLICY_FILE}"):
        NFTTrainer(config_from_dict(raw)).setup()


# -- every denoising family (tiny models, 2 steps) ---------------------------------------------


def finite(row: dict) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def family_run(tmp_path: Path, family: str, path: Path, resolution: int, **sections) -> list[dict]:
    raw = {"model": {"family": family, "pretrained_model_name_or_path": f"tiny:{family}"},
           "data": {"path": str(path), "resolution": resolution},
           "training": {"method": "nft", "max_train_steps": 2, "batch_size": 4, "learning_rate": 1e-2,
                        "checkpointing_steps": 1000, "seed": 0, "mixed_precision": "no"},
           "grpo": {"num_generations": 2, "sample_steps": 2, "eval_steps": 2, "beta": 0.01},
           "nft": {"timesteps_per_sample": 1},
           "reward": copy.deepcopy(BRIGHTNESS), "lora": {"rank": 4, "alpha": 4},
           "logging": {"output_dir": str(tmp_path / "out"), "report_to": [], "sample_steps": 1000}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    run = NFTTrainer(config_from_dict(raw)).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [1, 2] and all(finite(row) for row in rows)
    prefix = "dit/" if any(k.startswith("dit/") for k in train[0]) else ""
    assert train[0][f"{prefix}old_deviation"] == 0.0 < train[1][f"{prefix}old_deviation"]  # the old policy samples
    assert train[0][f"{prefix}kl"] == 0.0 < train[1][f"{prefix}kl"]
    assert any("eval/reward/total_mean" in row or "eval/dit/reward/total_mean" in row for row in rows)
    assert (run / "checkpoint-2" / OLD_POLICY_FILE).is_file() and (run / "final").is_dir()
    return train


def edits(tmp_path: Path, size: int) -> Path:
    from PIL import Image

    lines = []
    for i, colour in enumerate(("blue", "white")):
        Image.new("RGB", (size, size), colour).save(tmp_path / f"source{i}.png")
        lines.append(json.dumps({"prompt": f"make it red {i}", "source_image": f"source{i}.png"}))
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sdxl_epsilon_family(tmp_path):
    family_run(tmp_path, "sdxl", prompts(tmp_path), 32)


def test_flux_kontext_t2i_and_i2i(tmp_path):
    model = {"max_sequence_length": 32}
    family_run(tmp_path / "t2i", "flux_kontext", prompts(tmp_path), 16, model=model)
    family_run(tmp_path / "i2i", "flux_kontext", edits(tmp_path, 16), 16, model=model, training={"mode": "i2i"})


def test_qwen_image(tmp_path):
    family_run(tmp_path, "qwen_image", prompts(tmp_path), 16)


def test_glm_image_dit_decodes_frozen_ar_tokens(tmp_path):
    family_run(tmp_path, "glm_image", prompts(tmp_path), 32, model={"component": "dit"})


def test_bagel_generation_expert(tmp_path):
    family_run(tmp_path, "bagel", prompts(tmp_path), 16, model={"component": "gen"})


# -- learning speed against Flow-GRPO (benchmarks/rl_compare.py, shortened) ----------------------


def test_nft_learns_at_least_as_fast_per_step_as_tuned_flow_grpo(tmp_path):
    """benchmarks/rl_compare.py on seeds 0 and 1, 25 steps (200 images per run): the same prompts,
    seeds and images per optimizer step for both, each with its tuned settings. DiffusionNFT's
    area under the reward-vs-images curve is at least Flow-GRPO's on the two seeds together, and
    each NFT run learns (its AUC clears the untrained policy's ODE reward). Measured: NFT AUC
    0.5781 / 0.5732 vs Flow-GRPO 0.5676 / 0.5718 (untrained 0.5585); the 8-seed, 50-step table
    is in the README."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rl_compare

    results = rl_compare.compare([0, 1], 25, tmp_path)
    print(rl_compare.report(results, 25))
    nft, grpo = results["DiffusionNFT"], results["Flow-GRPO"]
    for runs in (nft, grpo):
        assert all(len(run["rewards"]) == 25 and all(map(math.isfinite, run["rewards"])) for run in runs.values())
    assert sum(nft[s]["auc"] for s in (0, 1)) >= sum(grpo[s]["auc"] for s in (0, 1)), (nft, grpo)
    for seed in (0, 1):
        assert nft[seed]["auc"] > nft[seed]["eval_before"] + 0.01, nft[seed]
