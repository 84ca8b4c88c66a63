"""Every key of `--print-schema` acts, or is refused / warned where it does nothing.

The table below maps each schema key to its evidence:
- ("acts", "file.py::test_name"): a test in tests/ that shows the key's effect (checked to exist);
- ("check", function): a small behavioural check run here;
- ("error", overrides) / ("warn", overrides): a config where the key does nothing; loading it must
  raise a ConfigError naming the key, or log one warning naming it;
- ("read", "glm_training/file.py"): read by that file, no behavioural test yet (listed in
  READ_ONLY so the gap stays visible; shrink it, never grow it).
A schema key missing from the table fails `test_every_schema_key_is_in_the_table`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing

import pytest
import torch

from glm_training.config import Config, ConfigError, config_from_dict, describe_schema, schema_default

from conftest import REPO

BASE = {"model": {"pretrained_model_name_or_path": "tiny:sdxl"}, "data": {"path": "data/quickstart"}}
FLUX = {"model": {"family": "flux_kontext", "pretrained_model_name_or_path": "tiny:flux_kontext"}}
BAGEL = {"model": {"family": "bagel", "pretrained_model_name_or_path": "tiny:bagel"}}
GRPO = {"training": {"method": "grpo", "batch_size": 4}, "reward": {"rewards": {"brightness": {}}}}
NO_LORA = {"lora": {"enabled": False}}


def merge(*parts: dict) -> dict:
    raw = copy.deepcopy(BASE)
    for part in parts:
        for section, values in part.items():
            raw.setdefault(section, {}).update(copy.deepcopy(values))
    return raw


def set_key(key: str, value, *parts: dict) -> dict:
    section, name = key.split(".")
    return merge(*parts, {section: {name: value}})


def check_weight_dtype():
    from glm_training.models.base import resolve_weight_dtype

    assert resolve_weight_dtype(config_from_dict(BASE)) == torch.float32
    assert resolve_weight_dtype(config_from_dict(set_key("model.weight_dtype", "bf16"))) == torch.bfloat16
    assert resolve_weight_dtype(config_from_dict(set_key("training.mixed_precision", "fp16"))) == torch.float16


def check_shuffle():
    from glm_training.data.datasets import make_batch_sampler

    data = list(range(16))
    ordered = [list(b) for b in make_batch_sampler(data, 4, shuffle=False)]
    shuffled = [list(b) for b in make_batch_sampler(data, 4, shuffle=True)]
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert shuffled != ordered and sorted(sum(shuffled, [])) == data


def check_family_section_roundtrip():
    """The bagel: section is typed by the family's options and dumps back under its name."""
    cfg = config_from_dict(merge(BAGEL, {"bagel": {"text_loss_weight": 0.25}}))
    assert cfg.family_options.text_loss_weight == 0.25 and cfg.family_options.image_loss_weight == 1.0
    assert config_from_dict(cfg.to_dict()).family_options == cfg.family_options


TABLE: dict[str, tuple] = {
    "model.family": ("acts", "test_config.py::test_impossible_combinations"),
    "model.pretrained_model_name_or_path": ("acts", "test_tiny_models.py"),
    "model.revision": ("read", "glm_training/models/base.py"),
    "model.variant": ("read", "glm_training/models/base.py"),
    "model.weight_dtype": ("check", check_weight_dtype),
    "model.component": ("acts", "test_glm_image_ar.py::test_ar_sft_lowers_the_loss_and_leaves_the_dit_untouched"),
    "model.train_text_encoder": ("error", set_key("model.train_text_encoder", True, FLUX)),
    "model.gradient_checkpointing": ("acts", "test_trainer_options.py::test_bf16_gradient_checkpointing_and_text_encoder_lora"),
    "model.max_sequence_length": ("error", set_key("model.max_sequence_length", 77)),
    "model.prediction_type": ("error", set_key("model.prediction_type", "epsilon", FLUX)),
    "model.guidance_scale": ("error", set_key("model.guidance_scale", 3.5)),
    "model.quantize": ("acts", "test_quantization.py::test_lora_over_a_quantized_base_trains_and_loads_into_the_unquantized_pipeline"),
    "model.gguf_file": ("acts", "test_quantization.py::test_gguf_transformer_round_trip"),
    "model.block_swap": ("acts", "test_offload.py::test_block_swap_without_cuda_is_a_logged_no_op_and_checks_its_count"),
    "model.text_encoder_device": ("acts", "test_offload.py::test_frozen_encoders_go_to_their_device_and_outputs_come_back"),
    "model.vae_device": ("acts", "test_offload.py::test_frozen_encoders_go_to_their_device_and_outputs_come_back"),
    "data.path": ("acts", "test_data.py::test_every_bad_file_is_listed_at_once"),
    "data.format": ("acts", "test_data_i2i.py::test_seed003_pairs_by_name"),
    "data.resolution": ("acts", "test_data.py::test_resize_crop_and_tensor_range"),
    "data.center_crop": ("error", set_key("data.center_crop", False, BAGEL)),
    "data.random_flip": ("warn", set_key("data.random_flip", True, GRPO)),
    "data.caption_dropout": ("error", set_key("data.caption_dropout", 0.1, GRPO)),
    "data.control_dropout": ("warn", set_key("data.control_dropout", 0.2)),
    "data.buckets": ("acts", "test_buckets.py::test_sdxl_sft_with_buckets_on_mixed_aspect_images_trains_end_to_end"),
    "data.bucket_aspect_range": ("warn", set_key("data.bucket_aspect_range", [0.75, 1.5])),
    "data.bucket_step": ("warn", set_key("data.bucket_step", 32)),
    "data.on_error": ("acts", "test_data.py::test_every_bad_file_is_listed_at_once"),
    "data.shuffle": ("check", check_shuffle),
    "data.num_workers": ("read", "glm_training/trainers/base.py"),
    # New with the eval split; point these at their behavioural tests once written.
    "data.eval_path": ("read", "glm_training/data/records.py"),
    "data.eval_fraction": ("acts", "test_validation.py::test_validation_loss_is_reproducible_and_falls_on_held_out_data"),
    "training.method": ("acts", "test_dpo.py::test_dpo_starts_at_log2_and_learns_the_preference"),
    "training.mode": ("error", set_key("training.mode", "i2i")),
    "training.seed": ("acts", "test_sft.py::test_resume_is_identical_to_an_unbroken_run"),
    "training.batch_size": ("acts", "test_distributed.py::test_two_processes_match_one_with_the_same_global_batch"),
    "training.gradient_accumulation_steps": ("acts", "test_sft.py::test_resume_is_identical_to_an_unbroken_run"),
    "training.max_train_steps": ("acts", "test_checkpoints.py::test_sigterm_saves_a_resumable_checkpoint_and_exits_zero"),
    "training.num_epochs": ("warn", merge({"training": {"max_train_steps": 5, "num_epochs": 3}})),
    "training.learning_rate": ("acts", "test_trainer_options.py::test_full_fine_tuning_v_prediction_and_component_lr"),
    "training.max_grad_norm": ("read", "glm_training/trainers/base.py"),
    "training.mixed_precision": ("acts", "test_trainer_options.py::test_bf16_gradient_checkpointing_and_text_encoder_lora"),
    "training.checkpointing_steps": ("acts", "test_checkpoints.py::test_sigterm_saves_a_resumable_checkpoint_and_exits_zero"),
    "training.checkpoints_total_limit": ("acts", "test_checkpoints.py::test_total_limit_keeps_the_newest"),
    "training.resume_from_checkpoint": ("acts", "test_grpo_extra.py::test_num_iterations_resume_mid_block_is_exact"),
    "training.weighting_scheme": ("error", set_key("training.weighting_scheme", "logit_normal")),
    "training.logit_mean": ("warn", set_key("training.logit_mean", 0.5, FLUX)),
    "training.logit_std": ("warn", set_key("training.logit_std", 2.0, FLUX)),
    "training.mode_scale": ("warn", set_key("training.mode_scale", 1.0, FLUX)),
    "training.snr_gamma": ("error", set_key("training.snr_gamma", 5.0, FLUX)),
    "training.noise_offset": ("warn", set_key("training.noise_offset", 0.05, GRPO)),
    "training.ema": ("acts", "test_ema_training.py::test_ema_follows_the_recurrence_and_is_what_evaluation_uses"),
    "eval.steps": ("acts", "test_validation.py::test_validation_loss_is_reproducible_and_falls_on_held_out_data"),
    "eval.draws": ("warn", set_key("eval.draws", 2, GRPO)),
    "eval.metrics": ("acts", "test_validation.py::test_eval_metrics_compare_generated_images_with_the_targets"),
    "eval.metric_options": ("error", set_key("eval.metric_options", {"fid": {}})),
    "eval.best_metric": ("acts", "test_validation.py::test_best_checkpoint_keeps_the_right_step_and_patience_stops"),
    "eval.mode": ("warn", set_key("eval.mode", "max")),
    "eval.patience": ("acts", "test_validation.py::test_best_checkpoint_keeps_the_right_step_and_patience_stops"),
    "eval.rewards": ("acts", "test_guardrails.py::test_trained_reward_rising_while_an_independent_one_falls_warns"),
    "eval.hacking_threshold": ("warn", set_key("eval.hacking_threshold", 0.1, GRPO)),
    "eval.collapse_std": ("warn", set_key("eval.collapse_std", 0.01)),
    "lora.enabled": ("acts", "test_dpo_extra.py::test_full_fine_tuning_reference_is_a_frozen_copy"),
    "lora.rank": ("warn", set_key("lora.rank", 8, NO_LORA)),
    "lora.alpha": ("warn", set_key("lora.alpha", 8.0, NO_LORA)),
    "lora.dropout": ("warn", set_key("lora.dropout", 0.1, NO_LORA)),
    "lora.target_modules": ("acts", "test_dpo.py::test_dpo_starts_at_log2_and_learns_the_preference"),
    "lora.text_encoder_target_modules": ("warn", set_key("lora.text_encoder_target_modules", ["q_proj"])),
    "lora.init": ("warn", set_key("lora.init", "default", NO_LORA)),
    "lora.pretrained_weight": ("acts", "test_lora_sdxl.py::test_pretrained_weight_round_trip"),
    "lora.save_format": ("error", set_key("lora.save_format", "comfyui", BAGEL)),
    "lora.components": ("acts", "test_glm_image_ar.py::test_unknown_lora_component_is_a_clear_error"),
    "optimizer.name": ("warn", merge({"optimizer": {"name": "sgd", "class_path": "torch.optim.RMSprop"}})),
    "optimizer.class_path": ("acts", "test_trainer_options.py::test_class_path_optimizer_schedule_and_wandb_offline"),
    "optimizer.weight_decay": ("warn", merge({"optimizer": {"weight_decay": 0.0, "class_path": "torch.optim.RMSprop"}})),
    "optimizer.betas": ("warn", merge({"optimizer": {"name": "sgd", "betas": [0.8, 0.9]}})),
    "optimizer.eps": ("warn", merge({"optimizer": {"name": "sgd", "eps": 1e-6}})),
    "optimizer.kwargs": ("acts", "test_trainer_options.py::test_class_path_optimizer_schedule_and_wandb_offline"),
    "optimizer.component_lr": ("acts", "test_trainer_options.py::test_full_fine_tuning_v_prediction_and_component_lr"),
    "lr_scheduler.name": ("acts", "test_trainer_options.py::test_class_path_optimizer_schedule_and_wandb_offline"),
    "lr_scheduler.warmup_steps": ("acts", "test_trainer_options.py::test_class_path_optimizer_schedule_and_wandb_offline"),
    "lr_scheduler.min_lr_ratio": ("warn", set_key("lr_scheduler.min_lr_ratio", 0.1)),
    "logging.output_dir": ("acts", "test_checkpoints.py::test_run_dirs_are_versioned_never_reused"),
    "logging.project": ("acts", "test_token_rl.py::test_bagel_dpo_through_the_trainer"),
    "logging.report_to": ("acts", "test_trainer_options.py::test_class_path_optimizer_schedule_and_wandb_offline"),
    "logging.wandb_mode": ("warn", set_key("logging.wandb_mode", "offline")),
    "logging.log_steps": ("read", "glm_training/trainers/base.py"),
    "logging.sample_prompts": ("acts", "test_flux_kontext.py::test_i2i_training_lowers_the_loss_and_samples_edits"),
    "logging.sample_control_images": ("error", merge({"logging": {"sample_prompts": ["a"],
                                                                  "sample_control_images": ["a.png"]}})),
    "logging.sample_steps": ("warn", set_key("logging.sample_steps", 10)),
    "logging.sample_num_inference_steps": ("warn", set_key("logging.sample_num_inference_steps", 4)),
    "logging.sample_guidance_scale": ("warn", set_key("logging.sample_guidance_scale", 2.0)),
    "logging.sample_seed": ("warn", set_key("logging.sample_seed", 3)),
    "logging.sample_resolution": ("warn", set_key("logging.sample_resolution", 64)),
    "cache.enabled": ("error", set_key("cache.enabled", True, BAGEL)),
    "cache.dir": ("warn", set_key("cache.dir", "elsewhere")),
    "cache.device": ("warn", set_key("cache.device", "cpu")),
    "distributed.backend": ("read", "glm_training/trainers/base.py"),
    "distributed.find_unused_parameters": ("read", "glm_training/trainers/base.py"),
    "distributed.timeout_minutes": ("read", "glm_training/trainers/base.py"),
    "distributed.deepspeed": ("acts", "test_deepspeed.py::test_zero3_matches_one_samples_resumes_exactly_and_loads_in_diffusers"),
    "bagel.text_loss_weight": ("acts", "test_bagel_family.py::test_loss_weights_are_applied"),
    "bagel.image_loss_weight": ("acts", "test_bagel_family.py::test_loss_weights_are_applied"),
    "nft.beta": ("acts", "test_nft.py::test_nft_options_act"),
    "nft.adv_mode": ("acts", "test_nft.py::test_nft_options_act"),
    "nft.timesteps_per_sample": ("acts", "test_nft.py::test_nft_options_act"),
    "nft.decay_schedule": ("acts", "test_nft.py::test_old_policy_trails_the_trained_one_by_the_schedule"),
    "model.generator": ("acts", "test_prompt_policy.py::test_project_family_generator_is_frozen_and_shares_noise_in_a_group"),
    "prompt_policy.train_type": ("acts", "test_prompt_policy.py::test_config_errors_name_the_key"),
    "prompt_policy.system_prompt": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.chat_template": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.max_completion_length": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.top_k": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.top_p": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.rewrite_tag": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.max_rewrite_chars": ("acts", "test_prompt_policy.py::test_chat_sampling_and_rewrite_options_act"),
    "prompt_policy.log_completions": ("acts", "test_prompt_policy.py::test_text_reward_rises_to_near_its_maximum"),
}
# Every key of dpo / grpo / reward: warned when training.method is sft (BASE), the section unused.
# (grpo.dynamic_sample also acts in the lead's test_grpo_recipe.py::test_dynamic_sample_resamples_zero_std_groups.)
for _section in ("dpo", "grpo", "reward", "nft"):
    for _f in dataclasses.fields(typing.get_type_hints(Config)[_section]):
        _key = f"{_section}.{_f.name}"
        TABLE.setdefault(_key, ("warn", set_key(_key, schema_default(_key))))


#: Keys with no behavioural evidence yet (only read by the code); do not add to this list.
READ_ONLY = {"model.revision", "model.variant", "data.num_workers", "data.eval_path", "training.max_grad_norm", "logging.log_steps",
             "distributed.backend", "distributed.find_unused_parameters", "distributed.timeout_minutes"}


def schema_keys() -> list[str]:
    keys, section = [], None
    for line in describe_schema().splitlines():
        if not line.startswith(" "):
            section = line.split(":", 1)[0]
        else:
            keys.append(f"{section}.{line.strip().split(':', 1)[0]}")
    return keys


def test_every_schema_key_is_in_the_table():
    keys = schema_keys()
    missing = [k for k in keys if k not in TABLE]
    assert not missing, f"add these schema keys to TABLE in tests/test_schema_keys.py: {missing}"
    assert not set(TABLE) - set(keys), f"TABLE names keys that are not in the schema: {set(TABLE) - set(keys)}"
    assert {k for k, v in TABLE.items() if v[0] == "read"} == READ_ONLY


@pytest.mark.parametrize("key", [k for k, v in TABLE.items() if v[0] == "acts"])
def test_named_test_exists(key):
    target = TABLE[key][1]
    file, _, function = target.partition("::")
    source = (REPO / "tests" / file).read_text()
    assert not function or re.search(rf"^def {function}\(", source, re.M), f"{key}: {target} does not exist"


@pytest.mark.parametrize("key", [k for k, v in TABLE.items() if v[0] == "read"])
def test_read_only_keys_are_read(key):
    section, name = key.split(".")
    source = (REPO / TABLE[key][1]).read_text()
    assert re.search(rf"\b{section}\.{name}\b", source), f"{key} is not read by {TABLE[key][1]}"


@pytest.mark.parametrize("key", [k for k, v in TABLE.items() if v[0] == "check"])
def test_behaviour_checks(key):
    TABLE[key][1]()


@pytest.mark.parametrize("key", [k for k, v in TABLE.items() if v[0] == "error"])
def test_key_is_refused_where_it_does_nothing(key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(TABLE[key][1])


@pytest.mark.parametrize("key", [k for k, v in TABLE.items() if v[0] == "warn"])
def test_key_is_warned_where_it_does_nothing(key, caplog):
    with caplog.at_level(logging.WARNING, logger="glm_training.config"):
        config_from_dict(TABLE[key][1])
    warned = [r.getMessage() for r in caplog.records if "do nothing" in r.getMessage()]
    assert len(warned) == 1 and re.search(rf"\b{re.escape(key)} \(", warned[0]), (key, warned)


def test_the_same_keys_are_silent_where_they_act(caplog):
    """The rules fire only where the key does nothing: a config that uses them gets no warning."""
    raw = merge(FLUX, {"training": {"weighting_scheme": "logit_normal", "logit_mean": 0.5, "max_train_steps": 5},
                       "logging": {"sample_prompts": ["a"], "sample_seed": 3, "report_to": ["wandb"],
                                   "wandb_mode": "offline"},
                       "lr_scheduler": {"name": "cosine", "min_lr_ratio": 0.1},
                       "data": {"buckets": True, "bucket_step": 32}})
    with caplog.at_level(logging.WARNING, logger="glm_training.config"):
        config_from_dict(raw)
    assert not [r for r in caplog.records if "do nothing" in r.getMessage()]


def test_family_section_roundtrip():
    check_family_section_roundtrip()
