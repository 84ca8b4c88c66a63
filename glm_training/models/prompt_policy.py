"""Prompt-policy GRPO: a language (or vision-language) model learns to rewrite prompts for a
FROZEN image generator (seed 002, "Enhanced VLM GRPO").

    model:
      family: prompt_policy
      pretrained_model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct   # the policy (or a Qwen2.5-VL)
      generator: {family: diffusers, pretrained_model_name_or_path: stabilityai/stable-diffusion-3-medium-diffusers}
    prompt_policy: {train_type: lora, max_completion_length: 96, top_p: 0.95}
    training: {method: grpo}

One trained part, "policy", a `TokenPolicy` (the shared token GRPO of `parts/tokens.py`): the
policy samples `grpo.num_generations` completions per prompt (its own sampling loop, so that the
stored log-probs are those of the distribution sampled from: `grpo.temperature`, then
`prompt_policy.top_k` / `top_p`, applied identically when teacher-forcing); the rewrite is
extracted from each completion (`extract_rewrite`); the generator (any project family, or
`diffusers` for any pipeline folder such as `StableDiffusion3Pipeline`) renders every rewrite with
noise shared inside a group, so that rewards differ by the rewrite only. The rewards score the
image against the ORIGINAL prompt (`prompts[i]`); a `python:` reward also gets
`metadata[i]["rewrite"]`. The shipped GRPOTrainer runs it unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from glm_training.config import Config, ConfigError, option_field
from glm_training.models.base import Generation, ModelFamily, family_names
from glm_training.parts.common import SALT_ROLLOUT, sample_generator, seeded_int
from glm_training.parts.tokens import TokenPolicy

logger = logging.getLogger(__name__)

#: Salt of the generator-noise seed of each group (distinct from the policy's sampling stream).
SALT_GENERATOR_NOISE = 21
DEFAULT_SYSTEM_PROMPT = ("You rewrite prompts for a text-to-image model. Rewrite the user's prompt into one "
                         "detailed, vivid image description. Answer with the rewritten prompt only.")
TRAINING_STATS_FILE = "training_stats.json"
COMPLETIONS_FILE = "completions.jsonl"


@dataclass
class PromptPolicyOptions:
    """The `prompt_policy:` config section (model.family: prompt_policy)."""

    train_type: str = option_field("lora", choices=("lora", "qlora", "full"),
                                   doc="lora, qlora (4-bit base through bitsandbytes, CUDA) or full (needs "
                                   "lora.enabled: false).")
    system_prompt: str = option_field(DEFAULT_SYSTEM_PROMPT, doc="System instruction of the chat; empty: none.")
    chat_template: Optional[str] = option_field(None, doc="Jinja chat template replacing the tokenizer's own.")
    max_completion_length: int = option_field(64, min=1, doc="Tokens sampled per completion at most (TRL name).")
    top_k: int = option_field(0, min=0, doc="Sample from the k most likely tokens (0: off); applied to the "
                              "stored and the trained log-probs alike.")
    top_p: float = option_field(1.0, min=0, max=1, doc="Nucleus sampling (1: off); applied to the stored and "
                                "the trained log-probs alike.")
    rewrite_tag: Optional[str] = option_field(None, doc="Take the rewrite from <tag>...</tag> of the completion "
                                              "(e.g. prompt); missing tag: the original prompt is used.")
    max_rewrite_chars: int = option_field(1000, min=1, doc="Longer rewrites fall back to the original prompt "
                                          "(counted as rewrite/fallback_fraction).")
    log_completions: bool = option_field(False, doc="Write <run>/completions.jsonl and TensorBoard text: prompt "
                                         "-> rewrite -> reward per member (TRL name).")


def extract_rewrite(completion: str, original: str, tag: str | None, max_chars: int) -> tuple[str, bool]:
    """(the rewrite the generator renders, whether it fell back to the original prompt): the
    completion stripped (inside `<tag>...</tag>` when a tag is set); empty, missing-tag or
    over-long rewrites fall back to `original`."""
    text = completion
    if tag:
        found = re.search(rf"<{re.escape(tag)}>(.*?)(?:</{re.escape(tag)}>|$)", text, flags=re.S)
        if found is None:
            return original, True
        text = found.group(1)
    text = text.strip()
    if not text or len(text) > max_chars:
        return original, True
    return text, False


def all_linear_targets(model: nn.Module) -> list[str]:
    """`target_modules: all-linear` as peft means it: every Linear layer name except the output head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not output}
    if hasattr(model, "visual") or any(n.startswith(("visual.", "model.visual.")) for n, _ in model.named_modules()):
        # a VL policy: adapt the language model only (the vision tower stays as pretrained)
        names = {name.split(".")[-1] for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and module is not output and ".visual." not in f".{name}"}
    return sorted(names)


# -------------------------------------------------------------------------------------------------
# The frozen generator


class FrozenGenerator:
    """The image generator of `model.generator`: a project family (its `sample`, one call per
    member with its group's seed) or any diffusers pipeline folder (one call with one torch
    generator per member, members of a group seeded alike). Never trained; may sit on another
    device (`model.generator.device`)."""

    def __init__(self, cfg: Config, device: torch.device):
        gen = cfg.model.generator
        self.cfg, self.spec = cfg, gen
        self.device = torch.device(gen.device) if gen.device else device
        self.resolution = gen.resolution or cfg.data.resolution
        path = gen.pretrained_model_name_or_path
        if path.startswith("tiny:"):
            from glm_training.models.tiny import ensure_tiny

            path = str(ensure_tiny(path.split(":", 1)[1]))
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[gen.weight_dtype]
        if gen.family == "diffusers":
            from diffusers import DiffusionPipeline

            try:
                self.pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
            except (OSError, ValueError) as error:
                raise ConfigError(f"model.generator.pretrained_model_name_or_path: cannot load a diffusers "
                                  f"pipeline from {path} ({type(error).__name__}: {error}); give a folder with "
                                  "model_index.json or a hub id.") from None
            self.pipe.to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
            self.family = None
            self.modules = {name: module for name, module in self.pipe.components.items()
                            if isinstance(module, nn.Module)}
        else:
            from glm_training.config import config_from_dict
            from glm_training.models.base import build_family

            sub = config_from_dict({
                "model": {"family": gen.family, "pretrained_model_name_or_path": path,
                          "weight_dtype": gen.weight_dtype},
                "data": {"path": cfg.data.path, "resolution": self.resolution},
                "training": {"mode": cfg.training.mode}}, source="model.generator")
            self.family = build_family(sub, self.device)
            self.modules = {name: module for name, module in self.family.modules.items()
                            if isinstance(module, nn.Module)}
        for module in self.modules.values():
            module.requires_grad_(False).eval()

    @torch.no_grad()
    def render(self, prompts: list[str], seeds: list[int], controls: list | None = None) -> torch.Tensor:
        """Images in [0, 1] (len(prompts), 3, H, W); `seeds[i]` seeds member i's noise."""
        gen, side = self.spec, self.resolution
        kwargs: dict[str, Any] = {}
        if self.family is None:
            generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
            if controls:
                kwargs["image"] = controls
            images = self.pipe(prompt=list(prompts), height=side, width=side, num_inference_steps=gen.num_inference_steps,
                               guidance_scale=gen.guidance_scale, generator=generators, output_type="pt",
                               **kwargs).images
            return images.float().cpu().clamp(0, 1)
        import numpy as np

        out = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            image, = self.family.sample([prompt], height=side, width=side, num_inference_steps=gen.num_inference_steps,
                                        guidance_scale=gen.guidance_scale, seed=int(seed),
                                        control_images=[controls[i]] if controls else None)
            out.append(torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1))
        return torch.stack(out)


def _to_pil(pixels: torch.Tensor) -> list:
    """Control pixels in [-1, 1] (B, 3, H, W) -> PIL images."""
    from PIL import Image

    array = ((pixels.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


# -------------------------------------------------------------------------------------------------
# The trained part


class PolicyPart(TokenPolicy):
    """The rewriting LM / VLM as a token policy: chat-formatted prompts (left padded), completions
    sampled by a KV-cached loop whose per-token log-probs are those of the processed distribution
    (temperature, top_k, top_p), and the same processing when teacher-forcing."""

    rollout_needs = frozenset({"prompt"})

    @property
    def options(self) -> PromptPolicyOptions:
        return self.cfg.family_options

    @property
    def model(self) -> nn.Module:
        return self.family.modules["policy"]

    # -- inputs ------------------------------------------------------------------------------------

    def chat_inputs(self, prompts: list[str], controls: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The tokenised chats (left padded) of `prompts`, with the source images for a VL policy."""
        family, opts = self.family, self.options
        images = _to_pil(controls[0]) if controls else None
        texts = []
        for prompt in prompts:
            messages = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
            content: Any = prompt if images is None else [{"type": "image"}, {"type": "text", "text": prompt}]
            messages.append({"role": "user", "content": content})
            texts.append(family.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                              chat_template=opts.chat_template))
        if images is not None:
            inputs = family.processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            inputs = family.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def processed_logprobs(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """log-softmax of the distribution sampled from: logits / temperature, then top_k, top_p."""
        logits = logits.float() / max(temperature, 1e-6)
        opts = self.options
        if opts.top_k and opts.top_k < logits.shape[-1]:
            kth = torch.topk(logits, opts.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if opts.top_p < 1.0:
            ordered, order = torch.sort(logits, dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the first token is always kept)
            drop = (probs.cumsum(dim=-1) - probs) >= opts.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    def positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids that count real tokens only (left padding changes nothing): (B, L), or for
        a VL policy (4, B, L): text positions over the 3-D rope index of its image tokens."""
        text = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        if not self.family.is_vl:
            return text
        rope, _ = self.family.unwrapped("policy").model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"])
        return torch.cat([text[None], rope.to(text.device)], 0)

    def forward(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        return self.model(**inputs, position_ids=self.positions(inputs), **kwargs)

    # -- hooks -------------------------------------------------------------------------------------

    def token_logprobs(self, prompts, *, tokens=None, target_pixels=None, controls=None, temperature=1.0):
        if tokens is None:
            raise ConfigError("prompt_policy trains with training.method: grpo only (no target tokens).")
        inputs = self.chat_inputs(prompts, controls)
        tokens = tokens.to(self.device)
        mask = self.completion_mask(tokens)
        length = inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], tokens], 1),
                    attention_mask=torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], 1))
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
        logits = self.forward(full, use_cache=False).logits[:, length - 1:-1]
        logprobs = self.processed_logprobs(logits, temperature).gather(-1, tokens[..., None]).squeeze(-1)
        # pads after the end: 0 (never -inf, so a masked loss stays finite); a token outside the
        # current top-k / top-p set gets a finite floor
        return torch.where(mask, logprobs.clamp_min(-1e4), torch.zeros_like(logprobs))

    def completion_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True up to and including each completion's first end-of-turn token."""
        ended = torch.isin(tokens, torch.tensor(self.family.eos_ids, device=tokens.device))
        return (ended.long().cumsum(1) - ended.long()) == 0

    @torch.no_grad()
    def sample_tokens(self, prompts, *, seed, temperature=1.0, controls=None, greedy: bool = False):
        inputs = self.chat_inputs(prompts, controls)
        generator = torch.Generator(self.device).manual_seed(int(seed))
        eos = torch.tensor(self.family.eos_ids, device=self.device)
        pad = self.family.pad_id
        attention = inputs["attention_mask"]
        position = self.positions(inputs)[..., -1:]
        out = self.forward(inputs, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        tokens, logprobs = [], []
        for _ in range(self.options.max_completion_length):
            lp = self.processed_logprobs(logits, temperature)
            if greedy:
                token = lp.argmax(-1)
            else:
                token = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            logprobs.append(torch.where(done, torch.zeros_like(lp[:, 0]), lp.gather(-1, token[:, None]).squeeze(-1)))
            attention = torch.cat([attention, (~done).long()[:, None].to(attention.dtype)], 1)
            done = done | torch.isin(token, eos)
            if bool(done.all()):
                break
            position = position + 1
            step = {"input_ids": token[:, None], "attention_mask": attention}
            out = self.model(**step, past_key_values=past, use_cache=True, position_ids=position)
            past, logits = out.past_key_values, out.logits[:, -1]
        tokens_t = torch.stack(tokens, 1)
        return {"tokens": tokens_t, "logprobs": torch.stack(logprobs, 1).float(),
                "completion_mask": self.completion_mask(tokens_t)}

    def loss_options(self) -> dict[str, Any]:
        # dr_grpo normalises by the configured completion length (TRL), not the padded width
        return {"max_completion_length": self.options.max_completion_length}


# -------------------------------------------------------------------------------------------------
# The family


class PromptPolicyFamily(ModelFamily):
    name = "prompt_policy"
    component_choices = ("policy",)
    component_groups = {"policy": ("policy",)}
    default_component = "policy"
    default_lora_targets = {"policy": ["all-linear"]}
    modes = ("t2i", "i2i")
    max_control_images = 1
    methods = ("grpo",)
    options = PromptPolicyOptions
    #: `model.generator` is read by this family (config.py refuses it for the others).
    has_generator = True
    ignored_keys = {"lora.save_format": "the adapter is saved in the peft layout (adapter_model.safetensors)",
                    "model.train_text_encoder": "the policy is the trained model; the generator stays frozen"}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        gen, opts = cfg.model.generator, cfg.family_options
        if gen is None:
            raise ConfigError("model.generator: prompt_policy needs the frozen image generator: set "
                              "model.generator.family (a project family or diffusers) and "
                              "model.generator.pretrained_model_name_or_path.")
        allowed = [n for n in family_names() if n != cls.name] + ["diffusers"]
        if gen.family not in allowed:
            import difflib

            close = difflib.get_close_matches(gen.family, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.generator.family: {gen.family!r} is not a generator.{hint} Use one of {allowed}.")
        if opts.train_type == "full" and cfg.lora.enabled:
            raise ConfigError("prompt_policy.train_type: full trains every weight; set lora.enabled: false too "
                              "(or train_type: lora).")
        if opts.train_type != "full" and not cfg.lora.enabled:
            raise ConfigError(f"prompt_policy.train_type: {opts.train_type} trains a LoRA adapter but lora.enabled is "
                              "false; set lora.enabled: true, or train_type: full.")

    # -- loading -----------------------------------------------------------------------------------

    def load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

        opts, path = self.cfg.family_options, self.model_path
        try:
            config = AutoConfig.from_pretrained(path, revision=self.cfg.model.revision)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.pretrained_model_name_or_path: cannot load the policy {path} "
                              f"({type(error).__name__}: {error}); give a transformers model folder or hub id "
                              "(e.g. Qwen/Qwen2.5-1.5B-Instruct) or tiny:prompt_policy_lm.") from None
        self.is_vl = getattr(config, "vision_config", None) is not None
        if self.cfg.training.mode == "i2i" and not self.is_vl:
            raise ConfigError(f"training.mode: i2i: the policy {path} is a text-only model and cannot see the source "
                              "image; use a vision-language policy (e.g. Qwen/Qwen2.5-VL-3B-Instruct).")
        kwargs: dict[str, Any] = {"revision": self.cfg.model.revision, "dtype": self.weight_dtype}
        if opts.train_type == "qlora":
            kwargs.update(self.quantization_kwargs())
        if self.is_vl:
            from transformers import AutoModelForImageTextToText

            self.processor = AutoProcessor.from_pretrained(path, revision=self.cfg.model.revision)
            self.tokenizer = self.processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=self.cfg.model.revision)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.chat_template is None and opts.chat_template is None:
            raise ConfigError(f"prompt_policy.chat_template: the tokenizer of {path} has no chat template; set one "
                              "(a Jinja template) or use an instruct model.")
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = int(self.tokenizer.pad_token_id)
        if opts.train_type == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, self.cfg.model.gradient_checkpointing)
        else:
            model.to(self.device)
        model.eval()
        self.modules = {"policy": model}
        self.generator = FrozenGenerator(self.cfg, self.device)
        self.stats = {"rollouts": 0, "completions": 0, "fallbacks": 0, "completion_tokens": 0}
        self.unreported = dict.fromkeys(self.stats, 0)  # this rank's counts since the last on_scored
        self.last_scores: dict[str, float] = {}
        self.completion_rows: list[dict] = []

    def quantization_kwargs(self) -> dict[str, Any]:
        """qlora: the 4-bit NF4 base of QLoRA (bitsandbytes, CUDA only)."""
        import importlib.util

        if not torch.cuda.is_available():
            raise ConfigError("prompt_policy.train_type: qlora loads the base in 4 bits with bitsandbytes, which "
                              "needs a CUDA GPU; use train_type: lora on this machine.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("prompt_policy.train_type: qlora needs bitsandbytes: pip install "
                              "'glm_training[qlora]' (or pip install bitsandbytes), or use train_type: lora.")
        from transformers import BitsAndBytesConfig

        compute = self.weight_dtype if self.weight_dtype != torch.float32 else torch.bfloat16
        return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=compute),
                "device_map": {"": self.device}}

    def lora_targets(self, component: str) -> list[str]:
        targets = super().lora_targets(component)
        if list(targets) == ["all-linear"]:
            return all_linear_targets(self.unwrapped("policy"))
        return targets

    def enable_gradient_checkpointing(self, module: nn.Module) -> None:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(module, "enable_input_require_grads"):
            module.enable_input_require_grads()  # LoRA on a frozen base: checkpointed blocks need a grad input

    def make_parts(self) -> list[Any]:
        return [PolicyPart(self, "policy")]

    # -- rollouts and evaluation -------------------------------------------------------------------

    def render(self, batch: dict[str, Any], group: int, completions: torch.Tensor, seed: int, step: int,
               prompts: list[str]) -> Generation:
        opts = self.cfg.family_options
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewrites, metadata = [], []
        for prompt, text in zip(prompts, texts):
            rewrite, fallback = extract_rewrite(text, prompt, opts.rewrite_tag, opts.max_rewrite_chars)
            rewrites.append(rewrite)
            metadata.append({"rewrite": rewrite, "completion": text, "fallback": fallback})
        # one noise seed per group: members differ by their rewrite only
        seeds = [seeded_int(seed, step, index, SALT_GENERATOR_NOISE) for index in batch["index"] for _ in range(group)]
        controls = None
        if batch.get("control_pixel_values") is not None:
            controls = _to_pil(batch["control_pixel_values"][0].repeat_interleave(group, dim=0))
        images = self.generator.render(rewrites, seeds, controls)
        return Generation(images, {}, metadata)

    def rollout(self, batch: dict[str, Any], group: int, seed: int, step: int) -> Generation:
        (part,) = self.parts()
        draw = int(torch.randint(0, 2**31 - 1, (1,), generator=sample_generator(
            seed, step, int(batch["index"][0]) * group, SALT_ROLLOUT)))
        record = part.rollout(batch, group, draw)
        generation = self.render(batch, group, record.tokens, seed, step, record.prompts)
        generation.records = {part.name: record}
        counts = {"rollouts": 1, "completions": len(record.prompts),
                  "fallbacks": sum(m["fallback"] for m in generation.metadata),
                  "completion_tokens": int(record.outputs["completion_mask"].sum())}
        for key, value in counts.items():
            self.unreported[key] += value
        return generation

    @torch.no_grad()
    def eval_images(self, batch: dict[str, Any], records: list, seed: int, steps: int,
                    guidance_scale: float) -> Generation:
        """Greedy rewrites of the eval prompts rendered with fixed noise (the generator's own
        steps and guidance: `model.generator.*`)."""
        (part,) = self.parts()
        prompts = list(batch["prompt"])
        controls = batch.get("control_pixel_values")
        out = part.sample_tokens(prompts, seed=seed, temperature=self.cfg.grpo.temperature,
                                 controls=[c.to(self.device) for c in controls] if controls is not None else None,
                                 greedy=True)
        batch = dict(batch, index=[seed + i for i in range(len(prompts))])
        return self.render(batch, 1, out["tokens"], seed, 0, prompts)

    def rewrite(self, prompts: list[str], controls: list[torch.Tensor] | None = None) -> list[str]:
        """Greedy rewrites of `prompts` with the current policy (inference)."""
        (part,) = self.parts()
        out = part.sample_tokens(list(prompts), seed=0, controls=controls, greedy=True)
        texts = self.tokenizer.batch_decode(out["tokens"], skip_special_tokens=True)
        opts = self.cfg.family_options
        return [extract_rewrite(t, p, opts.rewrite_tag, opts.max_rewrite_chars)[0] for t, p in zip(texts, prompts)]

    # -- logging ------------------------------------------------------------------------------------

    def on_scored(self, generation: Generation, totals: dict[str, torch.Tensor],
                  per_reward: dict[str, torch.Tensor], step: int) -> None:
        """After scoring (dynamic_sample included): the statistics of `training_stats.json` and,
        with `prompt_policy.log_completions`, one row per member (prompt -> rewrite -> reward)."""
        import torch.distributed as dist

        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # Every rank calls this after each rollout: the counters are of all processes' rollouts
        # (the same on every rank) and the completion rows of all members go to one file.
        counts = torch.tensor([self.unreported[k] for k in self.stats], dtype=torch.float64, device=self.device)
        if several:
            dist.all_reduce(counts)
        for key, value in zip(self.stats, counts.tolist()):
            self.stats[key] += int(value)
        self.unreported = dict.fromkeys(self.stats, 0)
        total = totals["policy"].float()
        self.last_scores = {"step": step + 1, "reward_mean": float(total.mean()),
                            "reward_std": float(total.std(unbiased=False)),
                            **{f"{n}_mean": float(v.float().mean()) for n, v in per_reward.items()}}
        if not self.cfg.family_options.log_completions:
            return
        prompts = generation.records["policy"].prompts
        rows = [{"step": step + 1, "prompt": prompt, "completion": meta["completion"], "rewrite": meta["rewrite"],
                 "fallback": meta["fallback"], "reward": float(total[i]),
                 "rewards": {n: float(v[i]) for n, v in per_reward.items()}}
                for i, (prompt, meta) in enumerate(zip(prompts, generation.metadata))]
        if several:
            from accelerate.utils import gather_object

            rows = gather_object(rows)  # rank order: the members of rank 0, then rank 1, ...
            if dist.get_rank() != 0:
                rows = []
        self.completion_rows.extend(rows)

    def rollout_captions(self, generation: Generation) -> list[str] | None:
        """Rollout grids: the rewrite under each image (its rewards follow)."""
        return [f"-> {meta['rewrite']}" for meta in generation.metadata]

    def flush_completions(self, run_dir: Path) -> None:
        if not self.completion_rows:
            return
        with open(run_dir / COMPLETIONS_FILE, "a", encoding="utf-8") as handle:
            for row in self.completion_rows:
                handle.write(json.dumps(row) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard" / "completions"))
            table = "| step | prompt | rewrite | reward |\n|---|---|---|---|\n" + "\n".join(
                f"| {r['step']} | {r['prompt']} | {r['rewrite']} | {r['reward']:.3f} |" for r in self.completion_rows)
            writer.add_text("completions", table, self.completion_rows[-1]["step"])
            writer.close()
        except ImportError:
            pass
        if "wandb" in self.cfg.logging.report_to:
            try:
                import wandb
            except ImportError:
                wandb = None  # the trainer already warned that wandb is missing
            if wandb is not None and wandb.run is not None:
                columns = ["step", "prompt", "completion", "rewrite", "fallback", "reward"]
                wandb.run.log({"completions": wandb.Table(columns=columns, data=[
                    [r[c] for c in columns] for r in self.completion_rows])})
        self.completion_rows = []

    def training_stats(self) -> dict[str, Any]:
        stats = dict(self.stats)
        count = max(stats["completions"], 1)
        stats["fallback_fraction"] = stats["fallbacks"] / count
        stats["mean_completion_tokens"] = stats["completion_tokens"] / count
        stats["last_rollout"] = self.last_scores
        return stats

    # -- saving ---------------------------------------------------------------------------------------

    def save_adapter(self, out_dir: Path) -> list[Path]:
        """peft layout (`adapter_config.json` + `adapter_model.safetensors`, loadable with
        `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`), or the
        full model (`from_pretrained(out_dir)`), with the tokenizer / processor and
        `training_stats.json`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.unwrapped("policy")
        if self.cfg.lora.enabled:
            configured = self.cfg.model.pretrained_model_name_or_path
            model.peft_config["default"].base_model_name_or_path = (
                self.model_path if configured.startswith("tiny:") else configured)
        model.save_pretrained(out_dir, safe_serialization=True)
        (self.processor or self.tokenizer).save_pretrained(out_dir)
        (out_dir / TRAINING_STATS_FILE).write_text(json.dumps(self.training_stats(), indent=2))
        if self.cfg.family_options.log_completions:  # checkpoint tmp folders and final/ sit in the run folder
            self.flush_completions(out_dir.parent)
        return sorted(p for p in out_dir.iterdir() if p.is_file())

    def load_run_state(self, folder: Path) -> None:
        """The counters of `training_stats.json` go on from the checkpoint's."""
        saved = Path(folder) / TRAINING_STATS_FILE
        if saved.is_file():
            stats = json.loads(saved.read_text())
            self.stats = {key: int(stats[key]) for key in self.stats}
            self.last_scores = stats.get("last_rollout", {})

    def load_adapter_weights(self, path: str) -> None:
        """`lora.pretrained_weight`: start from an adapter folder written by `save_adapter` (peft layout)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = Path(path) / "adapter_model.safetensors" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ConfigError(f"lora.pretrained_weight: {path} has no adapter_model.safetensors (peft layout).")
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(file)).items()}
        result = set_peft_model_state_dict(self.unwrapped("policy"), state)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"lora.pretrained_weight: {path} does not fit this policy / lora settings "
                              f"(unexpected keys, e.g. {result.unexpected_keys[:3]}).")
