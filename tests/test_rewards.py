"""Reward calculator, registry, simple built-ins, SSIM, `python:` rewards and the HTTP client."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from glm_training.config import ConfigError
from glm_training.rewards import (
    Reward,
    RewardCalculator,
    RewardError,
    RewardInputs,
    available_rewards,
    build_reward,
    build_reward_calculator,
    register_reward,
    resolve_weights,
)
from glm_training.rewards.external import decode_png, encode_png


def solid(*rgb: float, size: int = 16) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


def noisy_images(count: int = 7, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def inputs_for(images: torch.Tensor, prompts=None, **extra) -> RewardInputs:
    return RewardInputs(images=images, prompts=prompts or [f"prompt {i}" for i in range(len(images))], **extra)


# --- simple built-ins --------------------------------------------------------------------------

def test_brightness_is_mean_and_monotonic():
    images = torch.stack([solid(0.1, 0.1, 0.1), solid(0.5, 0.5, 0.5), solid(0.9, 0.8, 0.7)])
    scores = build_reward("brightness")(inputs_for(images))
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert torch.allclose(scores, torch.tensor([0.1, 0.5, 0.8]), atol=1e-6)


def test_color_reward_prefers_the_configured_colour():
    images = torch.stack([solid(1, 0, 0), solid(0.8, 0.1, 0.1), solid(0, 0, 1), solid(0, 1, 1)])
    scores = build_reward("color", rgb=[255, 0, 0])(inputs_for(images))
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2] > scores[3]
    assert scores[3] == pytest.approx(0.0, abs=1e-6)  # cyan is the opposite corner of the cube
    hex_scores = build_reward("color", rgb="#0000ff")(inputs_for(images))
    assert hex_scores[2] == pytest.approx(1.0) and hex_scores.argmax() == 2
    with pytest.raises(ConfigError, match="rgb"):
        build_reward("color", rgb=[300, 0, 0])


def test_jpeg_compressibility_prefers_flat_images():
    images = torch.stack([solid(0.5, 0.5, 0.5, size=64), noisy_images(1, 64)[0]])
    compress = build_reward("jpeg_compressibility")(inputs_for(images))
    incompress = build_reward("jpeg_incompressibility", quality=80)(inputs_for(images))
    assert compress[0] > compress[1] and (compress < 0).all()
    assert incompress[1] > incompress[0] > 0


def test_ssim_identical_is_one_and_decreases_with_noise():
    generator = torch.Generator().manual_seed(1)
    source = torch.rand(1, 3, 32, 32, generator=generator).repeat(3, 1, 1, 1)
    noise = torch.randn(source.shape, generator=generator)
    images = (source + noise * torch.tensor([0.0, 0.05, 0.3]).view(3, 1, 1, 1)).clamp(0, 1)
    for grayscale in (False, True):
        scores = build_reward("ssim", grayscale=grayscale)(inputs_for(images, source_images=source))
        assert scores[0] == pytest.approx(1.0, abs=1e-6)
        assert scores[0] > scores[1] > scores[2]


def test_ssim_prefers_source_resizes_and_names_itself_without_reference():
    image = noisy_images(1, 16)
    other = noisy_images(1, 16, seed=5)
    # source given: compared with the source (identical), not with the unrelated target
    both = inputs_for(image, source_images=image, target_images=other)
    assert build_reward("ssim")(both)[0] == pytest.approx(1.0, abs=1e-6)
    assert build_reward("ssim", compare_to="target")(both)[0] < 0.5
    # a reference at another size is resized to the image first (a smooth image survives it)
    smooth = torch.nn.functional.interpolate(noisy_images(1, 4), size=(16, 16), mode="bilinear", align_corners=False)
    big = torch.nn.functional.interpolate(smooth, size=(32, 32), mode="bilinear", align_corners=False)
    assert build_reward("ssim")(inputs_for(smooth, target_images=big))[0] > 0.9
    assert build_reward("ssim")(inputs_for(smooth, target_images=big.flip(-1)))[0] < 0.5
    calculator = build_reward_calculator({"rewards": {"structure": {"type": "ssim"}}})
    with pytest.raises(RewardError, match="structure") as caught:
        calculator(inputs_for(image))
    assert "source_images or target_images" in str(caught.value)
    assert caught.value.reward_name == "structure"


def test_builtins_follow_the_protocol_and_are_listed():
    names = available_rewards()
    for name in ("lpips", "ssim", "ocr", "clip_score", "aesthetic", "brightness", "color",
                 "jpeg_compressibility", "http"):
        assert name in names
    assert isinstance(build_reward("brightness"), Reward)


# --- calculator --------------------------------------------------------------------------------

def test_weighted_sum_and_log_stats():
    images = noisy_images(5)
    calculator = build_reward_calculator({
        "rewards": {"brightness": {"weight": 2.0}, "red": {"type": "color", "rgb": [255, 0, 0], "weight": -0.5}}})
    total, per_reward = calculator(inputs_for(images))
    brightness = images.mean(dim=(1, 2, 3))
    red = build_reward("color", rgb=[255, 0, 0])(inputs_for(images))
    assert set(per_reward) == {"brightness", "red"}
    assert torch.allclose(per_reward["brightness"], brightness, atol=1e-6)
    assert torch.allclose(per_reward["red"], red)
    assert torch.allclose(total, 2.0 * brightness - 0.5 * red, atol=1e-6)
    assert total.dtype == torch.float32 and total.device.type == "cpu"
    stats = calculator.log_stats(total, per_reward)
    assert set(stats) == {f"reward/{n}_{s}" for n in ("brightness", "red", "total") for s in ("mean", "std")}
    assert stats["reward/total_mean"] == pytest.approx(float(total.mean()))
    assert stats["reward/red_std"] == pytest.approx(float(red.std(unbiased=False)))
    single = calculator.log_stats(total[:1], {k: v[:1] for k, v in per_reward.items()})
    assert single["reward/total_std"] == 0.0


def write_module(tmp_path, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return path


USER_REWARDS = '''
import torch

CALLS = []

def brightness_plus(images, prompts, offset=0.0):
    CALLS.append(len(prompts))
    return (images.mean(dim=(1, 2, 3)) + offset).tolist()

def prompt_length(images, prompts, target_images=None, **kwargs):
    assert target_images is not None and target_images.shape[0] == images.shape[0]
    return [float(len(p)) * kwargs.get("scale", 1.0) for p in prompts]

def from_inputs(inputs):
    return torch.full((len(inputs),), float(len(inputs.prompts[0])))

def boom(images, prompts):
    raise ValueError("kaboom")

def too_few(images, prompts):
    return [1.0] * (len(prompts) - 1)

def not_finite(images, prompts):
    return [float("nan")] * len(prompts)

class Scaled:
    def __init__(self, factor=1.0):
        self.factor = factor
    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * self.factor
'''


def test_python_rewards(tmp_path, monkeypatch):
    path = write_module(tmp_path, "user_rewards_mod", USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = noisy_images(4)
    prompts = ["a", "bb", "ccc", "dddd"]
    brightness = images.mean(dim=(1, 2, 3))

    by_module = build_reward("python:user_rewards_mod:brightness_plus", offset=1.0)
    assert torch.allclose(by_module(inputs_for(images, prompts)), brightness + 1.0)
    by_file = build_reward(f"python:{path}:prompt_length", scale=2.0)
    assert by_file(inputs_for(images, prompts, target_images=images)).tolist() == [2.0, 4.0, 6.0, 8.0]
    takes_inputs = build_reward("python:user_rewards_mod:from_inputs")
    assert takes_inputs(inputs_for(images, prompts)).tolist() == [1.0] * 4
    a_class = build_reward("python:user_rewards_mod:Scaled", factor=3.0)
    assert torch.allclose(a_class(inputs_for(images, prompts)), 3 * brightness)

    with pytest.raises(ConfigError, match="offst"):
        build_reward("python:user_rewards_mod:brightness_plus", reward_name="mine", offst=1.0)
    with pytest.raises(ConfigError, match="no attribute 'missing'"):
        build_reward("python:user_rewards_mod:missing")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        build_reward("python:no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="package.module:function"):
        build_reward("python:user_rewards_mod")


def test_chunking_matches_one_batch(tmp_path, monkeypatch):
    write_module(tmp_path, "chunk_rewards_mod", USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import chunk_rewards_mod

    images = noisy_images(7)
    config = {"rewards": {"mine": {"type": "python:chunk_rewards_mod:brightness_plus", "offset": 0.5},
                          "jpeg": {"type": "jpeg_compressibility", "batch_size": 2}}}
    whole_total, whole = build_reward_calculator({**config, "batch_size": 64})(inputs_for(images))
    assert chunk_rewards_mod.CALLS == [7]
    chunk_rewards_mod.CALLS.clear()
    chunked = build_reward_calculator({**config, "batch_size": 3})
    total, per_reward = chunked(inputs_for(images))
    assert chunk_rewards_mod.CALLS == [3, 3, 1]
    assert chunked.batch_sizes == {"mine": 3, "jpeg": 2}
    assert torch.allclose(total, whole_total) and torch.allclose(per_reward["mine"], whole["mine"])
    assert torch.equal(per_reward["jpeg"], whole["jpeg"])


def test_errors_name_the_reward(tmp_path, monkeypatch):
    write_module(tmp_path, "bad_rewards_mod", USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = noisy_images(3)
    for function, message in (("boom", "kaboom"), ("too_few", "returned 2 scores for 3 images"),
                              ("not_finite", "non-finite")):
        calculator = build_reward_calculator({"rewards": {
            "brightness": {}, f"my_{function}": {"type": f"python:bad_rewards_mod:{function}"}}})
        with pytest.raises(RewardError, match=f"my_{function}") as caught:
            calculator(inputs_for(images))
        assert message in str(caught.value)
    # a reward instance used directly in a calculator (not built from config)
    calculator = RewardCalculator({"custom": (lambda inputs: 1 / 0, 1.0)})
    with pytest.raises(RewardError, match="'custom'.*ZeroDivisionError"):
        calculator(inputs_for(images))
    # inputs are checked before any reward runs
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calculator(inputs_for(images * 2 - 1))
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        calculator(RewardInputs(images=images, prompts=["a", "b"]))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"'lpips' has no option 'nett'.*Did you mean 'net'"):
        build_reward_calculator({"rewards": {"lpips": {"nett": "alex"}}})
    with pytest.raises(ConfigError, match=r"'brite' has no option 'gain'"):
        build_reward_calculator({"rewards": {"brite": {"type": "brightness", "gain": 2}}})
    with pytest.raises(ConfigError, match=r"Unknown reward type 'brightnes'.*Did you mean 'brightness'"):
        build_reward_calculator({"rewards": {"brightnes": {}}})
    with pytest.raises(ConfigError,
                       match=r"reward.weights.dit.ocrr.*Did you mean 'ocr'.*Configured rewards: ocr, brightness"):
        build_reward_calculator({"rewards": {"ocr": {}, "brightness": {}},
                                 "weights": {"dit": {"ocrr": 1.0}}}, component="dit")
    with pytest.raises(ConfigError, match="reward.bach_size.*Did you mean 'batch_size'"):
        build_reward_calculator({"rewards": {"brightness": {}}, "bach_size": 4})
    with pytest.raises(ConfigError, match="weight 0"):
        build_reward_calculator({"rewards": {"brightness": {"weight": 0}}})
    with pytest.raises(ConfigError, match="reward.rewards.brightness.weight"):
        build_reward_calculator({"rewards": {"brightness": {"weight": "high"}}})


def test_per_component_weights():
    config = {
        "rewards": {"brightness": {"weight": 1.0}, "red": {"type": "color", "weight": 1.0},
                    # built only if some selected component gives it a weight: importing would fail
                    "broken": {"type": "python:no_such_module_xyz:f", "weight": 0.0}},
        "weights": {"ar": {"brightness": 0.7, "red": 0.3}, "dit": {"red": 2.0}},
    }
    assert resolve_weights(config, "dit") == {"brightness": 0.0, "red": 2.0, "broken": 0.0}
    images = noisy_images(4)
    brightness = images.mean(dim=(1, 2, 3))
    red = build_reward("color")(inputs_for(images))

    dit = build_reward_calculator(config, component="dit")
    assert dit.names == ["red"]  # weight-0 rewards are not built or run
    total, per_reward = dit(inputs_for(images))
    assert set(per_reward) == {"red"} and torch.allclose(total, 2.0 * red)

    ar_total, _ = build_reward_calculator(config, component="ar")(inputs_for(images))
    assert torch.allclose(ar_total, 0.7 * brightness + 0.3 * red, atol=1e-6)

    # no table for this component (or no component): each reward's own weight
    for component in (None, "both"):
        calculator = build_reward_calculator(config, component=component)
        assert calculator.names == ["brightness", "red"]
        assert torch.allclose(calculator(inputs_for(images))[0], brightness + red, atol=1e-6)


def test_registered_reward_gets_the_device_option():
    seen = {}

    @register_reward("test_device_probe")
    class DeviceProbe:
        name = "test_device_probe"

        def __init__(self, device=None):
            seen["device"] = device

        def __call__(self, inputs):
            return torch.zeros(len(inputs))

    build_reward_calculator({"device": "cpu", "rewards": {"test_device_probe": {}}})
    assert seen["device"] == "cpu"
    build_reward_calculator({"device": "cpu", "rewards": {"test_device_probe": {"device": "meta"}}})
    assert seen["device"] == "meta"  # a reward's own device wins


# --- HTTP reward server ------------------------------------------------------------------------

class ScoreHandler(BaseHTTPRequestHandler):
    """Scores = mean brightness of each decoded PNG + 0.01 * prompt length; can fail on demand."""

    fail_first: list[int] = []  # status codes to answer before succeeding
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if self.path == "/slow":
            time.sleep(1.0)
        if type(self).fail_first:
            code = type(self).fail_first.pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"server says no")
            return
        if self.path == "/bad":
            reply = {"result": [1, 2]}
        else:
            reply = {"scores": [float(decode_png(image).mean()) + 0.01 * len(prompt)
                                for image, prompt in zip(body["images"], body["prompts"])]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def reward_server():
    ScoreHandler.fail_first, ScoreHandler.requests = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScoreHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_png_round_trip_is_exact_for_8bit_images():
    images = (noisy_images(2) * 255).round() / 255
    assert torch.equal(torch.stack([decode_png(p) for p in encode_png(images)]), images)


def test_http_reward(reward_server):
    images = (noisy_images(5) * 255).round() / 255
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    expected = images.mean(dim=(1, 2, 3)) + 0.01 * torch.tensor([1.0, 2, 3, 4, 5])
    calculator = build_reward_calculator({"batch_size": 2, "rewards": {
        "server": {"type": "http", "url": f"{reward_server}/score", "weight": 2.0, "send_references": True}}})
    total, per_reward = calculator(inputs_for(images, prompts, target_images=images,
                                              metadata=[{"i": i} for i in range(5)]))
    assert torch.allclose(per_reward["server"], expected, atol=1e-5)
    assert torch.allclose(total, 2 * expected, atol=1e-5)
    assert [len(r["images"]) for r in ScoreHandler.requests] == [2, 2, 1]  # chunked requests
    assert ScoreHandler.requests[0]["metadata"] == [{"i": 0}, {"i": 1}]
    assert len(ScoreHandler.requests[0]["target_images"]) == 2


def test_http_reward_retries_and_errors(reward_server):
    images, prompts = noisy_images(2), ["a", "b"]
    ScoreHandler.fail_first = [503]
    reward = build_reward("http", url=f"{reward_server}/score", retries=1, retry_delay=0.01)
    assert reward(inputs_for(images, prompts)).shape == (2,)
    assert len(ScoreHandler.requests) == 2  # one failure, one retry

    ScoreHandler.fail_first = [400]
    calculator = build_reward_calculator({"rewards": {"remote": {
        "type": "http", "url": f"{reward_server}/score", "retries": 3, "retry_delay": 0.01}}})
    with pytest.raises(RewardError, match="remote") as caught:
        calculator(inputs_for(images, prompts))
    assert f"{reward_server}/score refused the request: HTTP 400" in str(caught.value)
    assert len(ScoreHandler.requests) == 3  # 4xx is not retried

    with pytest.raises(RuntimeError, match=f"{reward_server}/bad answered without 'scores'"):
        build_reward("http", url=f"{reward_server}/bad")(inputs_for(images, prompts))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{reward_server}/slow failed after 1 attempt"):
        build_reward("http", url=f"{reward_server}/slow", timeout=0.2, retries=0)(inputs_for(images, prompts))
    assert time.monotonic() - started < 1.0

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{probe.getsockname()[1]}/score"
    with pytest.raises(RuntimeError, match=f"{closed_url} failed after 2 attempt"):
        build_reward("http", url=closed_url, retries=1, retry_delay=0.01)(inputs_for(images, prompts))
    with pytest.raises(ConfigError, match="needs option"):
        build_reward("http")
    with pytest.raises(ConfigError, match="http:// or https://"):
        build_reward("http", url="ftp://example.com")
