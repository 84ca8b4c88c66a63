"""BAGEL as a model family: SFT with `text_loss_weight * CE + image_loss_weight * MSE` on packed
sequences, LoRA on the selected experts (und / gen / both) or full fine-tuning of them."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm_training.config import ConfigError, option_field
from glm_training.models.base import ModelFamily, quantize_linears
from glm_training.parts import Denoiser
from glm_training.parts.denoiser import preference_from_errors
from glm_training.models.bagel.data import record_plan
from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer, save_bagel
from glm_training.models.bagel.lora import load_lora, lora_target_modules, save_lora
from glm_training.models.bagel.model import token_weights
from glm_training.models.bagel.packing import (
    BagelSample,
    PackingConfig,
    TextItem,
    VaeImageItem,
    VitImageItem,
    pack_samples,
)


@dataclass
class BagelOptions:
    """The `bagel:` config section (model.family: bagel)."""

    text_loss_weight: float = option_field(1.0, min=0, doc="SFT: weight of the text cross-entropy "
                                           "(understanding answers).")
    image_loss_weight: float = option_field(1.0, min=0, doc="SFT: weight of the image flow MSE (generation).")


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
    quantizable = ("bagel",)
    default_lora_targets: dict[str, list[str]] = {}
    modes = ("t2i", "i2i")
    max_control_images = 1  # BAGEL edits one source image per prompt
    methods = ("sft", "dpo", "grpo", "nft")  # nft: DiffusionNFT on the generation side (BagelPart)
    options = BagelOptions
    renamed_keys = {"training.text_loss_weight": "bagel.text_loss_weight",
                    "training.image_loss_weight": "bagel.image_loss_weight"}
    ignored_keys = {
        "data.center_crop": "images are resized to the packing sizes, not cropped",
        "data.random_flip": "its packing does not flip images",
        "data.control_dropout": "its packing drops the source image's ViT/VAE tokens itself (0.3, the official recipe)",
        "training.noise_offset": "its flow timesteps and noise are drawn by the packing",
        "training.weighting_scheme": "its timesteps follow the official shifted schedule",
        "training.logit_mean": "its timesteps follow the official shifted schedule",
        "training.logit_std": "its timesteps follow the official shifted schedule",
        "training.mode_scale": "its timesteps follow the official shifted schedule",
        "lora.save_format": "its adapters are saved as a peft folder (adapter_model.safetensors)",
        "cache.enabled": "its packed sequences are built per step, there is nothing to cache",
    }

    def load(self) -> None:
        method = self.cfg.training.method
        if method in ("grpo", "nft") and self.component_group != "gen":
            raise ConfigError(
                f"training.method: {method} with model.family: bagel trains the generation expert only; set "
                f"model.component: gen (got {self.component_group!r}). The rollout contexts (prompt and source "
                "image) are prefilled once without gradients, which is exact only when the understanding "
                "expert is not trained.")
        self.model = load_bagel(self.model_path, dtype=self.weight_dtype, device=self.device)
        if self.quantize_plan(self.cfg).get("bagel"):  # its own checkpoint format: torchao on the loaded Linears
            quantize_linears(self.model, self.quantize_plan(self.cfg)["bagel"], "model.quantize.bagel",
                             skip=("vae.",))
        self.tokenizer, self.special = load_bagel_tokenizer(self.model_path)
        self.modules = {"bagel": self.model}
        self.objective = flow_sampling_objective()

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
        # data.caption_dropout is the prompt (text CFG) dropout, as for every family.
        return PackingConfig.for_model(self.model.bagel_config, vae_max_size=size, vae_min_size=min(512, size),
                                       vit_max_size=min(980, size), vit_min_size=min(378, size),
                                       text_cond_dropout=self.cfg.data.caption_dropout)

    # -- the token + flow side used by the SFT trainer ---------------------------------------------

    def make_parts(self) -> list[Any]:
        return [BagelPart(self, "bagel")]

    def dataset(self, records: list, layout: str) -> torch.utils.data.Dataset:
        """Packed sequences: a conversation's plan, or a record's prompt -> target (with its source
        image for edits); pairs keep their records (`preference_errors` packs both sides)."""
        if layout == "images":
            return BagelSampleDataset([r.metadata.get("conversation") or record_plan(r) for r in records])
        if layout == "pairs":
            return BagelSampleDataset(records)
        return super().dataset(records, layout)

    def pack(self, batch: dict[str, Any], seed: int) -> Any:
        """The micro-batch's one pack; `seed` fixes its CFG dropout (and, in `sft_loss`, timesteps, noise)."""
        return pack_samples(batch["sample"], self.tokenizer, self.special, self.model.bagel_config,
                            self.packing(), rng=random.Random(seed))

    def sft_window(self, batches: list[dict[str, Any]], seeds: list[int]) -> None:
        """An accumulation window starts: its packs are built now and their loss tokens counted
        over every process, so that `sft_loss` divides by the tokens of the whole optimizer step
        (`token_weights`) rather than by each micro-batch's own."""
        packs = [self.pack(batch, seed) for batch, seed in zip(batches, seeds)]
        weights = token_weights(sum(p.n_text_tokens for p in packs), sum(p.n_image_tokens for p in packs), len(packs))
        self._window = {"packs": dict(zip(seeds, packs)), "weights": weights}

    def sft_loss(self, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Text CE and image flow MSE, each per loss token: of the accumulation window begun by
        `sft_window` (this micro-batch's share of it), else (evaluation) of this micro-batch."""
        window = getattr(self, "_window", None)
        packed = window["packs"].pop(seed, None) if window else None
        options = self.cfg.family_options or BagelOptions()
        out = self.modules["bagel"](packed or self.pack(batch, seed), generator=torch.Generator().manual_seed(seed))
        text_weight, image_weight = window["weights"] if packed is not None else (
            1.0 / max(int(out["n_text_tokens"]), 1), 1.0 / max(int(out["n_image_tokens"]), 1))
        text = out["text_token_ce"].sum() * text_weight
        image = out["image_mse_per_sample"].sum() * image_weight
        loss = options.text_loss_weight * text + options.image_loss_weight * image
        return loss, {"loss": loss.item(), "text_ce": out["text_ce"].item(),
                      "image_mse": out["image_mse"].item()}

    # -- the flow side on preference pairs, used by the DPO trainer -------------------------------

    def preference_errors(self, batch: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample flow MSE (mean over each image's generation tokens) of [chosen; rejected], for
        the policy (with grad) and the reference (adapter disabled, no grad). Winner and loser of a
        pair share the prompt dropout, the timestep (same packing draws) and the noise."""
        pairs = batch["sample"]
        packs = [pack_samples([generation_sample(p.prompt, getattr(p, side), p.controls) for p in pairs],
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

    @torch.no_grad()
    def answer(self, prompts: list, images: list | None = None, max_new_tokens: int = 64) -> list[str]:
        """Greedy text answers of the understanding expert (fixed: no sampling, reproducible). Each
        prompt is a question (str; `images`, if given, go through the ViT before every one), or a
        conversation context (a list of sequence items: the turns before the answer). Images are
        sized as in training (`packing()`: data.resolution), so evaluation sees what was trained."""
        from glm_training.models.bagel.generate import BagelSampler

        sampler = BagelSampler(self.unwrapped("bagel"), self.tokenizer, self.special, packing=self.packing())
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append(sampler.generate_text(prompt, list(images or []), max_new_tokens=max_new_tokens))
            else:
                out.append(sampler.answer_context(list(prompt), max_new_tokens=max_new_tokens))
        return out

    # -- the diffusion-side interface of the shared sampler, used by the GRPO trainer -------------
    #
    # Latents are BAGEL's latent tokens, (N, patch_latent_dim) per image, at time t = sigma in
    # [1 -> 0] with x_t = (1 - t) clean + t noise and velocity v = noise - clean: the convention of
    # the flow families, so `parts.sampler.DiffusionSampler` (Euler ODE / Flow-GRPO SDE) runs on
    # it unchanged. `objective` carries the official sampling shift, so its schedule with S steps is
    # `BagelSampler.timesteps(S + 1, SAMPLING_TIMESTEP_SHIFT)`. A condition holds one prefilled
    # context set per prompt (the three guidance contexts) and the guidance settings; `predict`
    # returns BAGEL's own guided velocity (text CFG inside its interval, image CFG and renorm for
    # edits), so the trainer's sampler runs with guidance 1 and no uncondition.

    _in_reference = False

    @contextlib.contextmanager
    def reference(self):
        """As the base class; `predict` also knows it runs the reference (edit contexts are rebuilt)."""
        saved, self._in_reference = self._in_reference, True
        try:
            with super().reference():
                yield
        finally:
            self._in_reference = saved

    def generation_sampler(self):
        """A BagelSampler on the current network (looked up per call: `reference()` may swap it),
        with the training image sizes."""
        from glm_training.models.bagel.generate import BagelSampler

        model = self.modules["bagel"]
        while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module  # DDP / accelerate wrappers
        return BagelSampler(model, self.tokenizer, self.special, packing=self.packing())

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        config = self.model.bagel_config
        down = config.latent_downsample
        if height % down or width % down:
            raise ConfigError(f"data.resolution: BAGEL image sides must be multiples of {down}; got {height}x{width}.")
        return ((height // down) * (width // down), config.patch_latent_dim)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, D) square latent-token grids -> images (B, 3, H, W) in [-1, 1] (as `BagelSampler.decode`)."""
        model = self.generation_sampler().model
        side = int(round(latents.shape[1] ** 0.5))
        if side * side != latents.shape[1]:
            raise ValueError(f"decode_latents: {latents.shape[1]} latent tokens are not a square grid.")
        images = [model.vae.decode(model.unpatchify_latent(tokens, side, side)[None])[0] for tokens in latents]
        return torch.stack(images).float().clamp(-1, 1)

    def rollout_conditions(self, batch: dict[str, Any], repeats: int, resolution: int, guidance_scale: float
                           ) -> tuple[dict[str, Any], None]:
        """Sampling conditions for every prompt of a PromptDataset batch, repeated `repeats` times
        (prompt-major): text-to-image, or an edit of the prompt's source image. The contexts are
        prefilled once per prompt without gradients; `guidance_scale` is BAGEL's cfg_text_scale,
        the other guidance settings the official ones of the task. No uncondition: the guidance is
        inside `predict`."""
        from glm_training.models.bagel.generate import official_guidance

        controls = batch.get("control_pixel_values")
        if controls is not None and len(controls) > 1:
            raise ConfigError(f"BAGEL edits one source image per prompt; the data gives {len(controls)}.")
        sources = [controls[0][i] for i in range(len(batch["prompt"]))] if controls is not None else \
            [None] * len(batch["prompt"])
        inputs = list(zip(batch["prompt"], sources))
        # The source's VAE posterior sample is seeded per prompt: every rebuild of its context is the same.
        seeds = [self.cfg.training.seed * 1_000_003 + int(index) for index in batch["index"]]
        condition = {"inputs": inputs, "seeds": seeds, "members": [i for i in range(len(inputs)) for _ in range(repeats)],
                     "size": (resolution, resolution), "cfg_text_scale": float(guidance_scale),
                     **official_guidance(controls is not None)}
        with torch.no_grad():
            condition["contexts"] = self._prefill(condition)
        return condition, None

    def _prefill(self, condition: dict[str, Any]) -> list:
        sampler, (height, width) = self.generation_sampler(), condition["size"]
        device = sampler.model.device
        return [sampler.prepare(prompt, None if source is None else source.to(device), height=height, width=width,
                                generator=torch.Generator(device=device).manual_seed(seed))
                for (prompt, source), seed in zip(condition["inputs"], condition["seeds"])]

    def _contexts(self, condition: dict[str, Any]) -> list:
        """The prefilled contexts, or, for edits under gradients or in the reference, fresh ones:
        the source image's clean latents go through the generation expert, so its context depends
        on the trained weights (text contexts use the understanding expert only and are reused)."""
        edits = any(source is not None for _, source in condition["inputs"])
        if edits and (torch.is_grad_enabled() or self._in_reference):
            return self._prefill(condition)
        return condition["contexts"]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: dict[str, Any]
                ) -> torch.Tensor:
        """BAGEL's guided velocity for each member (its prompt's contexts), (B, N, D) float32."""
        sampler, contexts = self.generation_sampler(), self._contexts(condition)
        guidance = {key: condition[key] for key in ("cfg_text_scale", "cfg_img_scale", "cfg_interval",
                                                    "cfg_renorm_min", "cfg_renorm_type")}
        return torch.stack([sampler.interval_velocity(contexts[member], x, float(t), **guidance)
                            for member, x, t in zip(condition["members"], noisy_latents, timesteps)])

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


def flow_sampling_objective():
    """Flow matching with BAGEL's official sampling shift (what the shared sampler's schedule uses)."""
    from glm_training.algorithms.objectives import FlowMatchingObjective, FlowShift
    from glm_training.models.bagel.generate import SAMPLING_TIMESTEP_SHIFT

    return FlowMatchingObjective(FlowShift(shift=SAMPLING_TIMESTEP_SHIFT))


class BagelPart(Denoiser):
    """BAGEL's generation side as a denoiser: SFT and DPO on its own packed sequences (text CE +
    image flow MSE; per-sample flow errors of [chosen; rejected]), and the shared sampler's
    rollouts on its latent tokens with conditions prefilled by the understanding expert. The seed
    of a micro-batch (prompt dropout, timesteps, noise) depends on the data position only."""

    sft_needs = frozenset({"conversation"})
    caption_dropout = 0.0  # BAGEL's packing drops prompts itself (data.caption_dropout)
    rollout_bypasses_wrapper = True  # BagelSampler runs the unwrapped model's own methods

    def prepare(self, records: list, caption_dropout: float | None = None, use_cache: bool = True) -> None:
        self.records = records  # no encoder: the packing encodes each step

    def batch_seed(self, batch: dict[str, Any], epoch: int) -> int:
        return self.cfg.training.seed * 1_000_003 + epoch * 10_007 + int(batch["index"][0])

    def sft_loss(self, batch, ctx):
        return self.family.sft_loss(batch, self.batch_seed(batch, ctx.epoch))

    def sft_window(self, batches: list[dict[str, Any]], epochs: list[int]) -> None:
        self.family.sft_window(batches, [self.batch_seed(b, e) for b, e in zip(batches, epochs)])

    def preference_loss(self, batch, ctx, pairs, beta):
        errors, ref_errors = self.family.preference_errors(batch, self.batch_seed(batch, ctx.epoch))
        return preference_from_errors(errors, ref_errors, beta, self.cfg.dpo)

    def cached_prompt_embeds(self, prompts: list[str]) -> dict[str, Any]:
        return {}

    def generation_conditions(self, batch, repeats, guidance_scale, records=None, inputs=None):
        return self.family.rollout_conditions(batch, repeats, self.cfg.data.resolution, guidance_scale)
