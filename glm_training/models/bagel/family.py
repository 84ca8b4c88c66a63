"""BAGEL as a model family: SFT with `text_loss_weight * CE + image_loss_weight * MSE` on packed
sequences, LoRA on the selected experts (und / gen / both) or full fine-tuning of them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from glm_training.config import ConfigError
from glm_training.models.base import ModelFamily
from glm_training.models.bagel.data import load_bagel_samples
from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer, save_bagel
from glm_training.models.bagel.lora import load_lora, lora_target_modules, save_lora
from glm_training.models.bagel.model import global_token_mean
from glm_training.models.bagel.packing import (
    BagelSample,
    PackingConfig,
    TextItem,
    VaeImageItem,
    VitImageItem,
    pack_samples,
)


class BagelSampleDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "sample": self.samples[index]}


class BagelFamily(ModelFamily):
    name = "bagel"
    component_choices = ("bagel",)
    # The experts are parameter subsets of one network: every group trains the module "bagel".
    component_groups = {"und": ("bagel",), "gen": ("bagel",), "both": ("bagel",)}
    default_component = "both"
    default_lora_targets: dict[str, list[str]] = {}

    def load(self) -> None:
        self.model = load_bagel(self.model_path, dtype=self.weight_dtype, device=self.device)
        self.tokenizer, self.special = load_bagel_tokenizer(self.model_path)
        self.modules = {"bagel": self.model}

    def lora_targets(self, component: str) -> Any:
        return self.cfg.lora.target_modules or lora_target_modules(self.component_group)

    def setup_training(self) -> None:
        if self.cfg.lora.enabled:
            super().setup_training()
            return
        # Full fine-tuning of the selected experts only: the VAE and position tables stay frozen.
        self.model.requires_grad_(False)
        self.model.float()
        self.model.set_trainable(self.component_group)
        self.model.train()
        if self.cfg.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    def packing(self) -> PackingConfig:
        size = self.cfg.data.resolution
        return PackingConfig.for_model(self.model.bagel_config, vae_max_size=size, vae_min_size=min(512, size),
                                       vit_max_size=min(980, size), vit_min_size=min(378, size))

    # -- the token + flow side used by the SFT trainer ---------------------------------------------

    def build_sft_dataset(self) -> BagelSampleDataset:
        try:
            return BagelSampleDataset(load_bagel_samples(self.cfg.data.path))
        except FileNotFoundError as error:
            raise ConfigError(f"data.path: {error}") from None

    def sft_loss(self, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One pack per micro-batch; `seed` fixes the CFG dropout, timesteps and noise of the pack."""
        packed = pack_samples(batch["sample"], self.tokenizer, self.special, self.model.bagel_config,
                              self.packing(), rng=random.Random(seed))
        training = self.cfg.training
        out = self.modules["bagel"](packed, generator=torch.Generator().manual_seed(seed))
        # Per-token means over the tokens of every process (logged values stay per process).
        text = global_token_mean(out["text_token_ce"].sum(), int(out["n_text_tokens"]))
        image = global_token_mean(out["image_mse_per_sample"].sum(), int(out["n_image_tokens"]))
        loss = training.text_loss_weight * text + training.image_loss_weight * image
        return loss, {"loss": loss.item(), "text_ce": out["text_ce"].item(),
                      "image_mse": out["image_mse"].item()}

    # -- the flow side on preference pairs, used by the DPO trainer -------------------------------

    #: What DPO trains here: the family's own per-sample flow errors (`preference_errors`) on its
    #: own dataset (`build_preference_dataset`), not the diffusion-family latents path.
    preference_terms = ("errors",)

    def build_preference_dataset(self, pairs: list) -> BagelSampleDataset:
        return BagelSampleDataset(pairs)

    def preference_errors(self, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample flow MSE (mean over each image's generation tokens) of [chosen; rejected], for
        the policy (with grad) and the reference (adapter disabled, no grad). Winner and loser of a
        pair share the prompt dropout, the timestep (same packing draws) and the noise."""
        pairs = batch["sample"]
        packs = [pack_samples([generation_sample(p.prompt, getattr(p, side), p.control_images) for p in pairs],
                              self.tokenizer, self.special, self.model.bagel_config, self.packing(),
                              rng=random.Random(seed))
                 for side in ("chosen", "rejected")]
        if packs[0].vae_latent_shapes != packs[1].vae_latent_shapes:
            raise ValueError("DPO pairs need chosen and rejected images of the same size after resizing; "
                             f"got latent grids {packs[0].vae_latent_shapes} and {packs[1].vae_latent_shapes}.")
        config = self.model.bagel_config
        tokens = sum(h * w for h, w in packs[0].vae_latent_shapes)
        noise = torch.randn(tokens, config.latent_patch_size ** 2 * config.latent_channels,
                            generator=torch.Generator().manual_seed(seed))

        def errors() -> torch.Tensor:
            model = self.modules["bagel"]  # looked up here: reference() may swap in a frozen copy
            outs = [model(pack, generator=torch.Generator().manual_seed(seed), noise=noise) for pack in packs]
            return torch.cat([o["image_mse_per_sample"] / o["image_tokens_per_sample"].clamp(min=1) for o in outs])

        policy = errors()
        with torch.no_grad(), self.reference():
            reference = errors()
        return policy, reference

    @torch.no_grad()
    def sample(self, prompts: list[str], *, height: int, width: int, num_inference_steps: int,
               guidance_scale: float, seed: int, control_images: list | None = None, **_: Any) -> list:
        """Text-to-image, or edits of `control_images`, with the official inferencer's CFG."""
        from glm_training.models.bagel.generate import BagelSampler

        sampler = BagelSampler(self.unwrapped("bagel"), self.tokenizer, self.special)
        sources = control_images or [None] * len(prompts)
        return [sampler.generate(prompt, source, height=height, width=width, num_timesteps=num_inference_steps,
                                 cfg_text_scale=guidance_scale, seed=seed + index)
                for index, (prompt, source) in enumerate(zip(prompts, sources))]

    # -- saving ------------------------------------------------------------------------------------

    def save_adapter(self, out_dir: Path) -> list[Path]:
        model = self.unwrapped("bagel")
        if self.cfg.lora.enabled:
            return save_lora(model, out_dir)
        return [save_bagel(model, out_dir, tokenizer=self.tokenizer)]

    def load_adapter_weights(self, path: str) -> None:
        load_lora(self.unwrapped("bagel"), path)


def generation_sample(prompt: str, image: Any, control_images: list | None = None) -> BagelSample:
    """Text-to-image (or, with control images, an edit as the official data has it) with `image`
    as the generation target."""
    items: list = []
    for control in control_images or []:
        items += [VaeImageItem(control, loss=False, cfg=True), VitImageItem(control, cfg=True)]
    return BagelSample([*items, TextItem(prompt, loss=False, cfg=True), VaeImageItem(image, loss=True)])
