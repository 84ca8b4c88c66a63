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


def test_duplicate_keys_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  pretrained_model_name_or_path: tiny:sdxl\ndata:\n  path: x\n"
                    "training:\n  batch_size: 2\nmodel:\n  family: sdxl\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 7: key 'model' is given twice .*first on line 1"):
        load_config(path)
    path.write_text("model:\n  pretrained_model_name_or_path: tiny:sdxl\ndata:\n  path: x\n  path: y\n")
    with pytest.raises(ConfigError, match=r"line 5: key 'path' is given twice .*first on line 4"):
        load_config(path)


BAGEL = {"model": {"family": "bagel", "pretrained_model_name_or_path": "tiny:bagel"}, "data": {"path": "d"}}


def test_family_section_and_the_deprecated_bagel_keys(caplog):
    cfg = config_from_dict({**BAGEL, "bagel": {"image_loss_weight": 2.0}})
    assert cfg.family_options.image_loss_weight == 2.0 and cfg.family_options.text_loss_weight == 1.0
    with pytest.raises(ConfigError, match=r"Unknown key 'bagel.image_los_weight'. Did you mean 'image_loss_weight'"):
        config_from_dict({**BAGEL, "bagel": {"image_los_weight": 2.0}})
    with pytest.raises(ConfigError, match=r"bagel: this section configures model.family bagel, but model.family is sdxl"):
        config_from_dict({**BASE, "bagel": {"text_loss_weight": 0.5}})
    with caplog.at_level("WARNING", logger="glm_training.config"):
        cfg = config_from_dict({**BAGEL, "training": {"text_loss_weight": 0.5}})
    assert cfg.family_options.text_loss_weight == 0.5
    assert any("training.text_loss_weight is deprecated: it is now bagel.text_loss_weight" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ConfigError, match=r"training.text_loss_weight and bagel.text_loss_weight are both set"):
        config_from_dict({**BAGEL, "training": {"text_loss_weight": 0.5}, "bagel": {"text_loss_weight": 1.0}})
    with pytest.raises(ConfigError, match=r"Unknown key 'training.text_loss_weight'"):  # not a bagel config
        build(training={"text_loss_weight": 0.5})


def test_config_check_asks_the_family_declarations(monkeypatch):
    """A family registered from outside glm_training: its declarations drive the checks."""
    import dataclasses

    from glm_training.models import base
    from glm_training.models.sdxl import SDXLFamily

    @dataclasses.dataclass
    class Options:
        strength: float = 1.0

    class EditOnly(SDXLFamily):
        name = "edit_only"
        modes = ("i2i",)
        max_control_images = 2
        methods = ("sft",)
        options = Options

    monkeypatch.setitem(base._FAMILIES, "edit_only", EditOnly)  # register_family, undone after the test
    base.register_family("edit_only", EditOnly)
    raw = {"model": {"family": "edit_only", "pretrained_model_name_or_path": "x"}, "data": {"path": "d"},
           "training": {"mode": "i2i"}}
    assert config_from_dict({**raw, "edit_only": {"strength": 0.5}}).family_options == Options(0.5)
    with pytest.raises(ConfigError, match=r"model.family: edit_only is an edit model; set training.mode: i2i"):
        config_from_dict({**raw, "training": {"mode": "t2i"}})
    with pytest.raises(ConfigError, match=r"training.method: dpo is not supported by edit_only; use one of \['sft'\]"):
        config_from_dict({**raw, "training": {"mode": "i2i", "method": "dpo"}})
    with pytest.raises(ConfigError, match=r"training.mode: i2i needs an edit family \(.*edit_only.*\); sdxl has no"):
        build(training={"mode": "i2i"})
    with pytest.raises(ConfigError, match=r"model.family: unknown family 'edit_onyl'. Did you mean 'edit_only'"):
        config_from_dict({**raw, "model": {"family": "edit_onyl", "pretrained_model_name_or_path": "x"}})


def test_bagel_reads_data_caption_dropout(tmp_path):
    from glm_training.models.base import build_family

    family = build_family(config_from_dict({**BAGEL, "data": {"path": "d", "caption_dropout": 0.35,
                                                              "resolution": 16}}))
    assert family.packing().text_cond_dropout == 0.35
    family = build_family(config_from_dict({**BAGEL, "data": {"path": "d", "resolution": 16}}))
    assert family.packing().text_cond_dropout == 0.0  # the same default as every family
