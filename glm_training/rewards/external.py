"""Rewards defined outside this package: any Python function (`python:package.module:function`)
and a client for an HTTP reward server (`http`), for rewards that need their own environment.

`python:` targets (`python:pkg.mod:name`, or `python:/path/to/file.py:name`; `name` may be dotted):

* a function `fn(images, prompts, **options)` returning B floats (list, numpy array or tensor).
  `images` is the float (B, 3, H, W) tensor in [0, 1]. If the function also takes
  `target_images`, `source_images` or `metadata` (by name or through `**kwargs`), it gets them.
* a callable with a single required positional parameter: it receives the `RewardInputs`.
* a class: built with the reward options as keyword arguments; the instance is then called
  like one of the two above.

`http` protocol: POST `url` with JSON `{"images": [base64 PNG, ...], "prompts": [...]}` (plus
`"metadata"` when the batch has it, and `"target_images"` / `"source_images"` as base64 PNGs with
`send_references: true`); the server answers `{"scores": [B floats]}`. Timeouts, connection
errors, HTTP 429 and 5xx are retried; any failure names the url.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import inspect
import io
import ipaddress
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch

from glm_training.config import ConfigError
from glm_training.rewards.base import RewardInputs, check_options, register_reward, to_uint8_hwc

EXTRA_FIELDS = ("target_images", "source_images", "metadata")


def as_scores(value: Any) -> torch.Tensor:
    """A list / tuple / numpy array / tensor of numbers -> 1-D float32 CPU tensor."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(device="cpu", dtype=torch.float32)
    else:
        try:
            import numpy as np

            tensor = torch.from_numpy(np.asarray(value, dtype=np.float32).copy())
        except (TypeError, ValueError) as error:
            raise TypeError(f"expected a sequence of numbers, got {type(value).__name__}: {error}") from error
    if tensor.ndim == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 1:
        raise TypeError(f"expected B scores (a 1-D sequence), got shape {tuple(tensor.shape)}")
    return tensor


def _import_target(spec: str, reward_name: str) -> Any:
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"Reward {reward_name!r}: type 'python:{spec}' must look like "
                          "'python:package.module:function' (or 'python:/path/to/file.py:function').")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise ConfigError(f"Reward {reward_name!r}: file {path} (from 'python:{spec}') does not exist.")
            unique = f"glm_training_user_reward_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(unique)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[unique] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as error:  # an import error inside the user's module is a config problem here
        raise ConfigError(f"Reward {reward_name!r}: cannot import {module_name!r} (from 'python:{spec}'): "
                          f"{type(error).__name__}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"Reward {reward_name!r}: {module_name!r} has no attribute {attribute!r} "
                              f"(from 'python:{spec}').")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"Reward {reward_name!r}: python:{spec} is a {type(target).__name__}, "
                          "not a function or class.")
    return target


def _takes_inputs(function: Callable) -> bool:
    """True when `function` has exactly one required positional parameter (it takes RewardInputs)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    return len(required) == 1 and not has_var_positional


class PythonReward:
    """A user function or class named as `python:package.module:function` (see the module docstring)."""

    name = "python"

    def __init__(self, spec: str, reward_name: str | None = None, **options: Any):
        reward_name = reward_name or f"python:{spec}"
        self.spec = spec
        target = _import_target(spec, reward_name)
        if inspect.isclass(target):
            check_options(reward_name, target, options)
            self.function = target(**options)
            self.options: dict[str, Any] = {}
            if not callable(self.function):
                raise ConfigError(f"Reward {reward_name!r}: instances of python:{spec} are not callable.")
        else:
            self.function = target
            self.options = dict(options)
        self.takes_inputs = _takes_inputs(self.function)
        self.extra_fields: tuple[str, ...] = ()
        if not self.takes_inputs:
            parameters = inspect.signature(self.function).parameters
            var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            named = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if len([p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) < 2 \
                    and not any(p.kind is p.VAR_POSITIONAL for p in parameters.values()):
                raise ConfigError(f"Reward {reward_name!r}: python:{spec} must take (images, prompts, **options) "
                                  "or a single RewardInputs argument.")
            for key in self.options:
                if not var_keyword and key not in named[2:]:
                    raise ConfigError(f"Reward {reward_name!r}: python:{spec} does not take the option {key!r} "
                                      f"(its parameters: {', '.join(named) or '(none)'}).")
            self.extra_fields = tuple(f for f in EXTRA_FIELDS if var_keyword or f in named)
        elif self.options:
            raise ConfigError(f"Reward {reward_name!r}: python:{spec} takes a single RewardInputs argument, so the "
                              f"options {sorted(self.options)} cannot be passed; use a class to take options.")

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        if self.takes_inputs:
            return as_scores(self.function(inputs))
        extras = {field: getattr(inputs, field) for field in self.extra_fields}
        return as_scores(self.function(inputs.images, list(inputs.prompts), **extras, **self.options))


def encode_png(images: torch.Tensor) -> list[str]:
    """(B, 3, H, W) in [0, 1] -> B base64-encoded PNG strings."""
    from PIL import Image

    encoded = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_png(data: str) -> torch.Tensor:
    """One base64 PNG (as `encode_png` writes) -> (3, H, W) float in [0, 1]. For reward servers."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@register_reward("http")
class HttpReward:
    """Client of a reward server (see the module docstring for the protocol).

    Options: `url` (required), `timeout` (seconds per request; 60), `retries` (extra attempts after
    a failure; 2), `retry_delay` (seconds before the first retry, doubling; 1.0), `headers` (extra
    HTTP headers, e.g. an Authorization token), `send_references` (also send target/source images).
    """

    name = "http"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, retry_delay: float = 1.0,
                 headers: dict | None = None, send_references: bool = False):
        scheme = urllib.parse.urlsplit(str(url)).scheme
        if scheme not in ("http", "https"):
            raise ConfigError(f"Reward 'http': url must start with http:// or https://; got {url!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"Reward 'http': retries must be an integer >= 0; got {retries!r}.")
        if float(timeout) <= 0:
            raise ConfigError(f"Reward 'http': timeout must be > 0 seconds; got {timeout!r}.")
        self.url = str(url)
        self.timeout = float(timeout)
        self.retries = retries
        self.retry_delay = float(retry_delay)
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}
        self.send_references = send_references
        # Local servers are reached directly even when http_proxy is set for the outside world.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self.opener = urllib.request.build_opener(*handlers)

    def payload(self, inputs: RewardInputs) -> bytes:
        body: dict[str, Any] = {"images": encode_png(inputs.images), "prompts": list(inputs.prompts)}
        if inputs.metadata is not None:
            body["metadata"] = inputs.metadata
        if self.send_references:
            for field in ("target_images", "source_images"):
                value = getattr(inputs, field)
                if value is not None:
                    body[field] = encode_png(value)
        return json.dumps(body, default=str).encode("utf-8")

    def _post(self, data: bytes) -> Any:
        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        with self.opener.open(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        data = self.payload(inputs)
        attempts = self.retries + 1
        last_error: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
            try:
                reply = self._post(data)
                break
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                last_error = RuntimeError(f"HTTP {error.code} {error.reason}: {detail}")
                if error.code != 429 and error.code < 500:
                    raise RuntimeError(f"reward server {self.url} refused the request: {last_error}") from error
            except (urllib.error.URLError, OSError) as error:  # connection refused, timeouts, resets
                last_error = error
            except json.JSONDecodeError as error:
                raise RuntimeError(f"reward server {self.url} did not answer JSON: {error}") from error
        else:
            raise RuntimeError(f"reward server {self.url} failed after {attempts} attempt(s): "
                               f"{type(last_error).__name__}: {last_error}") from last_error
        if not isinstance(reply, dict) or "scores" not in reply:
            keys = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
            raise RuntimeError(f"reward server {self.url} answered without 'scores' (got {keys}); "
                               "expected {\"scores\": [one number per image]}.")
        try:
            scores = as_scores(reply["scores"])
        except TypeError as error:
            raise RuntimeError(f"reward server {self.url} answered unusable scores: {error}") from error
        if scores.shape[0] != len(inputs):
            raise RuntimeError(f"reward server {self.url} returned {scores.shape[0]} scores for {len(inputs)} images.")
        return scores
