import dataclasses
import re
import typing

import pytest

from flashdistill.config import ConfigError, describe, from_dict, load_config, merge, parse_overrides, to_dict
from flashdistill.methods.dsm import TeacherConfig
from flashdistill.train import TrainConfig


def test_defaults_round_trip():
    cfg = from_dict(TeacherConfig, {})
    assert cfg == TeacherConfig()
    assert from_dict(TeacherConfig, to_dict(cfg)) == cfg
    assert cfg.train.steps == 950 and cfg.train.ema_decay == 0.995 and cfg.channels == [32, 64]
    # list defaults are not shared between instances
    a, b = TeacherConfig(), TeacherConfig()
    a.channels.append(128)
    assert b.channels == [32, 64]


def test_unknown_key_rejected_naming_it():
    with pytest.raises(ConfigError, match=r"\['bogus'\]"):
        from_dict(TeacherConfig, {"bogus": 1})
    with pytest.raises(ConfigError, match=r"train\.nope"):
        from_dict(TeacherConfig, {"train": {"nope": 1}})


@pytest.mark.parametrize("data, key, value", [
    ({"train": {"steps": "5"}}, "train.steps", "'5'"),
    ({"train": {"steps": 2.5}}, "train.steps", "2.5"),
    ({"train": {"steps": True}}, "train.steps", "True"),
    ({"lr": True}, "lr", "True"),
    ({"lr": "fast"}, "lr", "'fast'"),
    ({"beta_schedule": "cosine"}, "beta_schedule", "'cosine'"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision", "'fp8'"),
    ({"channels": 8}, "channels", "8"),
    ({"channels": [8, "x"]}, "channels[1]", "'x'"),
    ({"dataset": 3}, "dataset", "3"),
])
def test_bad_types_rejected_naming_key_and_value(data, key, value):
    with pytest.raises(ConfigError) as e:
        from_dict(TeacherConfig, data)
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert value in msg, msg


def test_literal_error_lists_choices():
    with pytest.raises(ConfigError, match=r"expected one of \['scaled_linear', 'linear'\]"):
        from_dict(TeacherConfig, {"beta_schedule": "cosine"})


def test_int_accepted_for_float():
    cfg = from_dict(TeacherConfig, {"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_parse_overrides():
    assert parse_overrides(["train.steps=5", "channels=[8, 16]", "lr=0.5", "dataset=digits", "a.b.c=true"]) == {
        "train": {"steps": 5}, "channels": [8, 16], "lr": 0.5, "dataset": "digits", "a": {"b": {"c": True}}}
    # the value may itself contain '='
    assert parse_overrides(["dataset=x=y"]) == {"dataset": "x=y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])
    # YAML 1.2 booleans: only true/false; on/off/yes/no stay strings (choices such as w_mode=fixed or a
    # user's 'off' are not turned into False)
    assert parse_overrides(["a=off", "b=yes", "c=False", "d=[on, TRUE]"]) == {"a": "off", "b": "yes", "c": False,
                                                                            "d": ["on", True]}


def test_yaml_config_file_reads_yaml_12_booleans(tmp_path):
    from flashdistill.methods.lcm import LCMConfig

    p = tmp_path / "c.yaml"
    p.write_text("teacher: x\nfull: true\nw_mode: fixed\nloss: l2\nlora_targets: [on, off]\n")
    cfg = load_config(LCMConfig, str(p), ["full=True"])
    assert cfg.full is True and cfg.w_mode == "fixed" and cfg.lora_targets == ["on", "off"]


def test_set_overrides_build_config():
    cfg = load_config(TeacherConfig, None, ["train.steps=5", "channels=[8,16]", "lr=0.0005", "train.seed=3"])
    assert cfg.train.steps == 5 and cfg.train.seed == 3
    assert cfg.channels == [8, 16]
    assert cfg.lr == 0.0005


def test_scientific_notation_float():
    assert load_config(TeacherConfig, None, ["lr=1e-3"]).lr == pytest.approx(1e-3)


def test_merge_is_nested_and_does_not_mutate():
    base = {"train": {"steps": 10, "batch_size": 4}, "lr": 0.1}
    over = {"train": {"steps": 5}, "channels": [8]}
    merged = merge(base, over)
    assert merged == {"train": {"steps": 5, "batch_size": 4}, "lr": 0.1, "channels": [8]}
    assert base == {"train": {"steps": 10, "batch_size": 4}, "lr": 0.1}


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.01\nchannels: [16, 32]\ntrain:\n  steps: 10\n  batch_size: 4\n")
    cfg = load_config(TeacherConfig, str(p), ["train.steps=7"])
    assert cfg.lr == 0.01 and cfg.channels == [16, 32]
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4  # nested merge keeps batch_size
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(TeacherConfig, str(empty)) == TeacherConfig()


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TeacherConfig, str(tmp_path / "missing.yaml"))
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TeacherConfig, str(p))
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(TeacherConfig, str(p))


def _all_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def test_describe_lists_every_field():
    lines = describe(TeacherConfig)
    keys = [re.match(r"^([\w.]+) \(", line).group(1) for line in lines]
    assert sorted(keys) == sorted(_all_keys(TeacherConfig))
    assert "train.batch_size" in keys and "prompt_dropout" in keys
    for line in lines:
        assert re.match(r"^[\w.]+ \(.+\): \S", line), line  # every field has a default and a help text
    assert any(line.startswith("channels ([32, 64]): ") for line in lines)


def test_describe_shows_the_effective_nested_defaults():
    lines = describe(TeacherConfig)
    assert any(line.startswith(f"train.steps ({TeacherConfig().train.steps}):") for line in lines), lines


def test_partial_nested_override_keeps_parent_defaults():
    cfg = from_dict(TeacherConfig, {"train": {"batch_size": 8}})
    assert cfg.train.batch_size == 8
    assert cfg.train.steps == TeacherConfig().train.steps


@pytest.mark.parametrize("key", ["steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"])
@pytest.mark.parametrize("bad", [0, -1])
def test_train_validate_rejects_non_positive(key, bad):
    with pytest.raises(ValueError, match=rf"train\.{key} must be > 0, got {bad}"):
        from_dict(TrainConfig, {key: bad})


def test_train_validate_sample_every():
    assert from_dict(TrainConfig, {"sample_every": 0}).sample_every == 0
    with pytest.raises(ValueError, match="sample_every"):
        from_dict(TrainConfig, {"sample_every": -1})
    assert from_dict(TrainConfig, {"steps": 1}).steps == 1


def test_nested_validate_runs_through_parent():
    with pytest.raises(ValueError, match=r"train\.steps must be > 0"):
        load_config(TeacherConfig, None, ["train.steps=0"])


@pytest.mark.parametrize("data, match", [
    ({"channels": [12]}, "multiples of 8"),
    ({"channels": []}, "multiples of 8"),
    ({"prompt_dropout": 1.0}, "prompt_dropout"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"dataset": "nope"}, "'nope'"),
])
def test_teacher_validate(data, match):
    with pytest.raises(ValueError, match=match):
        from_dict(TeacherConfig, data)
