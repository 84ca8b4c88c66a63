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


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (Qwen2 / GLM-Image style) learned offline from a small corpus.
# ---------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split (the same regex `Qwen2Tokenizer` uses), so that the words we learn
# merges for are exactly the pieces the real tokenizer sees.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-VL special tokens, in the order (and so the relative ids) of the real vocabulary,
# where they start at 151643.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Words that tiny-model prompts commonly use, learned as single tokens like in a real vocabulary.
COMMON_PROMPT_TEXT = (
    "a an the of on in with and or to into at by for from is are this that it its as make turn change "
    "add remove replace keep put edit draw photo picture image painting render style scene background "
    "red green blue yellow white black orange purple pink gray brown color colour bright dark light "
    "circle square triangle rectangle star shape shapes small large big tiny left right top bottom "
    "center middle cat dog bird tree house car sky sea sun moon flower person man woman text sign "
    "A The Make Turn Change Add Remove Draw Put Picture"
)


def _byte_level_words(text: str) -> list[str]:
    """Split `text` like Qwen2's pre-tokenizer and map each piece to byte-level characters."""
    from tokenizers import Regex, pre_tokenizers

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def learn_bpe_merges(corpus: list[str], special_tokens: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges until every word of `corpus` is a single token.

    A plain, deterministic BPE learner (most frequent pair first, ties broken by the pair itself):
    encoding a corpus word with the learned merges then yields exactly one token, which is how a
    real large vocabulary treats common words. Special tokens are cut out of the text first.
    """
    import re
    from collections import Counter

    words: Counter[str] = Counter()
    split = re.compile("|".join(re.escape(token) for token in special_tokens)) if special_tokens else None
    for text in corpus:
        for chunk in (split.split(text) if split else [text]):
            words.update(_byte_level_words(chunk))
    segments = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = segments[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        for word, symbols in segments.items():
            index, out = 0, []
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    out.append(merged)
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            segments[word] = out


def byte_level_bpe_vocab(
    corpus: list[str], special_tokens: tuple[str, ...] = (), leading_tokens: tuple[str, ...] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (`leading_tokens`, 256 byte characters, merged tokens) and merges for `corpus`."""
    merges = learn_bpe_merges(corpus, special_tokens)
    vocab: dict[str, int] = {}
    for token in list(leading_tokens) + list(bytes_to_unicode().values()) + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def qwen_image_tokenizer_corpus() -> list[str]:
    """Text the Qwen-Image pipelines feed their tokenizer: prompt templates plus common words.

    The templates are read from the installed diffusers pipelines, so the tiny vocabulary follows
    them if they change (the tests then check that the dropped prefix still has the real length).
    """
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    corpus = [COMMON_PROMPT_TEXT]
    for pipeline_class in (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline):
        corpus.append(_pipeline_prompt_template(pipeline_class))
    corpus.append("Picture 1: Picture 2: Picture 3: ")
    return corpus


def _pipeline_prompt_template(pipeline_class) -> str:
    """The `prompt_template_encode` a Qwen-Image pipeline sets in its __init__ (built without
    components: the template does not depend on them)."""
    import inspect

    names = [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]
    return pipeline_class(**dict.fromkeys(names)).prompt_template_encode


def build_qwen2_tokenizer(out_dir: str | Path, model_max_length: int = 32768):
    """Write and return a byte-level BPE `Qwen2Tokenizer` with the Qwen2-VL special tokens.

    Every word of the Qwen-Image prompt templates is one token, as in the real Qwen2 vocabulary,
    so the pipelines' fixed template-prefix drop (34 / 64 tokens) removes exactly the template.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe_vocab(qwen_image_tokenizer_corpus(), QWEN2_VL_SPECIAL_TOKENS)
    for token in QWEN2_VL_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
        errors="replace",
    )
    tokenizer.save_pretrained(out_dir)
    return Qwen2Tokenizer.from_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# T5 (unigram) and ByT5.
# ---------------------------------------------------------------------------------------------

def build_t5_tokenizer(out_dir: str | Path, model_max_length: int = 512):
    """Write and return a small unigram `T5Tokenizer` (pad=0, </s>=1, <unk>=2 like T5).

    Pieces: every printable ASCII character alone and after the word marker "▁", plus common prompt
    words as whole pieces (scored higher, so a known word is one token).
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {piece for piece, _ in pieces}
    for word in dict.fromkeys(COMMON_PROMPT_TEXT.replace(",", " ").replace(".", " ").split()):
        for piece in (word, "\u2581" + word):
            if piece not in seen:
                pieces.append((piece, -6.0))
                seen.add(piece)
    for code in range(ord("!"), ord("~") + 1):
        for piece in (chr(code), "\u2581" + chr(code)):
            if piece not in seen:
                pieces.append((piece, -10.0 if len(piece) == 1 else -9.0))
                seen.add(piece)
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    return T5Tokenizer.from_pretrained(out_dir)


def build_byt5_tokenizer(out_dir: str | Path):
    """Write and return a `ByT5Tokenizer` (bytes need no vocabulary file)."""
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(out_dir)
    return ByT5Tokenizer.from_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# GLM-Image AR tokenizer.
# ---------------------------------------------------------------------------------------------

GLM_IMAGE_EXTRA_TOKENS = ("<|image|>", "<sop>", "<eop>", "<|endoftext|>")


def glm_image_dit_token(index: int) -> str:
    return f"<|dit_token_{index}|>"


def build_glm_image_tokenizer(out_dir: str | Path, codebook_size: int, model_max_length: int = 8192):
    """Write and return the GLM-Image AR tokenizer (a byte-level BPE `TokenizersBackend`).

    Like the real one, ids 0..codebook_size-1 are the image tokens `<|dit_token_i|>`, followed by
    the image start (`bos`, `<|dit_token_{codebook_size}|>`) and end tokens; then text. The
    processor reads `image_token`, `grid_bos_token` and `grid_eos_token` from it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dit_tokens = tuple(glm_image_dit_token(i) for i in range(codebook_size + 2))
    vocab, merges = byte_level_bpe_vocab([COMMON_PROMPT_TEXT, "<sop>16 16<eop> 0123456789"],
                                         GLM_IMAGE_EXTRA_TOKENS, leading_tokens=dit_tokens)
    for token in GLM_IMAGE_EXTRA_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in dit_tokens + GLM_IMAGE_EXTRA_TOKENS])
    start, end = dit_tokens[codebook_size], dit_tokens[codebook_size + 1]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=start,
        eos_token=end,
        pad_token=end,
        image_token="<|image|>",
        grid_bos_token="<sop>",
        grid_eos_token="<eop>",
        model_max_length=model_max_length,
        padding_side="left",
    )
    tokenizer.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)
