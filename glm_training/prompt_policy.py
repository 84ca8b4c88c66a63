"""Put a trained prompt rewriter in front of any image pipeline.

    from diffusers import StableDiffusion3Pipeline
    from glm_training.prompt_policy import rewrite

    better = rewrite(["a cat"], "output/glm_training/v0/final")   # the run's final/ (or a checkpoint-N/)
    image = StableDiffusion3Pipeline.from_pretrained(...)(prompt=better).images[0]

`adapter_dir` is what prompt-policy GRPO saved: a peft adapter (adapter_config.json +
adapter_model.safetensors, loaded onto its base model with `PeftModel.from_pretrained`) or a full
model folder (train_type: full). The chat (system instruction, template, tag, limits) is the
run's own, read from its config.yaml next to the folder; rewrites are greedy (deterministic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_rewriter(adapter_dir: str | Path, base_model: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer or processor) of a saved policy: peft adapter on its base, or a full model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    adapter = adapter_dir / "adapter_config.json"
    if adapter.is_file():
        import json

        from peft import PeftModel

        base = base_model or json.loads(adapter.read_text())["base_model_name_or_path"]
    elif (adapter_dir / "config.json").is_file():
        base = str(adapter_dir)
    else:
        raise FileNotFoundError(f"{adapter_dir}: neither a peft adapter (adapter_config.json) nor a model folder "
                                "(config.json); pass the run's final/ or a checkpoint-N/ folder.")
    vl = getattr(AutoConfig.from_pretrained(base), "vision_config", None) is not None
    model = (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_pretrained(base)
    if adapter.is_file():
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    text = (AutoProcessor if vl else AutoTokenizer).from_pretrained(str(adapter_dir))
    return model.to(device).eval(), text


def _run_options(adapter_dir: Path) -> Any:
    """The `prompt_policy:` section of the run that wrote `adapter_dir` (defaults without one)."""
    import yaml

    from glm_training.config import _build_dataclass
    from glm_training.models.prompt_policy import PromptPolicyOptions

    config = adapter_dir.parent / "config.yaml"
    section = (yaml.safe_load(config.read_text()) or {}).get("prompt_policy") if config.is_file() else None
    return _build_dataclass(PromptPolicyOptions, section or {}, "prompt_policy")


@torch.no_grad()
def rewrite(prompts: list[str], adapter_dir: str | Path, base_model: str | None = None, device: str = "cpu",
            images: list | None = None) -> list[str]:
    """Greedy rewrites of `prompts` by the policy saved in `adapter_dir` (a VL policy also sees
    `images`, one PIL image per prompt); empty / over-long rewrites give the prompt back."""
    from glm_training.models.prompt_policy import extract_rewrite

    adapter_dir = Path(adapter_dir)
    opts = _run_options(adapter_dir)
    model, text = load_rewriter(adapter_dir, base_model, device)
    tokenizer = getattr(text, "tokenizer", text)
    tokenizer.padding_side = "left"
    chats = []
    for prompt in prompts:
        messages = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
        content: Any = prompt if images is None else [{"type": "image"}, {"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        chats.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                   chat_template=opts.chat_template))
    kwargs = {"images": images} if images is not None else {}
    inputs = text(text=chats, return_tensors="pt", padding=True, add_special_tokens=False, **kwargs).to(device)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=opts.max_completion_length,
                         pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [extract_rewrite(c, p, opts.rewrite_tag, opts.max_rewrite_chars)[0] for c, p in zip(completions, prompts)]
