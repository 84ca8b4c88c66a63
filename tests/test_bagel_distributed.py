"""BAGEL's loss normalisation over processes: with DDP (gradients averaged over ranks), every token
weighs the same whichever rank it is on, as in the official recipe: the two-process gradient equals
the one-process gradient of (sum over both packs) / (tokens of both packs)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm_training.models.bagel.loading import load_bagel, load_bagel_tokenizer
from glm_training.models.bagel.model import token_weights
from glm_training.models.bagel.packing import (
    BagelSample,
    PackingConfig,
    TextItem,
    VaeImageItem,
    pack_samples,
)
from glm_training.models.bagel.tiny import build_tiny_bagel

CHECKED = ("language_model.lm_head.weight", "llm2vae.weight")


def packs(model, tokenizer, special):
    """Two packs of very different text / image token counts (one per rank)."""
    from PIL import Image

    image = Image.new("RGB", (16, 16), (200, 40, 90))
    packing = PackingConfig.for_model(model.bagel_config, vae_max_size=16, vae_min_size=16,
                                      vit_max_size=16, vit_min_size=16).without_dropout()
    first = [BagelSample([TextItem("question"), TextItem("a long answer with many many words in it", loss=True)])]
    second = [BagelSample([TextItem("red", cfg=True), VaeImageItem(image, loss=True)]),
              BagelSample([TextItem("hi"), TextItem("yes", loss=True)])]
    return [pack_samples(samples, tokenizer, special, model.bagel_config, packing, rng=random.Random(0))
            for samples in (first, second)]


def sums(model, batch, seed: int) -> tuple[torch.Tensor, int, torch.Tensor, int]:
    out = model.forward_losses(batch, generator=torch.Generator().manual_seed(seed))
    return (out["text_token_ce"].sum(), int(out["n_text_tokens"]),
            out["image_mse_per_sample"].sum(), int(out["n_image_tokens"]))


def load(tiny_dir: Path):
    model = load_bagel(tiny_dir)
    model.set_trainable("both")
    tokenizer, special = load_bagel_tokenizer(tiny_dir)
    return model, tokenizer, special


def worker(rank: int, tiny_dir: Path, init_file: Path, out_dir: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, tokenizer, special = load(tiny_dir)
        text, n_text, image, n_image = sums(model, packs(model, tokenizer, special)[rank], seed=rank)
        text_weight, image_weight = token_weights(n_text, n_image)
        loss = text * text_weight + image * image_weight
        loss.backward()
        grads = {}
        for name, param in model.named_parameters():
            if name in CHECKED:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                dist.all_reduce(grad)  # what DDP does: the mean over ranks
                grads[name] = grad / 2
        torch.save(grads, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_weigh_every_token_equally(tmp_path) -> None:
    tiny_dir = build_tiny_bagel(tmp_path / "tiny", seed=0)
    mp.spawn(worker, args=(tiny_dir, tmp_path / "init", tmp_path), nprocs=2, join=True)

    model, tokenizer, special = load(tiny_dir)
    results = [sums(model, batch, seed=rank) for rank, batch in enumerate(packs(model, tokenizer, special))]
    counts = [r[1] for r in results], [r[3] for r in results]
    assert counts[0][0] != counts[0][1] and counts[1][0] != counts[1][1]  # the ranks really differ
    text = sum(r[0] for r in results) / sum(counts[0])
    image = sum(r[2] for r in results) / sum(counts[1])
    (text + image).backward()
    expected = {name: p.grad for name, p in model.named_parameters() if name in CHECKED}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in CHECKED:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
