"""Tokenizers built offline for the tiny models.

Each builder writes files in the layout the real tokenizer class loads with `from_pretrained`,
so the tiny pipelines exercise the same loading code as the real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level mapping: every byte gets a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def build_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write a byte-level CLIP tokenizer (vocab.json, merges.txt) that `CLIPTokenizer` loads.

    The vocabulary holds every byte character, alone and as a word ending (`</w>`), plus a few
    merges of common English pairs so that prompts tokenize to fewer, more meaningful tokens.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = ["t h", "h e</w>", "a n", "i n", "e r", "o n", "r e", "th e</w>", "o f</w>"]
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in vocab_list:
            vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def clip_vocab_size() -> int:
    return 2 * 256 + 9 + 2
