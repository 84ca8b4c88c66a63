"""Small synthetic datasets (coloured shapes) for the quickstart, tests and benchmarks."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, background: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size // 2)
    cx, cy = rng.randint(extent // 2 + 2, size - extent // 2 - 2), rng.randint(extent // 2 + 2, size - extent // 2 - 2)
    box = (cx - extent // 2, cy - extent // 2, cx + extent // 2, cy + extent // 2)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx, box[1])], fill=COLOURS[colour])
    return image


def make_shapes_dataset(out_dir: str | Path, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Folder-format dataset: prompts.txt + target_images/NNNN.png, one shape per image."""
    out_dir = Path(out_dir)
    images_dir = out_dir / "target_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        draw_shape(shape, colour, background, size, rng).save(images_dir / f"{index:04d}.png", optimize=True)
        prompts.append(f"a {colour} {shape} on a {background} background")
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return out_dir


def make_colour_preference_pairs(out_dir: str | Path, count: int = 16, size: int = 32, seed: int = 0,
                                 chosen: str = "red", rejected: str = "blue") -> Path:
    """pairs.jsonl where chosen and rejected images show the same shape at the same place, on a
    background of the chosen or the rejected colour: a preference a model can learn quickly."""
    import json

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        shape, _ = rng.choice(SHAPES), rng.choice(["white", "black"])  # the second draw keeps old datasets identical
        state = rng.getstate()
        for background in (chosen, rejected):
            rng.setstate(state)  # same size and position in both images
            image = draw_shape(shape, "yellow", "white", size, rng)
            pixels = image.load()
            for y in range(size):
                for x in range(size):
                    if pixels[x, y] == BACKGROUNDS["white"]:
                        pixels[x, y] = COLOURS[background]
            image.save(out_dir / "images" / f"{index:04d}_{background}.png")
        rows.append({"prompt": f"a yellow {shape}",
                     "chosen": f"images/{index:04d}_{chosen}.png", "rejected": f"images/{index:04d}_{rejected}.png"})
    (out_dir / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out_dir / "pairs.jsonl"


def make_edit_dataset(out_dir: str | Path, count: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Image-to-image dataset in the seed-000 layout: source_images/NNNN.png (a shape),
    target_images/NNNN.png (the same shape, same place, recoloured) and prompts.txt ("make the
    circle blue")."""
    out_dir = Path(out_dir)
    for folder in ("source_images", "target_images"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        shape, background = rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        source, target = rng.sample(list(COLOURS), 2)
        state = rng.getstate()
        for folder, colour in (("source_images", source), ("target_images", target)):
            rng.setstate(state)  # same size and position in both images
            draw_shape(shape, colour, background, size, rng).save(out_dir / folder / f"{index:04d}.png", optimize=True)
        prompts.append(f"make the {shape} {target}")
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return out_dir
