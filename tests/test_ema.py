"""TrainableEMA: the averaging formula, decay 0 = raw weights, swap/restore, exact state round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glm_training.utils.ema import TrainableEMA


def make_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    model[0].bias.requires_grad_(False)  # a frozen tensor is not tracked
    return model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train_steps(model: nn.Module, ema: TrainableEMA, steps: int, seed: int) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator).to(next(model.parameters()).dtype)
        loss = model(x).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(trainable(model))


@pytest.mark.parametrize("device", ["cpu", "same"])
def test_decay_zero_equals_the_raw_weights(device):
    model = make_model()
    ema = TrainableEMA(trainable(model), decay=0.0, device=device)
    train_steps(model, ema, 4, seed=1)
    for name, average in ema.averages().items():
        assert torch.equal(average, trainable(model)[name].detach())
    assert set(ema.averages()) == {"0.weight", "2.weight", "2.bias"}


def test_averages_follow_diffusers_schedule():
    model = make_model()
    decay, after = 0.8, 2
    ema = TrainableEMA(trainable(model), decay=decay, update_after_step=after)
    expected = {name: p.detach().clone() for name, p in trainable(model).items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(2)
    for step in range(1, 9):
        loss = model(torch.randn(8, 4, generator=generator)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(trainable(model))
        n = step - after - 1
        d = 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))
        assert ema.current_decay == pytest.approx(d)
        for name, p in trainable(model).items():
            expected[name] = expected[name] - (1 - d) * (expected[name] - p.detach())
            if step <= after + 1:  # a plain copy before update_after_step
                assert torch.equal(ema.averages()[name], p.detach())
    for name, average in ema.averages().items():
        torch.testing.assert_close(average, expected[name], atol=1e-6, rtol=0)
        assert not torch.equal(average, trainable(model)[name].detach())


def test_swapped_puts_the_averages_in_and_restores_the_raw_weights_exactly():
    model = make_model()
    ema = TrainableEMA(trainable(model), decay=0.9)
    train_steps(model, ema, 15, seed=3)
    raw = {name: p.detach().clone() for name, p in trainable(model).items()}
    x = torch.randn(3, 4)
    with ema.swapped(trainable(model)):
        for name, p in trainable(model).items():
            assert torch.equal(p.detach(), ema.averages()[name])
        swapped_out = model(x)
    for name, p in trainable(model).items():
        assert torch.equal(p.detach(), raw[name])
    assert not torch.allclose(swapped_out, model(x))


def test_state_round_trips_exactly_and_resume_matches_an_unbroken_run(tmp_path):
    unbroken_model = make_model()
    unbroken = TrainableEMA(trainable(unbroken_model), decay=0.9, update_after_step=1)
    train_steps(unbroken_model, unbroken, 3, seed=4)
    path = unbroken.save(tmp_path / "checkpoint-3")
    assert path.name == "ema.safetensors"
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert int(saved["optimization_step"]) == 3 and float(saved["decay"]) == 0.9

    # "resume": a new model with the raw weights, a fresh EMA that loads the saved state
    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(unbroken_model.state_dict())
    resumed = TrainableEMA(trainable(resumed_model), decay=0.5, update_after_step=7)  # settings come from the file
    resumed.load(path.parent)
    assert resumed.optimization_step == 3 and resumed.ema.decay == 0.9 and resumed.ema.update_after_step == 1
    for name in unbroken.names:
        assert torch.equal(resumed.averages()[name], unbroken.averages()[name])
    train_steps(unbroken_model, unbroken, 3, seed=5)
    train_steps(resumed_model, resumed, 3, seed=5)
    for name in unbroken.names:
        assert torch.equal(resumed.averages()[name], unbroken.averages()[name])


def test_half_precision_parameters_average_in_float32_on_the_cpu():
    model = make_model(dtype=torch.bfloat16)
    ema = TrainableEMA(trainable(model), decay=0.99, device="cpu")
    train_steps(model, ema, 2, seed=6)
    assert all(a.dtype == torch.float32 and a.device.type == "cpu" for a in ema.averages().values())
    with ema.swapped(trainable(model)):
        assert all(p.dtype == torch.bfloat16 for p in trainable(model).values())


def test_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"training.ema.decay"):
        TrainableEMA(trainable(model), decay=1.5)
    with pytest.raises(ValueError, match=r"training.ema.device"):
        TrainableEMA(trainable(model), device="gpu")
    ema = TrainableEMA(trainable(model))
    with pytest.raises(ValueError, match="differ from those it was built on"):
        ema.step({"0.weight": model[0].weight})
    other = TrainableEMA({"x": torch.zeros(2, requires_grad=True)})
    with pytest.raises(ValueError, match="does not match the trainable parameters"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(FileNotFoundError, match="training.ema"):
        ema.load("/nonexistent/checkpoint-1")
