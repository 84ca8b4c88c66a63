"""Exponential moving average of the trainable parameters (diffusers' `EMAModel`).

    ema = TrainableEMA(named_params, decay=0.999, update_after_step=100, device="cpu")
    ... after every optimizer step:  ema.step(named_params)
    with ema.swapped(named_params):   # EMA weights in, raw weights restored afterwards
        family.sample(...) / family.save_adapter(run_dir / "final" / "ema")

The decay each step is diffusers' schedule: 0 (a plain copy) for the first
`update_after_step + 1` steps, then `min(decay, (1 + n) / (10 + n))` with n the steps since
(`use_ema_warmup: true` selects diffusers' `1 - (1 + n / inv_gamma) ** -power` instead).
`device: cpu` keeps the averages in host memory (no GPU memory for a second copy); `same`
keeps them beside the parameters.

`state_dict()` is flat tensors only (`shadow.<name>` and 0-d settings), so a checkpoint stores
it with safetensors (`save` / `load`) and a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

EMA_FILE = "ema.safetensors"
DEVICES = ("cpu", "same")
_SETTINGS = {"decay": torch.float64, "min_decay": torch.float64, "update_after_step": torch.int64,
             "optimization_step": torch.int64, "use_ema_warmup": torch.bool, "inv_gamma": torch.float64,
             "power": torch.float64}


def _named(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(params, Mapping):
        return dict(params)
    return {str(i): p for i, p in enumerate(params)}


class TrainableEMA:
    def __init__(self, params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], decay: float = 0.9999,
                 update_after_step: int = 0, device: str = "cpu", use_ema_warmup: bool = False,
                 inv_gamma: float = 1.0, power: float = 2 / 3):
        from diffusers.training_utils import EMAModel

        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"training.ema.decay: {decay} must be in [0, 1].")
        if int(update_after_step) < 0:
            raise ValueError(f"training.ema.update_after_step: {update_after_step} must be >= 0.")
        if device not in DEVICES:
            raise ValueError(f"training.ema.device: {device!r} must be one of {DEVICES}.")
        named = _named(params)
        if not named:
            raise ValueError("TrainableEMA: no parameters to average (nothing is trainable).")
        self.names = list(named)
        self.device = device
        self.ema = EMAModel([p.detach() for p in named.values()], decay=float(decay),
                            update_after_step=int(update_after_step), use_ema_warmup=bool(use_ema_warmup),
                            inv_gamma=float(inv_gamma), power=float(power))
        # Averages in float32 whatever the parameters' dtype (bf16 averages lose small updates).
        self.ema.to(device="cpu" if device == "cpu" else None, dtype=torch.float32)

    def _ordered(self, params) -> list[torch.Tensor]:
        named = _named(params)
        if list(named) != self.names:
            missing = sorted(set(self.names) - set(named))[:3]
            extra = sorted(set(named) - set(self.names))[:3]
            raise ValueError(f"TrainableEMA: the parameters differ from those it was built on "
                             f"(missing e.g. {missing}, unexpected e.g. {extra}).")
        return list(named.values())

    @property
    def optimization_step(self) -> int:
        return int(self.ema.optimization_step)

    @property
    def current_decay(self) -> float | None:
        return self.ema.cur_decay_value

    def step(self, params) -> None:
        """Update the averages from the current parameters (call after each optimizer step)."""
        tracked = []
        for shadow, param in zip(self.ema.shadow_params, self._ordered(params)):
            if param.device != shadow.device or param.dtype != shadow.dtype:
                # A float32 copy beside the average; it keeps requires_grad, because EMAModel
                # copies frozen tensors instead of averaging them.
                param = param.detach().to(shadow.device, shadow.dtype).requires_grad_(param.requires_grad)
            tracked.append(param)
        self.ema.step(tracked)

    def copy_to(self, params) -> None:
        """Write the averages into the parameters (in their own device and dtype)."""
        with torch.no_grad():
            for shadow, param in zip(self.ema.shadow_params, self._ordered(params)):
                param.data.copy_(shadow.to(param.device, param.dtype))

    @contextlib.contextmanager
    def swapped(self, params) -> Iterator[None]:
        """The EMA weights in the parameters inside the block; the raw ones restored exactly after."""
        ordered = self._ordered(params)
        saved = [p.detach().clone() for p in ordered]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(ordered, saved):
                    param.data.copy_(value)

    def averages(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.ema.shadow_params))

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready): `shadow.<name>` plus 0-d tensors of the settings."""
        state = self.ema.state_dict()
        out = {f"shadow.{name}": t.detach().cpu().contiguous() for name, t in zip(self.names, state["shadow_params"])}
        for key, dtype in _SETTINGS.items():
            out[key] = torch.tensor(state[key], dtype=dtype)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = {f"shadow.{name}" for name in self.names}
        found = {key for key in state if key.startswith("shadow.")}
        if expected != found:
            missing, extra = sorted(expected - found)[:3], sorted(found - expected)[:3]
            raise ValueError(f"EMA state does not match the trainable parameters (missing e.g. {missing}, "
                             f"unexpected e.g. {extra}); was it saved with the same model.component and lora settings?")
        for name, shadow in zip(self.names, self.ema.shadow_params):
            value = state[f"shadow.{name}"]
            if value.shape != shadow.shape:
                raise ValueError(f"EMA state: shadow.{name} has shape {tuple(value.shape)}, expected {tuple(shadow.shape)}.")
        settings = {}
        for key, dtype in _SETTINGS.items():
            value = state[key].item()
            settings[key] = bool(value) if dtype == torch.bool else int(value) if dtype == torch.int64 else float(value)
        # EMAModel.load_state_dict validates and sets the settings; the averages keep their device.
        devices = [(t.device, t.dtype) for t in self.ema.shadow_params]
        self.ema.load_state_dict({**settings, "shadow_params": [state[f"shadow.{n}"] for n in self.names]})
        self.ema.shadow_params = [t.to(d, dt) for t, (d, dt) in zip(self.ema.shadow_params, devices)]

    def save(self, path: str | Path) -> Path:
        """`path` a folder (writes `ema.safetensors` in it) or a file."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / EMA_FILE
        save_file(self.state_dict(), str(path))
        return path

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"training.ema: {path} does not exist (a checkpoint saved without EMA? "
                                    "resume with the same training.ema setting).")
        self.load_state_dict(load_file(str(path)))
