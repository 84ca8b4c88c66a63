"""The token-policy kind: token CE (SFT), token DPO and token GRPO, written once on two hooks a
family provides (`models.base.TokenPolicyHooks`):

- `token_logprobs(prompts, tokens=..., target_pixels=..., controls=..., temperature=...)`: the
  teacher-forced per-token log-probs (B, N) of the given tokens (or of the target images' own
  tokens), with gradients, under the distribution at `temperature`;
- `sample_tokens(prompts, seed=..., temperature=..., controls=...)`: sampled tokens (B, N) with
  the per-token log-probs of the distribution they were drawn from, plus whatever a downstream
  part needs (e.g. GLM-Image's prior tokens for the DiT).
TRL semantics for GRPO: on the first inner iteration the old log-probs are the recomputed ones,
detached (ratio exactly 1); they are kept for later `num_iterations`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from glm_training.algorithms.dpo import token_dpo_loss
from glm_training.algorithms.grpo import token_grpo_loss
from glm_training.data.datasets import Record
from glm_training.parts.common import Part, StepContext, drop_captions

#: Token-DPO beta when neither dpo.beta nor dpo.token_beta gives one (TRL's default).
TOKEN_DPO_BETA = 0.1


@dataclass
class TokenRollout:
    """A micro-batch of sampled token sequences, reusable across `grpo.num_iterations`."""

    prompts: list[str]  # (B*G,) the prompt of each member
    tokens: torch.Tensor  # (B*G, N)
    gen_logprobs: torch.Tensor  # (B*G, N) at sampling time
    controls: list[torch.Tensor] | None = None  # control pixels repeated per member (image-to-image)
    old_logprobs: torch.Tensor | None = None  # recomputed on the first iteration
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # for other parts (prior tokens, ...)

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{prefix}.tokens": self.tokens, f"{prefix}.gen_logprobs": self.gen_logprobs}
        if self.old_logprobs is not None:
            tensors[f"{prefix}.old_logprobs"] = self.old_logprobs
        for k, group in enumerate(self.controls or []):
            tensors[f"{prefix}.control{k}"] = group
        tensors.update({f"{prefix}.outputs.{k}": v for k, v in self.outputs.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return tensors, {"prompts": self.prompts, "controls": len(self.controls or []), "outputs": sorted(self.outputs)}

    def replace_members(self, members: list[int], other: "TokenRollout") -> None:
        """Members `members` taken from `other` (a rollout of the same prompts' groups, in order)."""
        index = torch.tensor(members, device=self.tokens.device)
        self.tokens[index] = other.tokens.to(self.tokens.device)
        self.gen_logprobs[index] = other.gen_logprobs.to(self.gen_logprobs.device)
        for key, value in self.outputs.items():
            value[index.to(value.device)] = other.outputs[key].to(value.device)
        self.old_logprobs = None

    @classmethod
    def from_tensors(cls, handle: Any, prefix: str, meta: dict[str, Any], device: torch.device) -> "TokenRollout":
        keys = set(handle.keys())

        def get(name: str) -> torch.Tensor | None:
            key = f"{prefix}.{name}"
            return handle.get_tensor(key).to(device) if key in keys else None

        controls = [get(f"control{k}") for k in range(meta["controls"])] or None
        outputs = {k: get(f"outputs.{k}") for k in meta["outputs"]}
        return cls(meta["prompts"], get("tokens"), get("gen_logprobs"), controls, get("old_logprobs"), outputs)


class TokenPolicy(Part, ABC):
    """A token generator of a family; the family subclasses it with the two hooks."""

    kind = "tokens"
    sft_needs = frozenset({"prompt", "target"})
    preference_needs = frozenset({"prompt", "chosen", "rejected"})
    rollout_needs = frozenset({"prompt"})
    online_pairs = False  # online DPO pairs come from the diffusion sampler
    exact_preference = True  # log-probs of given tokens: nothing is drawn

    # -- hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def token_logprobs(self, prompts: list[str], *, tokens: torch.Tensor | None = None,
                       target_pixels: torch.Tensor | None = None, controls: list[torch.Tensor] | None = None,
                       temperature: float = 1.0) -> torch.Tensor:
        """(B, N) float32 per-token log-probs of `tokens` (or of the target images' own tokens)."""

    @abstractmethod
    def sample_tokens(self, prompts: list[str], *, seed: int, temperature: float = 1.0,
                      controls: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{"tokens": (B, N), "logprobs": (B, N) of the distribution sampled from, **outputs}."""

    def token_ce(self, prompts: list[str], target_pixels: torch.Tensor,
                 controls: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B,) mean next-token CE of the targets' tokens (a family may give a fused version)."""
        return -self.token_logprobs(prompts, target_pixels=target_pixels, controls=controls).mean(dim=1)

    # -- data ------------------------------------------------------------------------------------

    def prepare(self, records: list[Record], caption_dropout: float | None = None, use_cache: bool = True) -> None:
        self.records = records
        self.caption_dropout = self.cfg.data.caption_dropout if caption_dropout is None else caption_dropout

    def prompts_for(self, batch: dict[str, Any], epoch: int) -> list[str]:
        return drop_captions(batch, epoch, self.cfg.training.seed, self.caption_dropout)

    def cached_prompt_embeds(self, prompts: list[str]) -> dict[str, Any]:
        return {}  # a token policy reads the prompt text itself

    # -- SFT -------------------------------------------------------------------------------------

    def sft_loss(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.token_ce(self.prompts_for(batch, ctx.epoch), batch["pixel_values"],
                             batch.get("control_pixel_values")).mean()
        return loss, {"loss": loss.item()}

    def sft_eval_losses(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, None]:
        """Validation: the per-sample token CE (B,); nothing is drawn, so no timesteps."""
        losses = self.token_ce(self.prompts_for(batch, ctx.epoch), batch["pixel_values"],
                               batch.get("control_pixel_values"))
        return losses.detach().float().cpu(), None

    # -- token DPO -------------------------------------------------------------------------------

    def dpo_beta(self, dpo: Any, alone: bool) -> float:
        """Token log-prob margins are on another scale than denoising errors: `dpo.beta` is this
        part's beta only when it is trained alone; next to a denoiser it takes `dpo.token_beta`."""
        if dpo.beta and alone:
            return dpo.beta
        return dpo.token_beta or TOKEN_DPO_BETA

    def preference_loss(self, batch: dict[str, Any], ctx: StepContext, pairs: list[Record],
                        beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token DPO on the summed log-probs of the chosen and rejected images' own tokens, policy
        vs reference, one forward each over [chosen; rejected] (shared prompt and controls)."""
        dpo = self.cfg.dpo
        prompts = self.prompts_for(batch, ctx.epoch)
        count = len(prompts)
        pixels = torch.cat([batch["chosen_pixel_values"], batch["rejected_pixel_values"]])
        controls = batch.get("control_pixel_values")
        if controls is not None:
            controls = [torch.cat([group, group]) for group in controls]
        kwargs = {"target_pixels": pixels, "controls": controls}
        logprobs = self.token_logprobs(prompts + prompts, **kwargs)
        with torch.no_grad(), self.family.reference():
            ref_logprobs = self.token_logprobs(prompts + prompts, **kwargs)
        policy, reference = logprobs.sum(dim=1), ref_logprobs.sum(dim=1)
        loss, metrics = token_dpo_loss(policy[:count], policy[count:], reference[:count], reference[count:],
                                       beta, dpo.loss_type, dpo.label_smoothing)
        metrics["ref_logp_gap"] = (reference[:count] - reference[count:]).mean()
        metrics["chosen_logp"] = policy[:count].detach().mean()
        metrics["rejected_logp"] = policy[count:].detach().mean()
        if dpo.sft_weight:  # mean next-token CE on the winner's tokens
            sft = -logprobs[:count].mean()
            loss = loss + dpo.sft_weight * sft
            metrics["sft_loss"] = sft.detach()
        return loss, metrics

    # -- token GRPO ------------------------------------------------------------------------------

    def setup_rollouts(self, steps: int, guidance_scale: float, noise_level: float,
                       sde_window: list[int] | None = None) -> None:
        """Nothing to set up: tokens are sampled at `grpo.temperature`."""

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], group: int, seed: int) -> TokenRollout:
        """`group` sequences per prompt with the current policy (one seeded call; the global RNG is
        left as it was)."""
        prompts = [p for p in batch["prompt"] for _ in range(group)]
        controls = batch.get("control_pixel_values")
        if controls is not None:
            controls = [g.repeat_interleave(group, dim=0).to(self.device) for g in controls]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            out = self.sample_tokens(prompts, seed=seed, temperature=self.cfg.grpo.temperature, controls=controls)
        tokens, logprobs = out.pop("tokens"), out.pop("logprobs")
        return TokenRollout(prompts, tokens, logprobs.float(), controls, outputs=out)

    def restore(self, record: TokenRollout, batch: dict[str, Any], group: int) -> None:
        """Nothing to rebuild: a token rollout is all tensors."""

    def policy_backward(self, record: TokenRollout, advantages: torch.Tensor, valid: torch.Tensor,
                        iteration: int, members: list[int], ctx: StepContext) -> dict[str, float]:
        grpo = self.cfg.grpo
        kwargs = {"tokens": record.tokens, "controls": record.controls, "temperature": grpo.temperature}
        logprobs = self.token_logprobs(record.prompts, **kwargs)
        reference = None
        if grpo.beta > 0:
            with torch.no_grad(), self.family.reference():
                reference = self.token_logprobs(record.prompts, **kwargs)
        if iteration == 0:
            old = None  # on-policy: ratio exactly 1 (TRL); the recomputed values serve later iterations
            record.old_logprobs = logprobs.detach()
        elif record.old_logprobs is None:
            raise RuntimeError("token GRPO: a later iteration without the first iteration's log-probs.")
        else:
            old = record.old_logprobs
        # Zero-std groups are masked out of the loss, and so are the tokens after a sequence's end
        # (`completion_mask`, for policies whose sequences have their own lengths).
        completion = record.outputs.get("completion_mask")
        completion = torch.ones_like(logprobs, dtype=torch.bool) if completion is None else \
            completion.to(logprobs.device).bool()
        mask = valid[:, None].to(logprobs.device) & completion
        loss, stats = token_grpo_loss(logprobs, old, advantages.to(logprobs.device), mask, grpo.epsilon,
                                      grpo.epsilon_high, grpo.beta, reference, grpo.loss_type,
                                      **self.loss_options())
        ctx.backward(loss * ctx.scale)
        with torch.no_grad():
            gap = ((logprobs.detach() - record.gen_logprobs.to(logprobs.device)).abs() * completion).sum()
            gap = gap / completion.sum().clamp_min(1)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()},
                "gen_logprob_abs_diff": float(gap)}

    def loss_options(self) -> dict[str, Any]:
        """Extra `token_grpo_loss` options of this policy (e.g. `max_completion_length` for dr_grpo)."""
        return {}

    record_class = TokenRollout
