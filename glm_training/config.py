"""The typed schema of the whole YAML config, its loading, `--set` overrides and validation.

Every section is a dataclass with documented defaults. Loading walks the YAML against the
schema, so every error names the full key (`training.learning_rate`), what was wrong and,
for typos, the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

logger = logging.getLogger("glm_training.config")


class ConfigError(ValueError):
    """A problem with the user's config; the message names the key and what to do."""


def _field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           doc: str = "", choices: tuple | None = None, min: float | None = None,
           max: float | None = None, required: bool = False) -> Any:
    metadata = {"doc": doc, "choices": choices, "min": min, "max": max, "required": required}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: For the families' own config sections (`ModelFamily.options`): same docs and validation.
option_field = _field


@dataclass
class GeneratorConfig:
    """`model.generator`: the frozen image generator of model.family prompt_policy."""

    family: str = _field(None, required=True, doc="A project family (sdxl, flux_kontext, qwen_image, ...) or "
                         "diffusers (any pipeline folder, e.g. a StableDiffusion3Pipeline).")
    pretrained_model_name_or_path: str = _field(None, required=True, doc="Its folder or hub id; tiny:<name> "
                                                "builds a tiny one (e.g. tiny:sd3).")
    num_inference_steps: int = _field(20, min=1, doc="Its sampling steps.")
    guidance_scale: float = _field(4.5, min=0, doc="Its classifier-free guidance.")
    resolution: Optional[int] = _field(None, min=8, doc="Side of its images; default data.resolution.")
    weight_dtype: str = _field("fp32", choices=("fp32", "fp16", "bf16"))
    device: Optional[str] = _field(None, doc="Its device (e.g. cuda:1); default the training device.")


@dataclass
class ModelConfig:
    family: str = _field("sdxl", doc="Model family: sdxl, flux_kontext, qwen_image, qwen_image_edit, "
                         "qwen_image_edit_plus, glm_image, bagel, prompt_policy.")
    pretrained_model_name_or_path: str = _field(
        None, required=True,
        doc="Local diffusers folder or hub id; 'tiny:<family>' builds the tiny random-weight model.")
    revision: Optional[str] = _field(None, doc="Hub revision.")
    variant: Optional[str] = _field(None, doc="Weight variant, e.g. fp16.")
    weight_dtype: str = _field("auto", choices=("auto", "fp32", "fp16", "bf16"),
                               doc="dtype of frozen weights; auto follows training.mixed_precision.")
    component: Optional[str] = _field(None, doc="Which part to train (GLM-Image: ar|dit|both; "
                                      "BAGEL: und|gen|both). Default: the family's main part.")
    train_text_encoder: bool = _field(False, doc="Also train the text encoder(s) (LoRA or full).")
    gradient_checkpointing: bool = _field(False, doc="Trade compute for memory in trained parts.")
    max_sequence_length: Optional[int] = _field(None, min=1, doc="Text tokens per prompt (FLUX T5, Qwen, GLM "
                                                "glyphs); default: the family's pipeline default.")
    prediction_type: Optional[str] = _field(None, choices=(None, "epsilon", "v_prediction"),
                                            doc="Override the scheduler's prediction type (epsilon families).")
    guidance_scale: Optional[float] = _field(
        None, min=0, doc="Guidance-distilled families (FLUX Kontext): value fed to the transformer's "
        "guidance embedding while training; default 1.0 (about 2.5-3.5 is what FLUX.1 dev samples with).")
    quantize: Any = _field(
        None, doc="Quantize frozen and LoRA-wrapped weights at load: int8 / fp8 (torchao, CPU and CUDA), nf4 "
        "(bitsandbytes, CUDA) or none; one value for every quantizable component, or {component: kind} with the "
        "pipeline folder names (transformer, unet, text_encoder, text_encoder_2, vision_language_encoder; "
        "GLM-Image also dit / ar; bagel). The VAE is never quantized. A folder saved quantized loads as it is.")
    gguf_file: Optional[str] = _field(
        None, doc="A pre-quantized GGUF file of the transformer (FLUX Kontext, Qwen-Image) loaded instead of its "
        "folder weights (diffusers GGUFQuantizationConfig); its config comes from the checkpoint folder.")
    block_swap: int = _field(
        0, min=0, doc="Keep N transformer blocks of the trained denoiser in pinned CPU memory and stream them to "
        "the GPU around their forward/backward (CUDA; a logged no-op on CPU). LoRA only.")
    text_encoder_device: Optional[str] = _field(
        None, doc="Device of the frozen text encoders (e.g. cpu, cuda:1); default the training device.")
    vae_device: Optional[str] = _field(None, doc="Device of the frozen VAE (e.g. cuda:1); default the training "
                                       "device.")
    generator: Optional[GeneratorConfig] = _field(
        None, doc="model.family prompt_policy: the frozen image generator that renders the policy's rewrites "
        "(family, pretrained_model_name_or_path, num_inference_steps, guidance_scale, resolution, weight_dtype, "
        "device).")


@dataclass
class ComponentLoraConfig:
    """Per-component LoRA overrides (`lora.components.<name>`); unset keys take the global lora value."""

    rank: Optional[int] = _field(None, min=1)
    alpha: Optional[float] = _field(None, min=0)
    dropout: Optional[float] = _field(None, min=0, max=1)
    target_modules: Optional[list[str]] = _field(None, doc="Module names to adapt in this component.")
    init: Optional[str] = _field(None, choices=(None, "gaussian", "default", "pissa", "olora"))
    pretrained_weight: Optional[str] = _field(
        None, doc="Trained component: start its LoRA from these weights. Frozen component: load these "
        "weights into it (a LoRA folder/file or a full component folder), e.g. the AR-trained adapter "
        "for a later DiT run.")


@dataclass
class LoraConfig:
    enabled: bool = _field(True, doc="LoRA (true) or full fine-tuning (false).")
    rank: int = _field(16, min=1)
    alpha: float = _field(16.0, min=0, doc="Scale = alpha / rank.")
    dropout: float = _field(0.0, min=0, max=1)
    target_modules: Optional[list[str]] = _field(None, doc="Module names to adapt; default per family.")
    text_encoder_target_modules: list[str] = _field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    init: str = _field("gaussian", choices=("gaussian", "default", "pissa", "olora"))
    pretrained_weight: Optional[str] = _field(None, doc="Start from these LoRA weights (safetensors).")
    save_format: str = _field("diffusers", choices=("diffusers", "comfyui", "both"),
                              doc="comfyui also writes kohya-style lora_unet_* keys.")
    components: dict[str, ComponentLoraConfig] = _field(
        default_factory=dict, doc="Per-component overrides, e.g. {ar: {rank: 8}, dit: {rank: 32, "
        "target_modules: [to_q, to_v]}} (GLM-Image); keys are the family's component names.")


@dataclass
class DataConfig:
    path: str = _field(None, required=True, doc="Dataset folder or manifest file.")
    format: str = _field("auto", choices=("auto", "folder", "control_folder", "metadata_jsonl", "prompts_txt",
                                          "pickapic"),
                         doc="folder: prompts.txt + target_images/ [+ source_images/ for i2i] (or chosen/ + "
                         "rejected/ for pairs, or prompts.txt alone); control_folder: training_images/NAME.png + "
                         "NAME.txt + control_images/NAME.jpg (or NAME_1.jpg, NAME_2.jpg, ... for several); "
                         "metadata_jsonl: a .jsonl / .json manifest (or a folder with metadata.jsonl / "
                         "pairs.jsonl) with prompt (or text), image (or file_name), chosen, rejected, "
                         "control_images, or BAGEL conversations; prompts_txt: one prompt per line; "
                         "pickapic: Pick-a-Pic v2 parquet files.")
    eval_path: Optional[str] = _field(None, doc="Evaluation dataset (any layout); wins over the layout's own "
                                      "eval_* files.")
    eval_fraction: float = _field(0.0, min=0, max=0.5, doc="Hold out this fraction of data.path for "
                                  "evaluation (deterministic, by content; removed from training). Not with "
                                  "data.eval_path.")
    resolution: int = _field(1024, min=8, doc="Images are resized (short side) and cropped to this.")
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = _field(0.0, min=0, max=1, doc="Probability of training on an empty prompt.")
    control_dropout: float = _field(
        0.0, min=0, max=1, doc="i2i: probability that a micro-batch is trained without its control images "
        "(text-to-image). Drawn once per micro-batch from (training.seed, epoch, first sample index), so "
        "a batch never mixes with and without controls and a resumed run draws the same.")
    buckets: bool = _field(False, doc="Aspect-ratio buckets: batches of one (height, width) of about "
                           "resolution^2 pixels, sides multiples of the family's resolution multiple; each "
                           "image (and its control images) is resized to cover its nearest-aspect bucket "
                           "and cropped. Off: square resolution x resolution crops.")
    bucket_aspect_range: list[float] = _field(default_factory=lambda: [0.5, 2.0],
                                              doc="Buckets: [min, max] width/height of the buckets.")
    bucket_step: Optional[int] = _field(None, min=1, doc="Buckets: side step in pixels (a multiple of the "
                                        "family's resolution multiple); default the smallest such multiple "
                                        ">= resolution/16 (64 at 1024 px).")
    on_error: str = _field("raise", choices=("raise", "skip"),
                           doc="raise: stop listing every bad file; skip: log and skip them.")
    shuffle: bool = True
    num_workers: int = _field(0, min=0)


@dataclass
class EmaConfig:
    """`training.ema`: an exponential moving average of the trained weights (diffusers' EMAModel)."""

    decay: float = _field(0.999, min=0, max=1, doc="Averaging decay (diffusers' warm-up: min(decay, (1+n)/(10+n))); "
                          "0 keeps a copy of the raw weights.")
    update_after_step: int = _field(0, min=0, doc="Optimizer steps before averaging starts (a plain copy until then).")
    device: str = _field("cpu", choices=("cpu", "same"), doc="cpu: the averages in host memory; same: beside the "
                         "parameters.")


@dataclass
class TrainingConfig:
    method: str = _field("sft", choices=("sft", "dpo", "grpo", "nft"),
                         doc="sft, dpo (Diffusion-/token DPO), grpo (Flow-GRPO / DDPO / token GRPO) or nft "
                             "(DiffusionNFT: denoisers only; uses the grpo.* rollout and advantage keys).")
    mode: str = _field("t2i", choices=("t2i", "i2i"), doc="Text-to-image or image-to-image (edit).")
    seed: int = 42
    batch_size: int = _field(1, min=1, doc="Per device.")
    gradient_accumulation_steps: int = _field(1, min=1)
    max_train_steps: Optional[int] = _field(None, min=1, doc="Optimizer steps; wins over num_epochs.")
    num_epochs: int = _field(1, min=1)
    learning_rate: float = _field(1e-4, min=0)
    max_grad_norm: Optional[float] = _field(1.0, min=0, doc="Gradient clipping; null disables it.")
    mixed_precision: str = _field("no", choices=("no", "fp16", "bf16"))
    checkpointing_steps: int = _field(500, min=1)
    checkpoints_total_limit: Optional[int] = _field(3, min=1)
    resume_from_checkpoint: Optional[str] = _field(None, doc="'latest' or a checkpoint folder.")
    weighting_scheme: str = _field("none", choices=("none", "logit_normal", "mode", "cosmap", "sigma_sqrt"),
                                   doc="Flow families: timestep density / loss weighting (diffusers names).")
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    snr_gamma: Optional[float] = _field(None, min=0, doc="Epsilon families: min-SNR loss weighting.")
    noise_offset: float = _field(0.0, min=0)
    ema: Optional[EmaConfig] = _field(
        None, doc="EMA of the trained weights, e.g. {decay: 0.999, update_after_step: 100, device: cpu}; null: off. "
        "Used for evaluation and samples, saved in every checkpoint (ema.safetensors) and in final/ema/.")


@dataclass
class OptimizerConfig:
    name: str = _field("adamw", choices=("adamw", "adamw8bit", "prodigy", "sgd"),
                       doc="Ignored when class_path is set.")
    class_path: Optional[str] = _field(None, doc="Any optimizer class, e.g. torch.optim.RMSprop.")
    weight_decay: float = _field(1e-2, min=0)
    betas: list[float] = _field(default_factory=lambda: [0.9, 0.999])
    eps: float = _field(1e-8, min=0)
    kwargs: dict[str, Any] = _field(default_factory=dict, doc="Extra keyword arguments for the class.")
    component_lr: dict[str, float] = _field(default_factory=dict,
                                            doc="Learning rate per trained component, e.g. {ar: 1e-5, dit: 1e-4}.")


@dataclass
class LrSchedulerConfig:
    name: str = _field("constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = _field(0, min=0)
    min_lr_ratio: float = _field(0.0, min=0, max=1, doc="Floor of linear/cosine decay, as a fraction.")


@dataclass
class LoggingConfig:
    output_dir: str = _field("output", doc="Runs go to output_dir/project/v0, v1, ...")
    project: str = "glm_training"
    report_to: list[str] = _field(default_factory=lambda: ["tensorboard"],
                                  doc="tensorboard is always on; add wandb to also log there.")
    wandb_mode: str = _field("auto", choices=("auto", "online", "offline"),
                             doc="auto: offline when no API key is configured.")
    log_steps: int = _field(1, min=1)
    sample_prompts: list[str] = _field(default_factory=list)
    sample_control_images: list[str] = _field(default_factory=list, doc="i2i: one per sample prompt.")
    sample_steps: int = _field(0, min=0, doc="Sample every N steps (0: only at the end).")
    sample_num_inference_steps: int = _field(20, min=1)
    sample_guidance_scale: float = _field(5.0, min=0)
    sample_seed: int = 0
    sample_resolution: Optional[int] = _field(None, min=8, doc="Default: data.resolution.")


@dataclass
class CacheConfig:
    enabled: bool = _field(False, doc="Use precomputed text embeddings and latents.")
    dir: str = _field("cache", doc="Shared between runs; entries are keyed by content and model.")
    device: Optional[str] = _field(None, doc="Device used by --cache to fill it (default: training device).")


@dataclass
class DistributedConfig:
    backend: str = _field("auto", choices=("auto", "nccl", "gloo"), doc="auto: nccl on GPU, gloo on CPU.")
    find_unused_parameters: bool = False
    timeout_minutes: int = _field(30, min=1)
    deepspeed: str = _field("none", choices=("none", "zero2", "zero3"),
                            doc="DeepSpeed ZeRO through accelerate under torchrun / accelerate launch (or one "
                                "process): zero2 shards optimizer state and gradients, zero3 the parameters too; "
                                "settings from configs/accelerate/deepspeed_zero*.yaml. Needs pip install -e "
                                "'.[deepspeed]'.")


@dataclass
class DPOConfig:
    beta: Optional[float] = _field(None, min=0, doc="Default per family (5000 SDXL, 1000 flow, 0.1 tokens).")
    token_beta: Optional[float] = _field(None, min=0, doc="beta of token DPO next to a denoising term (GLM-Image "
                                         "component both: dpo.beta is the DiT's); default 0.1.")
    loss_type: str = _field("sigmoid", choices=("sigmoid", "hinge", "ipo"))
    label_smoothing: float = _field(0.0, min=0, max=0.5)
    sft_weight: float = _field(0.0, min=0, doc="Weight of an SFT term on the preferred sample.")
    online: bool = _field(False, doc="Online pairs: data.path holds prompts; each step samples num_generations "
                                     "images per prompt, scores them with reward:, trains on best vs worst.")
    num_generations: int = _field(4, min=2, doc="Online pairs: images sampled per prompt.")
    sample_steps: int = _field(20, min=1, doc="Online pairs: ODE sampling steps.")
    guidance_scale: float = _field(1.0, min=0, doc="Online pairs: classifier-free guidance when sampling.")


@dataclass
class GRPOConfig:
    num_generations: int = _field(4, min=2)
    beta: float = _field(0.0, min=0, doc="KL weight to the reference (LoRA: adapter disabled; full "
                                         "fine-tuning: a frozen copy).")
    epsilon: float = _field(1e-4, min=0, doc="Clip range of the policy ratio.")
    epsilon_high: Optional[float] = _field(None, min=0)
    flow_epsilon: Optional[float] = _field(None, min=0, doc="Clip range of the diffusion (Flow-GRPO / DDPO) ratio "
                                           "when it differs from the token one (GLM-Image component both: epsilon "
                                           "~0.2 for the AR, ~1e-4 for the DiT); default: epsilon / epsilon_high.")
    scale_rewards: str = _field("group", choices=("group", "batch", "none"))
    num_iterations: int = _field(1, min=1, doc="Optimizer steps per rollout batch (TRL's inner epochs); the "
                                               "old log-probs stay the rollout's, so the clip acts after the first.")
    eval_steps: int = _field(30, min=1, doc="ODE steps of the evaluation samples.")
    loss_type: str = _field("grpo", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    temperature: float = _field(1.0, min=0)
    sample_steps: int = _field(10, min=1)
    noise_level: float = _field(0.7, min=0)
    sde_window: Optional[list[int]] = _field(None, doc="[start, end) step indices that are stochastic.")
    timestep_fraction: float = _field(1.0, min=0, max=1)
    guidance_scale: float = _field(1.0, min=0)
    train_cfg: bool = False
    adv_clip_max: float = _field(5.0, min=0)
    dynamic_sample: bool = _field(False, doc="Resample the prompts of groups whose rewards all tie (zero std, no "
                                  "signal) with new rollouts, up to max_resample_rounds times; logged (ms-swift).")
    max_resample_rounds: int = _field(3, min=1, doc="dynamic_sample: resampling rounds per step at most; groups "
                                      "still tied after them stay masked.")


#: The paper's old-policy schedules (`nft.decay_schedule`), as `algorithms.nft.OLD_POLICY_SCHEDULES`.
#: (flat, rate, cap) by name; tests/test_nft.py checks they match.
NFT_DECAY_PRESETS = {"linear_to_0.5": (0, 0.001, 0.5), "flat75_to_0.999": (75, 0.0075, 0.999)}


@dataclass
class NFTConfig:
    """DiffusionNFT (`training.method: nft`). Rollouts, rewards and advantages use the grpo.* keys
    (num_generations, sample_steps (deterministic ODE), guidance_scale, scale_rewards, adv_clip_max,
    beta = KL weight to the reference, eval_steps, dynamic_sample, num_iterations)."""

    beta: float = _field(1.0, min=0, doc="The paper's beta: how far the implicit positive / negative policies "
                                         "sit from the old one (1.0 or 0.1); must be > 0.")
    adv_mode: str = _field("all", choices=("all", "positive_only", "negative_only", "binary"),
                           doc="Which advantages make the optimality weight r: all, positive_only (bad images "
                               "get r = 0.5), negative_only, binary (sign of the advantage).")
    decay_schedule: Any = _field("linear_to_0.5", doc="Old-policy EMA decay after each optimizer step: a preset "
                                 "(linear_to_0.5 = flat 0, rate 0.001, cap 0.5; flat75_to_0.999 = flat 75, rate "
                                 "0.0075, cap 0.999) or {flat: <steps>, rate: <per step>, cap: <max>}.")
    timesteps_per_sample: int = _field(4, min=1, doc="Noised copies (timesteps from the family's training "
                                       "density, training.weighting_scheme) trained per rollout image and "
                                       "optimizer step; fewer make the update noisier (benchmarks/rl_compare.py).")


@dataclass
class EvalConfig:
    """`eval:` validation on the held-out split (data.eval_path / data.eval_fraction / the layout's eval_*
    files), metrics against targets, the best checkpoint and GRPO guardrails."""

    steps: int = _field(0, min=0, doc="Evaluate every N optimizer steps (0: only at the end of training). SFT/DPO: "
                        "validation loss (DPO: implicit accuracy, margins) at fixed noise and timesteps.")
    draws: int = _field(4, min=1, doc="Fixed noise/timestep draws per eval sample (diffusion; token losses are exact).")
    metrics: list[str] = _field(default_factory=list, doc="On images generated (ODE, logging.sample_seed, "
                                "logging.sample_num_inference_steps; GRPO: grpo.eval_steps) for the eval prompts: "
                                "lpips, ssim, clip_score, fid, kid, ocr.")
    metric_options: dict[str, Any] = _field(default_factory=dict, doc="Per metric, e.g. {fid: {inception_weights: "
                                            "/path/weights-inception-2015-12-05-6726825d.pth}}.")
    best_metric: Optional[str] = _field(None, doc="Keep <run>/best/ at the best value of this logged eval key, e.g. "
                                        "eval/loss, eval/lpips, eval/reward/total_mean.")
    mode: str = _field("min", choices=("min", "max"), doc="Whether a lower (min) or higher (max) best_metric is better.")
    patience: Optional[int] = _field(None, min=1, doc="Stop after this many evaluations without a better best_metric.")
    rewards: dict[str, Any] = _field(default_factory=dict, doc="Rewards NOT trained on, scored on the eval images "
                                     "(same options as reward.rewards); logged as eval/independent/<name>.")
    hacking_threshold: float = _field(0.05, min=0, doc="GRPO: warn when the trained reward rose since the first "
                                      "evaluation while an eval.rewards reward fell by more than this.")
    collapse_std: float = _field(0.0, min=0, doc="GRPO: warn when the mean within-group std of the trained reward "
                                 "(grpo.num_generations samples per eval prompt) falls below this; 0: off.")


@dataclass
class RewardConfig:
    device: Optional[str] = None
    batch_size: int = _field(8, min=1)
    rewards: dict[str, Any] = _field(default_factory=dict, doc="name -> options (weight, type, ...).")
    weights: dict[str, Any] = _field(default_factory=dict, doc="Per-component weights: {ar: {...}, dit: {...}}.")
    on_error: str = _field("raise", choices=("raise", "zero", "skip_group"),
                           doc="A reward that raises or returns NaN/inf for a sample: raise (stop, naming the "
                               "reward and sample), zero (score 0), skip_group (GRPO: the sample's group gets no "
                               "advantage). Failed samples are logged (reward/failed_samples).")


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: The family's own section (`ModelFamily.options`), read from the top-level YAML section named
    #: like model.family (`bagel:`); None when the family has none. Not a YAML key itself.
    family_options: Any = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """As the YAML: the family's section under the family's name (so the dump loads again)."""
        out = dataclasses.asdict(self)
        options = out.pop("family_options")
        if options is not None:
            out[self.model.family] = options
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Loading and validation


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if value is None:
        raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)}).")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}.") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        return int(as_float)
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string: accept it.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}.") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}.")
        return str(value)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}.")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}.")


def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for name in raw:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"Unknown key '{key}'.{_did_you_mean(str(name), list(fields))} "
                              f"Valid keys in {where}: {', '.join(fields)}.")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            value = _coerce(raw[name], hints[name], key)
        elif dataclasses.is_dataclass(hints[name]):
            value = _build_dataclass(hints[name], {}, key)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"Missing required section '{key}'.")
        meta = f.metadata
        if meta.get("required") and value is None:
            doc = f" ({meta['doc']})" if meta.get("doc") else ""
            raise ConfigError(f"Missing required key '{key}'{doc}.")
        if meta.get("choices") and value not in meta["choices"]:
            shown = [c for c in meta["choices"] if c is not None]
            hint = _did_you_mean(str(value), [str(c) for c in shown])
            raise ConfigError(f"{key}: {value!r} is not one of {shown}.{hint}")
        if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{key}: {value} is below the minimum {meta['min']}.")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{key}: {value} is above the maximum {meta['max']}.")
        values[name] = value
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. training.learning_rate=1e-4.")
    key, raw_value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key.")
    return parts, yaml.safe_load(raw_value) if raw_value.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section.")
            node = child
        node[parts[-1]] = value
    return raw


def check_combinations(cfg: Config) -> None:
    """Rules that involve more than one key."""
    if not cfg.lora.enabled and cfg.lora.save_format != "diffusers":
        raise ConfigError("lora.save_format: comfyui output needs LoRA; set lora.enabled: true "
                          "or lora.save_format: diffusers.")
    if not cfg.lora.enabled and cfg.lora.pretrained_weight:
        raise ConfigError("lora.pretrained_weight is set but lora.enabled is false.")
    if cfg.logging.sample_control_images and len(cfg.logging.sample_control_images) != len(
            cfg.logging.sample_prompts):
        raise ConfigError("logging.sample_control_images must have one image per entry of "
                          "logging.sample_prompts.")
    if cfg.training.mode == "i2i" and cfg.logging.sample_prompts and not cfg.logging.sample_control_images:
        raise ConfigError("training.mode is i2i: add logging.sample_control_images (one per sample prompt).")
    if cfg.grpo.epsilon_high is not None and cfg.grpo.epsilon_high < cfg.grpo.epsilon:
        raise ConfigError("grpo.epsilon_high must be >= grpo.epsilon.")
    check_eval(cfg)
    window = cfg.grpo.sde_window
    if window is not None and (len(window) != 2 or not 0 <= window[0] < window[1] <= cfg.grpo.sample_steps):
        raise ConfigError(f"grpo.sde_window: {window} must be [start, end) with "
                          f"0 <= start < end <= grpo.sample_steps ({cfg.grpo.sample_steps}).")
    online_rl = cfg.training.method in ("grpo", "nft")  # both sample grpo.num_generations per prompt
    if online_rl and cfg.training.batch_size % cfg.grpo.num_generations:
        raise ConfigError(f"training.batch_size ({cfg.training.batch_size}) must be a multiple of "
                          f"grpo.num_generations ({cfg.grpo.num_generations}).")
    if online_rl and not cfg.reward.rewards:
        raise ConfigError(f"training.method: {cfg.training.method} needs at least one reward in reward.rewards.")
    if online_rl and cfg.model.train_text_encoder:
        raise ConfigError("model.train_text_encoder: GRPO encodes the prompts once per rollout without gradients, so a "
                          "text-encoder LoRA would get none; set it to false for GRPO (SFT and DPO train it).")
    if online_rl and cfg.data.caption_dropout > 0:
        raise ConfigError("data.caption_dropout: GRPO samples its rollouts from the prompts as written (an empty "
                          "prompt would be scored and trained like any other); set it to 0 and shape what the "
                          "policy learns with reward.rewards / reward.weights instead.")
    if cfg.training.method == "nft":
        check_nft_schedule(cfg.nft.decay_schedule)
        if cfg.nft.beta <= 0:
            raise ConfigError("nft.beta must be > 0 (the paper uses 1.0 or 0.1).")


def text_answers_in_eval(cfg: Config) -> bool:
    """Whether evaluation generates text answers (bleu / rouge): SFT of a family with `answer`."""
    from glm_training.models.base import family_class

    return cfg.training.method == "sft" and callable(getattr(family_class(cfg.model.family), "answer", None))


def check_eval(cfg: Config) -> None:
    """The eval: section: metric names, their options, best_metric and patience."""
    from glm_training.evaluation.metrics import METRIC_NAMES, TEXT_METRICS

    ev = cfg.eval
    for name in ev.metrics:
        if name not in METRIC_NAMES:
            raise ConfigError(f"eval.metrics: unknown metric {name!r}.{_did_you_mean(name, list(METRIC_NAMES))} "
                              f"Available: {', '.join(METRIC_NAMES)}.")
        if name in TEXT_METRICS and not text_answers_in_eval(cfg):
            raise ConfigError(f"eval.metrics: {name} scores generated text answers, which only SFT of a family that "
                              "answers text (model.family: bagel) generates during evaluation; remove it, or score "
                              "answers after training with glm_training.predict --answer.")
    stray = sorted(set(ev.metric_options) - set(ev.metrics))
    if stray:
        raise ConfigError(f"eval.metric_options: {stray} are not in eval.metrics {ev.metrics}; add them there or "
                          "remove their options.")
    if ev.patience is not None and not ev.best_metric:
        raise ConfigError("eval.patience: early stopping needs eval.best_metric (e.g. eval/loss) to watch.")
    if ev.best_metric and not ev.best_metric.startswith("eval/"):
        raise ConfigError(f"eval.best_metric: {ev.best_metric!r} must be a logged eval key (eval/loss, eval/lpips, "
                          "eval/reward/total_mean, ...).")


def check_nft_schedule(value: Any) -> tuple[int, float, float]:
    """`nft.decay_schedule` -> (flat, rate, cap), or a ConfigError saying what it may be."""
    if isinstance(value, str):
        presets = NFT_DECAY_PRESETS
        if value not in presets:
            raise ConfigError(f"nft.decay_schedule: unknown preset {value!r}.{_did_you_mean(value, list(presets))} "
                              f"Use one of {list(presets)} or {{flat: <steps>, rate: <per step>, cap: <max>}}.")
        return presets[value]
    if not isinstance(value, dict) or set(value) != {"flat", "rate", "cap"}:
        raise ConfigError(f"nft.decay_schedule: {value!r} must be a preset name {list(NFT_DECAY_PRESETS)} or a "
                          "mapping with exactly flat, rate and cap, e.g. {flat: 0, rate: 0.001, cap: 0.5}.")
    flat = _coerce(value["flat"], int, "nft.decay_schedule.flat")
    rate = _coerce(value["rate"], float, "nft.decay_schedule.rate")
    cap = _coerce(value["cap"], float, "nft.decay_schedule.cap")
    if flat < 0 or rate < 0 or not 0 <= cap <= 1:
        raise ConfigError(f"nft.decay_schedule: flat {flat} and rate {rate} must be >= 0 and cap {cap} in [0, 1].")
    return flat, rate, cap


def schema_default(key: str) -> Any:
    """The default of `section.name` in the schema (a section of Config)."""
    section, name = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def unused_keys(cfg: Config) -> dict[str, str]:
    """Keys (or whole sections, 'dpo.*') that do nothing with this config -> why. Generic rules
    only; what a family ignores it declares itself (`ModelFamily.ignored_keys`)."""
    training, data, lora, log, opt = cfg.training, cfg.data, cfg.lora, cfg.logging, cfg.optimizer
    rules: dict[str, str] = {}
    if training.method != "dpo":
        rules["dpo.*"] = f"training.method is {training.method}"
    elif not cfg.dpo.online:
        for name in ("num_generations", "sample_steps", "guidance_scale"):
            rules[f"dpo.{name}"] = "dpo.online is false (offline pairs)"
    if training.method not in ("grpo", "nft"):
        rules["grpo.*"] = f"training.method is {training.method}"
    if training.method != "nft":
        rules["nft.*"] = f"training.method is {training.method}"
    else:  # DiffusionNFT: ODE rollouts from the old policy, a forward-process loss, no ratio
        why = "training.method nft has no policy ratio and samples with the deterministic ODE"
        for name in ("epsilon", "epsilon_high", "flow_epsilon", "loss_type", "temperature", "noise_level",
                     "sde_window", "timestep_fraction", "train_cfg"):
            rules[f"grpo.{name}"] = why
        rules["training.noise_offset"] = "training.method nft noises its rollout images without offset"
        rules["training.snr_gamma"] = "training.method nft weights each sample adaptively (no SNR weighting)"
        rules["data.random_flip"] = "training.method nft reads prompts (and source images), it trains on its rollouts"
    if training.method == "sft" or (training.method == "dpo" and not cfg.dpo.online):
        rules["reward.*"] = "rewards score GRPO rollouts and online DPO pairs only"
    if not cfg.grpo.dynamic_sample:
        rules["grpo.max_resample_rounds"] = "grpo.dynamic_sample is false"
    if training.method == "grpo":
        why = "GRPO trains on its own rollouts (SDE log-probs), not on noised data"
        for name in ("noise_offset", "snr_gamma", "weighting_scheme", "logit_mean", "logit_std", "mode_scale"):
            rules[f"training.{name}"] = why
        rules["data.random_flip"] = "GRPO reads prompts (and source images), it trains on its rollouts"
    if training.method != "sft" or training.mode == "t2i":
        rules["data.control_dropout"] = ("training.mode is t2i (no control images)" if training.mode == "t2i"
                                         else f"SFT only; training.method is {training.method}")
    if training.weighting_scheme != "logit_normal":
        rules.setdefault("training.logit_mean", "training.weighting_scheme is not logit_normal")
        rules.setdefault("training.logit_std", "training.weighting_scheme is not logit_normal")
    if training.weighting_scheme != "mode":
        rules.setdefault("training.mode_scale", "training.weighting_scheme is not mode")
    if training.max_train_steps is not None:
        rules["training.num_epochs"] = "training.max_train_steps is set and wins over it"
    if not data.buckets:
        rules["data.bucket_aspect_range"] = rules["data.bucket_step"] = "data.buckets is false"
    if not lora.enabled:
        for name in ("rank", "alpha", "dropout", "target_modules", "text_encoder_target_modules", "init",
                     "components"):
            rules[f"lora.{name}"] = "lora.enabled is false (full fine-tuning)"
    elif not cfg.model.train_text_encoder:
        rules["lora.text_encoder_target_modules"] = "model.train_text_encoder is false"
    if opt.class_path:
        for name in ("name", "weight_decay", "betas", "eps"):
            rules[f"optimizer.{name}"] = "optimizer.class_path is set (its arguments are optimizer.kwargs)"
    elif opt.name == "sgd":
        rules["optimizer.betas"] = rules["optimizer.eps"] = "optimizer.name is sgd"
    if cfg.lr_scheduler.name == "constant":
        rules["lr_scheduler.min_lr_ratio"] = "lr_scheduler.name is constant (no decay)"
    if training.method in ("grpo", "nft"):  # GRPO evaluates (ODE) every sample_steps, on the training prompts by default
        for name in ("sample_num_inference_steps", "sample_guidance_scale", "sample_resolution"):
            rules[f"logging.{name}"] = "GRPO evaluates with grpo.eval_steps and grpo.guidance_scale at data.resolution"
    elif not log.sample_prompts:
        # eval.metrics / eval.rewards generate their images with the sample settings.
        eval_images = ("sample_num_inference_steps", "sample_guidance_scale", "sample_seed")
        for name in ("sample_steps", "sample_num_inference_steps", "sample_guidance_scale", "sample_seed",
                     "sample_resolution"):
            if not (name in eval_images and (cfg.eval.metrics or cfg.eval.rewards)):
                rules[f"logging.{name}"] = "logging.sample_prompts is empty (no samples)"
    ev = cfg.eval
    if not ev.best_metric:
        rules["eval.mode"] = "eval.best_metric is not set"
    if training.method in ("grpo", "nft"):
        rules["eval.draws"] = f"training.method {training.method} has no validation loss (it evaluates rewards)"
        if not ev.rewards:
            rules["eval.hacking_threshold"] = "eval.rewards is empty (no independent reward to compare)"
    else:
        rules["eval.hacking_threshold"] = rules["eval.collapse_std"] = "GRPO guardrails (training.method grpo/nft)"
    if "wandb" not in log.report_to:
        rules["logging.wandb_mode"] = "logging.report_to has no wandb"
    if not cfg.cache.enabled:
        rules["cache.dir"] = rules["cache.device"] = "cache.enabled is false"
    return rules


def warn_unused_keys(cfg: Config, raw: dict, source: str = "config") -> list[str]:
    """One warning listing every key the user set (in the YAML or by --set) that does nothing
    with this config; -> those keys."""
    rules = unused_keys(cfg)
    found = []
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for name in values:
            key = f"{section}.{name}"
            why = rules.get(key) or rules.get(f"{section}.*")
            if why:
                found.append(f"{key} ({why})")
    if found:
        logger.warning("%s: these keys are set but do nothing with this config: %s. Remove them (or change the "
                       "keys in brackets).", source, "; ".join(found))
    return [item.split(" ", 1)[0] for item in found]


def _family_section(raw: dict) -> tuple[dict, Any, dict | None]:
    """Split the family's own section off the raw config: -> (raw without it, the family class,
    its raw section). Renamed keys of the family move into the section, with a warning."""
    from glm_training.models.base import family_class, family_names

    model = raw.get("model")
    name = model.get("family", ModelConfig.family) if isinstance(model, dict) else ModelConfig.family
    cls = family_class(str(name))
    raw = dict(raw)
    for other in family_names():
        if other != name and other in raw and other not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"{other}: this section configures model.family {other}, but model.family is "
                              f"{name}; remove it or set model.family: {other}.")
    section = raw.pop(name, None)
    if section is not None and cls.options is None:
        raise ConfigError(f"{name}: model.family {name} has no options section; remove it.")
    for old, new in cls.renamed_keys.items():
        old_section, old_name = old.split(".")
        values = raw.get(old_section)
        if not isinstance(values, dict) or old_name not in values:
            continue
        new_name = new.split(".", 1)[1]
        section = dict(section or {})
        if new_name in section:
            raise ConfigError(f"{old} and {new} are both set; {old} is the old name of {new}: keep only {new}.")
        values = raw[old_section] = dict(values)
        section[new_name] = values.pop(old_name)
        logger.warning("%s is deprecated: it is now %s (section %s:); the old key is read for one more "
                       "release.", old, new, name)
    return raw, cls, section


def config_from_dict(raw: dict, source: str = "config") -> Config:
    try:
        raw, family, section = _family_section(raw)
        cfg = _build_dataclass(Config, raw, "")
        if family.options is not None:
            cfg.family_options = _build_dataclass(family.options, section, cfg.model.family)
        check_combinations(cfg)
        if cfg.model.generator is not None and not getattr(family, "has_generator", False):
            raise ConfigError(f"model.generator: model.family {cfg.model.family} renders its own images; the "
                              "generator is for model.family prompt_policy. Remove it.")
        family.check_config(cfg)  # what the family declares: modes, control images, methods, keys it ignores
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    warn_unused_keys(cfg, raw, source)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one and
    silently drops the first section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: key {key!r} is given twice in the same section (first on line "
                                  f"{seen[key]}); YAML would silently drop the first one. Merge them into one.")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice in the same object; JSON would silently keep the "
                              "last one. Merge them into one.")
        seen[key] = value
    return seen


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Pass --config with a YAML file "
                          f"(examples in configs/).")
    try:
        if path.suffix.lower() == ".json":  # ms-swift users bring JSON configs: same schema as the YAML
            import json

            try:
                raw = json.loads(path.read_text(), object_pairs_hook=_unique_json_keys) or {}
            except json.JSONDecodeError as error:
                raise ConfigError(f"not valid JSON: {error}") from None
        else:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...).")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path))


def _describe_section(lines: list[str], name: str, cls: type, note: str = "") -> None:
    lines.append(f"{name}:{note}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f.metadata.get("doc", "")
        required = " (required)" if f.metadata.get("required") else ""
        lines.append(f"  {f.name}: {default!r}  # {_type_name(hints[f.name])}{required} {doc}".rstrip())


def describe_schema() -> str:
    """Every key with its default and documentation, for `train.py --print-schema`; then the
    families' own sections (`model.family: <name>` reads the section `<name>:`)."""
    from glm_training.models.base import family_class, family_names

    lines: list[str] = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        if not section.metadata.get("internal"):
            _describe_section(lines, section.name, hints[section.name])
    for name in family_names():
        try:
            options = family_class(name).options
        except ConfigError:  # a family whose module is not installed
            continue
        if options is not None:
            _describe_section(lines, name, options, f"  # only with model.family: {name}")
    return "\n".join(lines)
