"""Run under torchrun by the multi-process tests: train with the config's `training.method`, then
write this rank's trainable weights (under FSDP each rank gathers the full tensors itself, so that
the files of the ranks can be compared).

With a third argument `reference`, also write `rank<r>_reference.safetensors`: on fixed inputs, the
trained denoiser part's prediction (`policy`), the run's reference prediction after training
(`reference`, `family.reference()`: adapter disabled or the frozen copy, sharded under FSDP) and the
prediction of a freshly loaded, never trained base model (`base`), and how many tensors of the
full-fine-tuning reference copy are sharded (`sharded_reference_tensors`)."""

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from glm_training.cli import trainer_class
from glm_training.config import config_from_dict


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # collective under FSDP
    return tensor.detach().cpu().contiguous()


@torch.no_grad()
def reference_predictions(trainer) -> dict[str, torch.Tensor]:
    from glm_training.models.base import build_family

    part = next(p for p in trainer.parts if hasattr(p, "generation_conditions"))
    records = part.records[:2]
    batch = {"index": list(range(len(records))), "prompt": [r.prompt for r in records]}
    condition, _ = part.generation_conditions(batch, 1, 1.0)
    size = trainer.cfg.data.resolution
    x0 = torch.randn(len(records), *part.latent_shape(size, size), generator=torch.Generator().manual_seed(7))
    noise, timesteps = part.encoder.noise_and_timesteps(x0, [1000 + i for i in batch["index"]], 0, 0.0)
    noisy = part.objective.add_noise(x0, noise, timesteps).to(trainer.device)
    out = {"policy": part.predict(noisy, timesteps, condition)}
    with trainer.family.reference():  # every rank: a sharded module runs forward collectively
        out["reference"] = part.predict(noisy, timesteps, condition)
    base = build_family(trainer.cfg, trainer.device)  # the untouched pretrained weights, unsharded
    for module in base.modules.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    out["base"] = base.predict(noisy, timesteps, condition)
    from torch.distributed.tensor import DTensor

    # Full fine-tuning: how many of the frozen copy's tensors are sharded (0 with LoRA: no copy).
    copies = getattr(trainer.family, "_reference_modules", None) or {}
    out["sharded_reference_tensors"] = torch.tensor(
        float(sum(isinstance(p, DTensor) for m in copies.values() for p in m.parameters())))
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


config_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
cfg = config_from_dict(yaml.safe_load(config_path.read_text()))
trainer = trainer_class(cfg.training.method)(cfg)
trainer.train()
rank = trainer.accelerator.process_index
state = {k: full(v) for k, v in trainer.family.trainable_state_dict().items()}
save_file(state, str(out_dir / f"rank{rank}.safetensors"))
if sys.argv[3:] == ["reference"]:
    save_file(reference_predictions(trainer), str(out_dir / f"rank{rank}_reference.safetensors"))
torch.distributed.barrier() if torch.distributed.is_initialized() else None
