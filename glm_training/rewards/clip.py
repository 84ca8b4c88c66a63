"""CLIP-based rewards: `clip_score` (prompt-image alignment) and `aesthetic` (LAION aesthetic
predictor on CLIP image embeddings).

CLIP is loaded with `CLIPModel.from_pretrained(model)` plus the checkpoint's own tokenizer and
image processor (`AutoTokenizer`, `AutoImageProcessor`), from a local folder or a hub id (no
remote code). `model: tiny:clip` builds the tiny random-weight CLIP used in tests. One loaded
CLIP is shared by every reward that names the same (model, device, dtype).

The aesthetic head is LAION's improved aesthetic predictor (github.com/christophschuhmann/
improved-aesthetic-predictor), an MLP on the L2-normalised CLIP image embedding. Its weights are
read from a `.safetensors` file (or the official `.pth` state dict, loaded with
`weights_only=True`) with the keys

    layers.0.weight (1024, D)  layers.0.bias (1024)     # Linear(D, 1024), then Dropout(0.2)
    layers.2.weight (128, 1024) layers.2.bias (128)     # Linear(1024, 128), then Dropout(0.2)
    layers.4.weight (64, 128)  layers.4.bias (64)       # Linear(128, 64), then Dropout(0.1)
    layers.6.weight (16, 64)   layers.6.bias (16)       # Linear(64, 16)
    layers.7.weight (1, 16)    layers.7.bias (1)        # Linear(16, 1)

where D is CLIP's projection dim (768 for ViT-L/14, which the official head was trained on).
The older linear head (`sa_0_4_vit_l_14_linear.pth`: keys `weight` (1, D), `bias` (1)) works too.
A `model.`/`mlp.` prefix on every key is stripped.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from glm_training.config import ConfigError
from glm_training.rewards.base import RewardInputs, register_reward, require, resolve_device

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DTYPES = {None: torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

_CACHE: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()


def clear_clip_cache() -> None:
    """Forget every loaded CLIP model/tokenizer (frees their memory once no reward holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


#: "prefix" -> function turning the name after "prefix:" into a local folder. Filled by the
#: layers that provide such models (glm_training.models.tiny registers "tiny"), so rewards import
#: nothing above them.
MODEL_SOURCES: dict[str, Callable[[str], str | Path]] = {}


def register_model_source(prefix: str, resolve: Callable[[str], str | Path]) -> None:
    """Let the reward option `model: <prefix>:<name>` name a model that `resolve(name)` provides."""
    MODEL_SOURCES[prefix] = resolve


def resolve_clip_path(model: str) -> str:
    """`<prefix>:<name>` of a registered model source (`tiny:clip`) -> its folder; anything else unchanged."""
    prefix, sep, name = model.partition(":")
    if sep and prefix in MODEL_SOURCES:
        return str(MODEL_SOURCES[prefix](name))
    if sep and prefix == "tiny":
        raise ConfigError(f"reward option model: {model!r} is a tiny test model, built by glm_training.models.tiny; "
                          "import that module first (it registers the 'tiny:' prefix) or pass the folder of "
                          "glm_training.models.tiny.ensure_tiny('clip').")
    return model


def _load_error(model: str, error: Exception) -> OSError:
    return OSError(f"Could not load CLIP from {model!r}: {error}. Set the reward option `model` to a local "
                   "folder holding a CLIP checkpoint (config.json, model.safetensors, tokenizer files and the "
                   "image processor config, as saved by save_pretrained) or to a hub id that is reachable "
                   "(or already in the Hugging Face cache when offline).")


def _cached(key: tuple, load):
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load()
        return _CACHE[key]


def load_clip(model: str, device: torch.device, dtype: torch.dtype):
    """(CLIPModel in eval mode on `device`, image processor), shared per (model, device, dtype)."""
    transformers = require("transformers", "transformers", "CLIP rewards")
    path = resolve_clip_path(model)

    def load():
        try:
            clip = transformers.CLIPModel.from_pretrained(path, dtype=dtype)
            processor = transformers.AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise _load_error(model, error) from error
        return clip.eval().requires_grad_(False).to(device), processor

    return _cached(("model", path, str(device), str(dtype)), load)


def load_clip_tokenizer(model: str):
    transformers = require("transformers", "transformers", "CLIP rewards")
    path = resolve_clip_path(model)

    def load():
        try:
            return transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise _load_error(model, error) from error

    return _cached(("tokenizer", path), load)


def _dtype(value: str | None, reward: str) -> torch.dtype:
    if value not in DTYPES:
        raise ConfigError(f"Reward {reward!r}: dtype must be one of fp32, fp16, bf16; got {value!r}.")
    return DTYPES[value]


class ClipEncoder:
    """Normalised CLIP image and text embeddings (float32) for images in [0, 1]."""

    def __init__(self, model: str, device: str | None, dtype: str | None, reward: str):
        self.model_name = model
        self.device = resolve_device(device)
        self.dtype = _dtype(dtype, reward)
        self.model, self.image_processor = load_clip(model, self.device, self.dtype)
        self._lock = threading.Lock()

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        # The checkpoint's own processor (resize, centre crop, normalise); images are already in [0, 1].
        pixels = self.image_processor(images=images.detach().float().cpu(), do_rescale=False,
                                      return_tensors="pt")["pixel_values"]
        with torch.no_grad(), self._lock:
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
            embeddings = self.model.visual_projection(pooled).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = load_clip_tokenizer(self.model_name)
        max_length = min(int(tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad(), self._lock:
            pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            embeddings = self.model.text_projection(pooled).float()
        return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register_reward("clip_score")
class ClipScoreReward:
    """Prompt-image alignment: `scale * cos(CLIP image embedding, CLIP text embedding)`.

    With `scale: 1` (default) the score is the plain cosine in [-1, 1] (real CLIP ViT-L/14 gives
    about 0.2-0.35 for matching pairs); `scale: 2.5` gives Hessel et al.'s CLIPScore without the
    clamp at 0. Prompts longer than CLIP's 77 tokens are truncated.
    Options: `model` (local folder, hub id or tiny:clip), `device`, `dtype` (fp32 | fp16 | bf16), `scale`.
    """

    name = "clip_score"

    def __init__(self, model: str = DEFAULT_CLIP, device: str | None = None, dtype: str | None = None,
                 scale: float = 1.0):
        self.encoder = ClipEncoder(model, device, dtype, self.name)
        self.scale = float(scale)

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        image = self.encoder.image_embeddings(inputs.images)
        text = self.encoder.text_embeddings(inputs.prompts)
        return (self.scale * (image * text).sum(dim=-1)).cpu()


class AestheticHead(nn.Module):
    """LAION's aesthetic predictor head (`kind="mlp"`, the improved predictor) or the older
    single linear layer (`kind="linear"`), on L2-normalised CLIP image embeddings of size `input_size`."""

    def __init__(self, input_size: int = 768, kind: str = "mlp"):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        elif kind == "linear":
            self.layers = nn.Linear(input_size, 1)
        else:
            raise ValueError(f"AestheticHead kind must be 'mlp' or 'linear'; got {kind!r}.")

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


MLP_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
LINEAR_KEYS = {"weight", "bias"}


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """Read an aesthetic head from `.safetensors` or `.pth`/`.pt`; see the module docstring for keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Aesthetic head file {path} (reward option `head`) does not exist. Use LAION's "
                                "improved-aesthetic-predictor weights (e.g. sac+logos+ava1-l14-linearMSE.pth) "
                                "or the same state dict saved as .safetensors.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"Aesthetic head {path}: expected a state dict, got {type(state).__name__}.")
    for prefix in ("model.", "mlp."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    keys = set(state)
    if keys == MLP_KEYS:
        head = AestheticHead(int(state["layers.0.weight"].shape[1]), "mlp")
    elif keys == LINEAR_KEYS:
        head = AestheticHead(int(state["weight"].shape[1]), "linear")
        state = {f"layers.{key}": value for key, value in state.items()}
    else:
        raise ValueError(f"Aesthetic head {path}: unexpected keys {sorted(keys)[:8]}; expected the LAION MLP keys "
                         f"{sorted(MLP_KEYS)} or a linear head's 'weight', 'bias'.")
    try:
        head.load_state_dict({key: value.float() for key, value in state.items()})
    except RuntimeError as error:
        raise ValueError(f"Aesthetic head {path}: tensor shapes do not match LAION's MLP: {error}") from error
    return head.eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticReward:
    """LAION aesthetic score (about 1 to 10 for real images with the official head) of each image.

    Options: `model` (CLIP folder, hub id or tiny:clip; the official head needs ViT-L/14),
    `head` (path to the head's .safetensors or .pth; default `<model folder>/aesthetic_head.safetensors`
    when that file exists), `device`, `dtype`.
    """

    name = "aesthetic"

    def __init__(self, model: str = DEFAULT_CLIP, head: str | None = None, device: str | None = None,
                 dtype: str | None = None):
        if head is None:
            local = Path(resolve_clip_path(model)) / "aesthetic_head.safetensors"
            if not local.is_file():
                raise ConfigError("Reward 'aesthetic' needs the option `head: /path/to/aesthetic_head.safetensors` "
                                  "(LAION improved-aesthetic-predictor weights for this CLIP; see "
                                  "glm_training/rewards/clip.py for the expected keys).")
            head = str(local)
        self.encoder = ClipEncoder(model, device, dtype, self.name)
        self.head = load_aesthetic_head(head).to(self.encoder.device)
        expected = self.head.layers[0].in_features if self.head.kind == "mlp" else self.head.layers.in_features
        if expected != self.encoder.projection_dim:
            raise ConfigError(f"Reward 'aesthetic': head {head} takes {expected}-d embeddings but CLIP {model!r} "
                              f"produces {self.encoder.projection_dim}-d ones; use the head trained for this CLIP.")

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        embeddings = self.encoder.image_embeddings(inputs.images)
        with torch.no_grad():
            return self.head(embeddings).float().cpu()
