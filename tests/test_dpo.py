"""Diffusion-DPO on the tiny SDXL: log 2 at the reference, and held-out accuracy rises."""

import math

import pytest

from glm_training.config import DataConfig, config_from_dict
from glm_training.data.datasets import DataError, load_records
from glm_training.data.synthetic import make_colour_preference_pairs
from glm_training.trainers.dpo import DPOTrainer

from conftest import sdxl_config


def test_pairs_are_validated_up_front(tmp_path):
    manifest = make_colour_preference_pairs(tmp_path / "p", count=3, size=16)
    (tmp_path / "p" / "images" / "0001_blue.png").unlink()
    with pytest.raises(DataError, match=r"0001_blue.png: file not found"):
        load_records(DataConfig(path=manifest), {"prompt", "chosen", "rejected"})
    assert len(load_records(DataConfig(path=manifest, on_error="skip"), {"prompt", "chosen", "rejected"})) == 2


def test_dpo_starts_at_log2_and_learns_the_preference(tmp_path):
    train_pairs = make_colour_preference_pairs(tmp_path / "train", count=16, size=32, seed=0)
    held_out = load_records(DataConfig(path=make_colour_preference_pairs(tmp_path / "eval", count=8, size=32, seed=1)),
                            {"prompt", "chosen", "rejected"})
    # Chosen images have a red background, rejected ones a blue one (same shape, same place).
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2"]
    raw = sdxl_config(tmp_path, train_pairs, training={"method": "dpo", "max_train_steps": 60, "batch_size": 4,
                                                       "learning_rate": 3e-3},
                      lora={"rank": 8, "alpha": 8, "target_modules": targets}, dpo={"beta": 2000.0})
    trainer = DPOTrainer(config_from_dict(raw))
    trainer.setup()
    before = trainer.evaluate(held_out)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert before["implicit_acc"] == pytest.approx(0.5)
    run_dir = trainer.train()
    after = trainer.evaluate(held_out)
    assert after["implicit_acc"] >= 0.8, (before, after)  # held-out pairs: the preference generalises
    assert after["reward_margin"] > 0
    logged = (run_dir / "metrics.jsonl").read_text()
    for key in ("implicit_acc", "reward_margin", "policy_mse_gap", "ref_mse_gap"):
        assert key in logged
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_pickapic_parquet_layout_drops_ties(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
        return buffer.getvalue()

    red, blue, green = jpeg("red"), jpeg("blue"), jpeg("green")
    table = pa.table({"caption": ["a", "b", "c"], "jpg_0": [red, blue, green], "jpg_1": [blue, red, red],
                      "label_0": [1.0, 0.0, 0.5]})
    pq.write_table(table, tmp_path / "train-0.parquet")
    pairs = load_records(DataConfig(path=tmp_path), {"prompt", "chosen", "rejected"})
    assert [p.prompt for p in pairs] == ["a", "b"]  # the tie is dropped
    for pair in pairs:  # red is preferred in both rows
        assert Image.open(pair.chosen).getpixel((8, 8))[0] > 200
        assert Image.open(pair.rejected).getpixel((8, 8))[2] > 200
