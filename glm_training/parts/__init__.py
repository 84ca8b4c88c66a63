"""The kinds of trainable parts a family is made of, and what each kind can be trained with.

A family returns its trained parts (`ModelFamily.parts()`); each is an instance of one kind:

- `Denoiser` (SDXL UNet, FLUX / Qwen transformers, GLM-Image DiT, BAGEL's generation expert): built
  on the family's diffusion hooks (`models.base.DenoiserHooks`); trains with the denoising loss
  (SFT), Diffusion-DPO, and Flow-GRPO / DDPO rollouts.
- `TokenPolicy` (GLM-Image AR, prompt-rewriting LMs): built on teacher-forced per-token log-probs
  and sampling with the log-probs of the distribution sampled from (`models.base.TokenPolicyHooks`);
  trains with token CE, token DPO and token GRPO.

Trainers loop over parts and call the method of the training they run (`sft_loss`,
`preference_loss`, `policy_backward`); they never ask which family or kind they hold. Metric names
of a part are prefixed with its name when a run trains several parts.
"""

from glm_training.parts.common import StepContext, prefixed
from glm_training.parts.denoiser import Denoiser, DenoiserRollout
from glm_training.parts.tokens import TokenPolicy, TokenRollout

__all__ = ["Denoiser", "DenoiserRollout", "StepContext", "TokenPolicy", "TokenRollout", "prefixed"]
