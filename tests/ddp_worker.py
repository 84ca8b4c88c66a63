"""Run under torchrun by the multi-process tests: train with the config's `training.method`, then
write this rank's trainable weights."""

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from glm_training.cli import trainer_class
from glm_training.config import config_from_dict

config_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
cfg = config_from_dict(yaml.safe_load(config_path.read_text()))
trainer = trainer_class(cfg.training.method)(cfg)
trainer.train()
rank = trainer.accelerator.process_index
state = {k: v.detach().cpu().contiguous() for k, v in trainer.family.trainable_state_dict().items()}
save_file(state, str(out_dir / f"rank{rank}.safetensors"))
torch.distributed.barrier() if torch.distributed.is_initialized() else None
