"""Typed config mapping: defaults, YAML round trip, and helpful errors."""
import pytest

from runtime.config import (DistillConfig, RunConfig, from_dict, load_config, quick_config,
                            to_dict)
from runtime.errors import BckdError


def test_defaults_round_trip_through_dict():
    cfg = RunConfig()
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg
    assert isinstance(again.data.input_size, tuple)


def test_yaml_overrides_and_coerces(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  width: 1\n  backbone: resnet34\nstudent_train:\n"
                    "  crop_size: [96, 64]\n  lr: 1\nmethods: [none]\n")
    cfg = load_config(path)
    assert cfg.student.width == 1.0 and isinstance(cfg.student.width, float)
    assert cfg.student.backbone == "resnet34"
    assert cfg.student_train.crop_size == (96, 64)
    assert cfg.methods == ("none",)
    assert cfg.teacher == RunConfig().teacher  # untouched sections keep defaults


@pytest.mark.parametrize("text, needle", [
    ("studnet:\n  width: 1.0\n", "did you mean 'student'"),
    ("student:\n  widht: 1.0\n", "did you mean 'width'"),
    ("student:\n  width: wide\n", "student.width' must be float"),
    ("student_train:\n  crop_size: [1, 2, 3]\n", "must have 2 items"),
    ("student_train:\n  epochs: true\n", "must be int"),
    ("- a\n- b\n", "mapping"),
    ("student: [unclosed\n", "not valid YAML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(BckdError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(BckdError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_distill_config_and_quick_config():
    cfg = from_dict(DistillConfig, {"model": {"head": "deeplabv3plus"},
                                    "kd": {"method": "kd", "options": {"kd": {"tau": 2}}}})
    assert cfg.model.head == "deeplabv3plus" and cfg.kd.options == {"kd": {"tau": 2}}
    with pytest.raises(BckdError, match="kd.options.kd' must be a mapping"):
        from_dict(DistillConfig, {"kd": {"options": {"kd": 3}}})
    quick = quick_config()
    assert quick.data.synth.n_train < RunConfig().data.synth.n_train
