import pytest
import yaml

from glm_training.cli import main
from glm_training.config import ConfigError, config_from_dict, load_config

from conftest import REPO

BASE = {"model": {"pretrained_model_name_or_path": "tiny:sdxl"}, "data": {"path": "data/quickstart"}}


def build(**sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def test_defaults_and_types():
    cfg = build(training={"learning_rate": "1e-4", "batch_size": "4"})
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.training.batch_size == 4
    assert cfg.lora.enabled and cfg.optimizer.name == "adamw"


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"Unknown key 'training.learnig_rate'. Did you mean 'learning_rate'\?"):
        build(training={"learnig_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"Unknown key 'optimiser'. Did you mean 'optimizer'\?"):
        config_from_dict({**BASE, "optimiser": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"training.batch_size: expected an integer, got 'four'"):
        build(training={"batch_size": "four"})
    with pytest.raises(ConfigError, match=r"lora.enabled: expected true or false"):
        build(lora={"enabled": "maybe"})
    with pytest.raises(ConfigError, match=r"training.batch_size: 0 is below the minimum 1"):
        build(training={"batch_size": 0})


def test_bad_choice_suggests():
    with pytest.raises(ConfigError, match=r"training.mixed_precision: 'bf61' is not one of .* Did you mean 'bf16'"):
        build(training={"mixed_precision": "bf61"})


def test_missing_required_field():
    with pytest.raises(ConfigError, match=r"Missing required key 'model.pretrained_model_name_or_path'"):
        config_from_dict({"model": {}, "data": {"path": "x"}})
    with pytest.raises(ConfigError, match=r"Missing required key 'data.path'"):
        config_from_dict({"model": {"pretrained_model_name_or_path": "x"}})


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"lora.save_format: comfyui output needs LoRA"):
        build(lora={"enabled": False, "save_format": "comfyui"})
    with pytest.raises(ConfigError, match=r"sdxl has no control-image input"):
        build(training={"mode": "i2i"})
    with pytest.raises(ConfigError, match=r"must be a multiple of grpo.num_generations"):
        build(training={"method": "grpo", "batch_size": 3}, reward={"rewards": {"brightness": {}}})


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["training.learning_rate=3e-5", "lora.rank=4", "logging.sample_prompts=[a, b]"])
    assert cfg.training.learning_rate == pytest.approx(3e-5)
    assert cfg.lora.rank == 4 and cfg.logging.sample_prompts == ["a", "b"]
    with pytest.raises(ConfigError, match=r"Unknown key 'lora.rnak'. Did you mean 'rank'"):
        load_config(path, ["lora.rnak=4"])
    with pytest.raises(ConfigError, match=r"Config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "training": {"learnig_rate": 1}}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Did you mean 'learning_rate'" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)
