"""Optimizers by name or class path, and warmup + constant/linear/cosine schedules."""

from __future__ import annotations

import contextlib
import importlib
import math

import torch

from glm_training.config import Config, ConfigError


def _import_class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ConfigError(f"optimizer.class_path: {class_path!r} must be module.Class, e.g. torch.optim.AdamW.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"optimizer.class_path: cannot import {module_name} ({error}). "
                          f"Install the package that provides it.") from None
    if not hasattr(module, class_name):
        raise ConfigError(f"optimizer.class_path: {module_name} has no {class_name}.")
    return getattr(module, class_name)


def optimizer_class(cfg: Config) -> tuple[type, dict]:
    opt = cfg.optimizer
    if opt.class_path:
        return _import_class(opt.class_path), dict(opt.kwargs)
    adam_kwargs = {"betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
    if opt.name == "adamw":
        return torch.optim.AdamW, {**adam_kwargs, **opt.kwargs}
    if opt.name == "sgd":
        return torch.optim.SGD, {"weight_decay": opt.weight_decay, "momentum": 0.9, **opt.kwargs}
    if opt.name == "adamw8bit":
        return adamw8bit_class(), {**adam_kwargs, **opt.kwargs}
    if opt.name == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise ConfigError("optimizer.name: prodigy needs prodigyopt (pip install prodigyopt); "
                              "set training.learning_rate: 1.0 with it.") from None
        return prodigyopt.Prodigy, {**adam_kwargs, **opt.kwargs}
    raise ConfigError(f"optimizer.name: unknown optimizer {opt.name!r}.")


def adamw8bit_class() -> type:
    """`optimizer.name: adamw8bit`: bitsandbytes' AdamW8bit on CUDA when it is installed (what the
    peers' 8-bit figures use); otherwise torchao's AdamW8bit (block-wise 8-bit moments, in
    requirements.txt), which also runs on CPU. Both keep tensors under 4096 elements in fp32."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("optimizer.name: adamw8bit needs torchao (pip install -r requirements.txt, torchao==0.18.0) "
                          "or, on CUDA, bitsandbytes (pip install 'glm_training[optim]'); or use optimizer.name: adamw.")
    return _torchao_adamw8bit()


def _torchao_adamw8bit() -> type:
    from torchao.optim import AdamW8bit

    class TorchaoAdamW8bit(AdamW8bit):
        """torchao's AdamW8bit; on CPU its per-parameter step runs eagerly: torch.compile would
        build a C++ kernel per parameter shape first (minutes on a small CPU; the step itself is
        cheap). torchao wants each group's lr as a tensor: it is one only during `step`, so the
        schedulers, the logs and the checkpoints keep seeing plain floats."""

        def add_param_group(self, param_group: dict) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)  # without torchao's lr tensor

        @torch.no_grad()
        def step(self, closure=None):
            rates = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
            try:
                with torch.compiler.set_stance("force_eager") if on_cpu else contextlib.nullcontext():
                    return super().step(closure)
            finally:
                for group, rate in zip(self.param_groups, rates):
                    group["lr"] = rate

    return TorchaoAdamW8bit


def build_optimizer(cfg: Config, groups: dict[str, list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """One parameter group per trained component, each with its own learning rate."""
    unknown = set(cfg.optimizer.component_lr) - set(groups)
    if unknown:
        raise ConfigError(f"optimizer.component_lr: {sorted(unknown)} not trained in this run "
                          f"(trained components: {sorted(groups)}).")
    param_groups = []
    for name, params in groups.items():
        if params:
            lr = cfg.optimizer.component_lr.get(name, cfg.training.learning_rate)
            param_groups.append({"params": params, "lr": lr, "name": name})
    if not param_groups:
        raise ConfigError("Nothing to train: no parameter requires gradients (check model.component "
                          "and lora.target_modules).")
    cls, kwargs = optimizer_class(cfg)
    try:
        return cls(param_groups, **kwargs)
    except TypeError as error:
        raise ConfigError(f"optimizer: {cls.__name__} rejected its arguments ({error}); "
                          "check optimizer.kwargs.") from None


def lr_lambda(name: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return factor


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    sched = cfg.lr_scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(sched.name, sched.warmup_steps, total_steps, sched.min_lr_ratio))
