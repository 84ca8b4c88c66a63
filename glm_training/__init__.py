"""glm_training: YAML-driven SFT, DPO and GRPO for GLM-Image, SDXL, FLUX.1 Kontext, Qwen-Image and BAGEL."""

__version__ = "0.1.0"
