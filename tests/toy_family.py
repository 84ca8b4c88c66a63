"""A throwaway model family defined outside glm_training/ (for the interface tests): a small
pure-torch flow denoiser on 4x-downsampled pixels ("latents"), conditioned on a hashed prompt
embedding, implementing only the declared denoiser hooks. Importing this module registers it as
`model.family: toy`."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glm_training.algorithms.objectives import FlowMatchingObjective, FlowShift
from glm_training.models.base import DiffusionFamily, register_family

EMBED = 8


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = nn.Linear(EMBED, 3)
        self.body = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, x, t, text):
        time = t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]).to(x)
        return self.body(torch.cat([x, time], 1)) + self.text(text)[:, :, None, None]


class ToyFamily(DiffusionFamily):
    """The whole family: declarations, loading, the denoiser hooks, saving."""

    name = "toy"
    component_choices = ("net",)
    component_groups = {"net": ("net",)}
    default_component = "net"
    default_lora_targets = {"net": []}
    resolution_multiple = 4

    def load(self) -> None:
        torch.manual_seed(0)
        self.modules = {"net": ToyNet().to(self.device)}
        self.objective = FlowMatchingObjective(FlowShift(shift=1.0), patch_size=1)

    def encode_prompt(self, prompts, control_images=None):
        rows = [torch.randn(EMBED, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
        return {"prompt_embeds": torch.stack(rows).to(self.device)}

    def encode_images(self, pixel_values):
        return nn.functional.avg_pool2d(pixel_values.to(self.device).float(), 4)

    def decode_latents(self, latents):
        return nn.functional.interpolate(latents, scale_factor=4, mode="nearest").clamp(-1, 1)

    def latent_shape(self, height, width):
        return (3, height // 4, width // 4)

    def condition(self, prompt_embeds, batch):
        return {"text": prompt_embeds["prompt_embeds"]}

    def predict(self, noisy_latents, timesteps, condition):
        return self.modules["net"](noisy_latents, timesteps.to(noisy_latents), condition["text"])

    def sample(self, prompts, *, height, width, num_inference_steps, guidance_scale, seed, **_):
        from PIL import Image

        (part,) = self.parts()
        part.setup_rollouts(num_inference_steps, 1.0, 0.0)
        batch = {"index": list(range(len(prompts))), "prompt": list(prompts)}
        images = part.decode(batch, 1, part.eval_noise(len(prompts), seed), num_inference_steps, 1.0, records=[])
        array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in array]

    def save_adapter(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "net.safetensors"
        save_file({k: v.contiguous() for k, v in self.unwrapped("net").state_dict().items()}, str(path))
        return [path]

    def load_adapter_weights(self, path: str) -> None:
        self.unwrapped("net").load_state_dict(load_file(str(Path(path) / "net.safetensors")))

    def cache_identity(self) -> str:
        return "toy"


register_family("toy", ToyFamily)


def toy_config(tmp_path: Path, data: Path, method: str, **sections: Any) -> dict:
    raw = {"model": {"family": "toy", "pretrained_model_name_or_path": "unused"},
           "data": {"path": str(data), "resolution": 16},
           "training": {"method": method, "max_train_steps": 6, "batch_size": 4, "learning_rate": 3e-3,
                        "checkpointing_steps": 100},
           "lora": {"enabled": False},
           "logging": {"output_dir": str(tmp_path / "out"), "report_to": []}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


def logged(run_dir: Path) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]
