"""On-disk cache of prompt embeddings and image latents (safetensors).

Entries are keyed by content, never by path alone: the bytes of the image (or the prompt text),
the model's fingerprint (its config and weight files), the size the image was cropped to (the
resolution, or the (height, width) of its aspect-ratio bucket) and the augmentation that changes
the result (flip). Renaming a file reuses its entry; editing a file or swapping the
model makes a new one, so caches from different runs never collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SAMPLE_BYTES = 1 << 16


def _hash_file_sample(path: Path, digest: "hashlib._Hash") -> None:
    """Size plus the first and last 64 KiB: weight files differ there when they differ at all
    (safetensors headers hold every tensor's shape and offset)."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            handle.seek(-_SAMPLE_BYTES, os.SEEK_END)
            digest.update(handle.read(_SAMPLE_BYTES))


@lru_cache(maxsize=16)
def fingerprint_model_dir(path: str, revision: str | None = None, variant: str | None = None) -> str:
    digest = hashlib.sha256(f"variant={variant}".encode())
    root = Path(path)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(path, revision=revision, local_files_only=True))
        except Exception:  # not downloaded yet: the id and revision are all we know
            digest.update(f"{path}@{revision}".encode())
            return digest.hexdigest()[:20]
    for file in sorted(root.rglob("*")):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
            digest.update(str(file.relative_to(root)).encode())
            _hash_file_sample(file, digest)
    return digest.hexdigest()[:20]


@lru_cache(maxsize=100_000)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes (memoised per path, size and mtime)."""
    stat = os.stat(path)
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class EmbeddingCache:
    def __init__(self, root: str | Path, model_fingerprint: str):
        self.dir = Path(root) / model_fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def prompt_key(self, prompt: str, control_images: list[Path] | None = None) -> str:
        controls = [file_digest(p) for p in control_images or []]
        return _key("prompt", prompt, controls)

    def latent_key(self, image: Path, size: int | tuple[int, int], flip: bool, role: str = "target") -> str:
        """`size`: the side of a square crop, or the (height, width) the image was cropped to (its
        aspect-ratio bucket), so different buckets never share an entry. A square (h, h) keys like
        h: resize-to-cover + center crop gives the same pixels with or without buckets."""
        if not isinstance(size, int):
            height, width = (int(v) for v in size)
            size = height if height == width else [height, width]
        return _key("latents", role, file_digest(image), size, bool(flip))

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.exists():
            return None
        return load_file(str(path))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)  # readers never see half-written entries
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.rglob("*.safetensors"))
