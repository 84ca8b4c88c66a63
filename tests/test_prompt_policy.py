"""Prompt-policy GRPO (issue 15): a tiny Qwen2-style LM / Qwen2.5-VL rewrites prompts for a frozen
tiny StableDiffusion3Pipeline, trained by the shipped GRPOTrainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from glm_training.config import ConfigError, config_from_dict, load_config
from glm_training.models.base import build_family
from glm_training.models.prompt_policy import extract_rewrite

WANTED = "sun"
TRAIN = ["a red cat", "a blue car", "a green tree", "a house by the sea", "a dog in the sun", "a bird on a wire",
         "a flower in a vase", "a man with a hat"]
HELD_OUT = ["a woman with a dog", "a moon over the sea", "a big house", "a cat on a tree"]


def wanted_word(images, prompts, metadata):
    """Text-level reward on the rewrite (metadata): 1 when it holds the wanted word, else partial
    credit for the word's letters it holds (a random tiny policy almost never writes the word)."""
    scores = []
    for m in metadata:
        text = m["rewrite"].lower()
        scores.append(1.0 if WANTED in text else 0.5 * len(set(WANTED) & set(text)) / len(set(WANTED)))
    return scores


def policy_config(tmp_path: Path, **sections) -> dict:
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(TRAIN) + "\n")
    raw = {"model": {"family": "prompt_policy", "pretrained_model_name_or_path": "tiny:prompt_policy_lm",
                     "generator": {"family": "diffusers", "pretrained_model_name_or_path": "tiny:sd3",
                                   "num_inference_steps": 3, "guidance_scale": 1.0}},
           "data": {"path": str(data), "format": "prompts_txt", "resolution": 32},
           "training": {"method": "grpo", "batch_size": 16, "max_train_steps": 4, "learning_rate": 5e-3,
                        "checkpointing_steps": 2},
           "grpo": {"num_generations": 8, "epsilon": 0.2},
           "prompt_policy": {"max_completion_length": 6},
           "lora": {"rank": 16, "alpha": 32},
           "reward": {"rewards": {"brightness": {}}},
           "logging": {"output_dir": str(tmp_path / "out"), "report_to": []}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def train(raw: dict):
    from glm_training.trainers.grpo import GRPOTrainer

    trainer = GRPOTrainer(config_from_dict(raw))
    run = trainer.train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return trainer, run, [r for r in rows if "loss" in r]


def test_extract_rewrite():
    assert extract_rewrite("  a bright cat \n", "cat", None, 100) == ("a bright cat", False)
    assert extract_rewrite("   ", "cat", None, 100) == ("cat", True)
    assert extract_rewrite("x" * 101, "cat", None, 100) == ("cat", True)
    assert extract_rewrite("ok <prompt> a sunny cat </prompt> bye", "cat", "prompt", 100) == ("a sunny cat", False)
    assert extract_rewrite("no tag here", "cat", "prompt", 100) == ("cat", True)


@pytest.mark.parametrize("top", [{"top_k": 20, "top_p": 0.8}, {"top_k": 0, "top_p": 1.0}])
def test_sampling_logprobs_equal_teacher_forced(tmp_path, top):
    cfg = config_from_dict(policy_config(tmp_path, prompt_policy={"max_completion_length": 12, **top},
                                         grpo={"num_generations": 8, "temperature": 0.7}))
    family = build_family(cfg)
    (part,) = family.parts()
    prompts = ["a red cat", "a house by the sea and a very long tail of words"]  # different lengths: left padding
    out = part.sample_tokens(prompts, seed=3, temperature=0.7)
    with torch.no_grad():
        forced = part.token_logprobs(prompts, tokens=out["tokens"], temperature=0.7)
    mask = out["completion_mask"]
    assert mask.any() and torch.equal(mask, part.completion_mask(out["tokens"]))
    torch.testing.assert_close(forced[mask], out["logprobs"][mask], atol=2e-5, rtol=0)
    assert (forced[~mask] == 0).all() and torch.isfinite(forced).all()
    if top["top_k"]:  # the filter acts: every sampled token is within the top-k of its step
        assert (out["logprobs"][mask] > -1e4).all()


def test_vl_policy_sees_the_source_image(tmp_path):
    (tmp_path / "src").mkdir()
    raw = policy_config(tmp_path, model={"pretrained_model_name_or_path": "tiny:prompt_policy_vl"},
                        training={"mode": "i2i"})
    family = build_family(config_from_dict(raw))
    (part,) = family.parts()
    red, noise = torch.zeros(1, 3, 40, 40), torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    red[:, 0] = 1.0
    prompts = ["make it brighter"]
    out = part.sample_tokens(prompts, seed=0, controls=[red])
    with torch.no_grad():
        same = part.token_logprobs(prompts, tokens=out["tokens"], controls=[red])
        other = part.token_logprobs(prompts, tokens=out["tokens"], controls=[noise])
    mask = out["completion_mask"]
    torch.testing.assert_close(same[mask], out["logprobs"][mask], atol=2e-5, rtol=0)
    assert (same[mask] - other[mask]).abs().max() > 1e-4  # another image, other log-probs


def test_text_reward_rises_to_near_its_maximum(tmp_path):
    """LoRA (the default train_type) learns to write the wanted word: from a random policy's ~0.2
    to ~1 within 30 steps; every member is logged with the reward it got."""
    raw = policy_config(tmp_path, training={"max_train_steps": 30, "learning_rate": 1e-2, "checkpointing_steps": 100},
                        reward={"rewards": {"word": {"type": "python:test_prompt_policy:wanted_word"}}},
                        prompt_policy={"max_completion_length": 4, "log_completions": True})
    trainer, run, rows = train(raw)
    first, last = rows[0]["reward/total_mean"], sum(r["reward/total_mean"] for r in rows[-3:]) / 3
    assert first < 0.5 and last > 0.85, (first, last)
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 30 * 16 and {"prompt", "completion", "rewrite", "reward"} <= set(logged[0])
    for row in logged[-16:]:  # the logged reward is the one the rewrite earned
        assert row["reward"] == pytest.approx(wanted_word(None, [row["prompt"]], [row])[0])
    assert logged[-1]["prompt"] in TRAIN and WANTED in logged[-1]["rewrite"].lower()
    assert (run / "tensorboard" / "completions").is_dir()
    captions, _, notes = trainer.last_rollout  # the rollout grid: the rewrite and its reward under each image
    assert captions == [f"-> {row['rewrite']}" for row in logged[-16:]] and notes[0].startswith("R=")


def brightness_of(rewrites: list[str], generator_dir: Path) -> torch.Tensor:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(generator_dir)  # a fresh frozen generator
    pipe.set_progress_bar_config(disable=True)
    seeds = [torch.Generator().manual_seed(100 + i) for i in range(len(rewrites))]
    images = pipe(prompt=rewrites, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
                  generator=seeds, output_type="pt").images
    return images.mean(dim=(1, 2, 3))


def untrained_copy(run: Path, folder: Path) -> Path:
    """The run's final adapter with lora_B zeroed (exactly the base policy), with the run's chat settings."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(run / "final", folder / "final")
    shutil.copy(run / "config.yaml", folder / "config.yaml")
    file = folder / "final" / "adapter_model.safetensors"
    state = load_file(str(file))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, str(file))
    return folder / "final"


def test_generator_reward_rises_on_held_out_prompts(tmp_path):
    """A reward reachable only through the frozen generator (image brightness). Two-token rewrites:
    the tiny random SD3 is barely compositional (the brightness of a 3-token text correlates 0.12
    with the mean of its tokens' own; a trained SD3's is far higher), so longer random rewrites
    give GRPO no credit to assign within a few dozen steps; per text it is consistent across
    noise seeds (correlation 0.99), which is what lets two tokens learn (~0.48 -> ~0.54)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glm_training.models.tiny import ensure_tiny
    from glm_training.prompt_policy import rewrite

    raw = policy_config(tmp_path, training={"max_train_steps": 40, "learning_rate": 2e-2, "checkpointing_steps": 20},
                        prompt_policy={"max_completion_length": 2})
    base_dir, sd3_dir = ensure_tiny("prompt_policy_lm"), ensure_tiny("sd3")
    weights = lambda trainer: {f"{n}.{k}": v.clone() for n, m in trainer.family.generator.modules.items()  # noqa: E731
                               for k, v in m.state_dict().items()}
    from glm_training.trainers.grpo import GRPOTrainer

    trainer = GRPOTrainer(config_from_dict(raw))
    trainer.setup()
    before = weights(trainer)
    run = trainer.train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    after = weights(trainer)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bitwise
    assert all(r["ratio_min"] == 1.0 == r["ratio_max"] and r["clip_fraction"] == 0.0 for r in rows)  # on-policy
    # outputs: peft adapter + training_stats.json per checkpoint
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    for checkpoint in ("checkpoint-20", "checkpoint-40"):
        stats = json.loads((run / checkpoint / "training_stats.json").read_text())
        assert stats["completions"] > 0 and 0 <= stats["fallback_fraction"] <= 1
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(final))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    # held-out prompts, greedy rewrites of the saved adapter vs the base policy, rendered by a fresh generator
    trained = brightness_of(rewrite(HELD_OUT, final), sd3_dir)
    untrained = brightness_of(rewrite(HELD_OUT, untrained_copy(run, tmp_path / "untrained")), sd3_dir)
    first, last = rows[0]["reward/total_mean"], sum(r["reward/total_mean"] for r in rows[-3:]) / 3
    assert last - first > 0.03, (first, last)
    assert trained.mean() - untrained.mean() > 0.02, (trained, untrained)


def test_ms_swift_flags_resolve_like_the_yaml(tmp_path):
    from glm_training.cli import build_config, parse_args

    raw = policy_config(tmp_path)
    base = tmp_path / "base.json"  # a JSON config is read like YAML
    base.write_text(json.dumps(raw))
    flags = ["--config", str(base), "--train_type", "full", "--model", "tiny:prompt_policy_vl", "--lora_rank", "4",
             "--learning_rate", "3e-5", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
             "--num_train_epochs", "3", "--output_dir", str(tmp_path / "o"), "--torch_dtype", "bfloat16",
             "--gradient_checkpointing", "true", "--use_wandb", "true", "--log_completions", "true",
             "--target_modules", "q_proj", "v_proj", "--lora_alpha", "8"]
    from_flags = build_config(parse_args(flags, None), None)
    import yaml

    equivalent = policy_config(tmp_path)
    equivalent["model"].update(pretrained_model_name_or_path="tiny:prompt_policy_vl", weight_dtype="bf16",
                               gradient_checkpointing=True)
    equivalent["lora"].update(enabled=False, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    equivalent["training"].update(learning_rate=3e-5, batch_size=8, gradient_accumulation_steps=2, num_epochs=3,
                                  mixed_precision="bf16")
    equivalent["logging"].update(output_dir=str(tmp_path / "o"), report_to=["tensorboard", "wandb"])
    equivalent["prompt_policy"].update(train_type="full", log_completions=True)
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(equivalent))
    assert from_flags.to_dict() == load_config(path).to_dict()
    assert load_config(base).to_dict() == config_from_dict(raw).to_dict()


def test_unknown_flag_says_did_you_mean(tmp_path, capsys):
    from glm_training.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--config", "x.yaml", "--lora_rnak", "4"], None)
    assert "did you mean --lora_rank" in capsys.readouterr().err


def test_config_errors_name_the_key(tmp_path):
    raw = policy_config(tmp_path)
    del raw["model"]["generator"]
    with pytest.raises(ConfigError, match="model.generator"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="lora.enabled: false"):
        config_from_dict(policy_config(tmp_path, prompt_policy={"train_type": "full"}))
    with pytest.raises(ConfigError, match="model.generator.family.*Did you mean 'diffusers'"):
        config_from_dict(policy_config(tmp_path, model={"generator": {"family": "difusers",
                                                                      "pretrained_model_name_or_path": "x"}}))
    other = {"model": {"pretrained_model_name_or_path": "tiny:sdxl",
                       "generator": {"family": "diffusers", "pretrained_model_name_or_path": "x"}},
             "data": {"path": "data/quickstart"}}
    with pytest.raises(ConfigError, match="model.generator: model.family sdxl"):
        config_from_dict(other)
    with pytest.raises(ConfigError, match="training.method: sft is not supported"):
        config_from_dict(policy_config(tmp_path, training={"method": "sft"}))
    if not torch.cuda.is_available():
        cfg = config_from_dict(policy_config(tmp_path, prompt_policy={"train_type": "qlora"}))
        with pytest.raises(ConfigError, match="qlora.*CUDA"):
            build_family(cfg)
    with pytest.raises(ConfigError, match="text-only model"):
        build_family(config_from_dict(policy_config(tmp_path, training={"mode": "i2i"})))


def test_project_family_generator_is_frozen_and_shares_noise_in_a_group(tmp_path):
    raw = policy_config(tmp_path, model={"generator": {"family": "sdxl", "pretrained_model_name_or_path": "tiny:sdxl",
                                                       "num_inference_steps": 2, "guidance_scale": 1.0}})
    family = build_family(config_from_dict(raw))
    generator = family.generator
    assert all(not p.requires_grad for m in generator.modules.values() for p in m.parameters())
    images = generator.render(["a cat", "a cat", "a cat"], [5, 5, 6])
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


def test_chat_sampling_and_rewrite_options_act(tmp_path):
    """system_prompt / chat_template shape the policy's input; top_k / top_p filter the sampled
    distribution (formula); max_completion_length bounds the completions; rewrite_tag /
    max_rewrite_chars decide what the generator renders."""
    from glm_training.models.base import Generation

    def family_with(**options):
        return build_family(config_from_dict(policy_config(tmp_path, prompt_policy=options)))

    family = family_with(system_prompt="Paint with light.", max_completion_length=3, top_k=5, top_p=0.5,
                         rewrite_tag="prompt", max_rewrite_chars=12)
    (part,) = family.parts()
    chat = family.tokenizer.decode(part.chat_inputs(["a red cat"], None)["input_ids"][0])
    assert "Paint with light." in chat and "a red cat" in chat
    assert "You are a helpful assistant" in family.tokenizer.decode(
        family_with(system_prompt="").parts()[0].chat_inputs(["a cat"], None)["input_ids"][0])  # template default
    custom = family_with(chat_template="{{ messages[-1]['content'] }}=>")
    assert custom.tokenizer.decode(custom.parts()[0].chat_inputs(["a cat"], None)["input_ids"][0]) == "a cat=>"

    logits = torch.randn(2, family.tokenizer.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    kept = torch.isfinite(part.processed_logprobs(logits, 1.0))
    full = torch.softmax(logits, -1)
    for row in range(2):  # top_k 5, then the smallest head of those 5 holding half their mass
        top5 = torch.topk(logits[row], 5).indices
        mass = torch.softmax(logits[row][top5], -1)
        need = int((mass.cumsum(-1) < 0.5).sum()) + 1
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == set(top5[:need].tolist())
        assert full[row][kept[row]].sum() < 1
    out = part.sample_tokens(["a red cat", "a dog"], seed=0)
    assert out["tokens"].shape[1] <= 3

    texts = ["ok <prompt>a sunny cat</prompt>", "no tag", "<prompt>far too long a rewrite</prompt>"]
    tokens = family.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"]
    rendered = family.render({"index": [0]}, 3, tokens, seed=0, step=0, prompts=["a cat"] * 3)
    assert isinstance(rendered, Generation) and rendered.images.shape == (3, 3, 32, 32)
    assert [m["rewrite"] for m in rendered.metadata] == ["a sunny cat", "a cat", "a cat"]
    assert [m["fallback"] for m in rendered.metadata] == [False, True, True]


def test_readme_lists_every_ms_swift_flag():
    from glm_training.cli import SWIFT_FLAGS, swift_flag_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert swift_flag_table() in readme, "README.md: paste glm_training.cli.swift_flag_table() under Prompt-policy GRPO"
    assert len(SWIFT_FLAGS) == 16


def test_training_stats_and_completions_go_on_across_a_resume(tmp_path):
    """A run stopped at step 2 and resumed writes the counters and completion rows of an unbroken one."""
    from conftest import train_sft

    from glm_training.trainers.grpo import GRPOTrainer

    def config(name):
        (tmp_path / name).mkdir()
        return policy_config(tmp_path / name, prompt_policy={"max_completion_length": 4, "log_completions": True})

    straight = train_sft(config("straight"), trainer_class=GRPOTrainer).run_dir
    broken = config("broken")
    first = train_sft(broken, stop_at=2, trainer_class=GRPOTrainer).run_dir
    assert not (first / "final").exists()
    broken["training"]["resume_from_checkpoint"] = "latest"
    resumed = train_sft(broken, trainer_class=GRPOTrainer).run_dir
    assert resumed == first
    stats = [json.loads((run / "checkpoint-4" / "training_stats.json").read_text()) for run in (straight, resumed)]
    assert stats[0]["rollouts"] == 4 and stats[0]["completions"] == 4 * 16
    assert stats[0] == stats[1]
    rows = [(run / "completions.jsonl").read_text().splitlines() for run in (straight, resumed)]
    assert len(rows[0]) == 4 * 16 and rows[0] == rows[1]


def test_two_processes_log_every_member_once(tmp_path):
    """DDP: the counters are of both ranks' rollouts and completions.jsonl has each member once."""
    from test_distributed import launch

    raw = policy_config(tmp_path, training={"max_train_steps": 2, "batch_size": 4},
                        grpo={"num_generations": 4}, prompt_policy={"max_completion_length": 3, "log_completions": True})
    launch(tmp_path, raw, 2)
    (run,) = {path.parent for path in (tmp_path / "out").rglob("completions.jsonl")}
    rows = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] * 8 + [2] * 8  # 2 ranks x 4 members per step
    assert len({row["prompt"] for row in rows if row["step"] == 1}) == 2  # each rank its own prompt
    stats = json.loads((run / "final" / "training_stats.json").read_text())
    assert stats["rollouts"] == 4 and stats["completions"] == 16
