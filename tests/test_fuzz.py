"""Property-based fuzzing of the configuration surface (issue 10): ``--set`` values, YAML config
files and CLI numbers, with hypothesis (derandomized: the same cases on every machine).

The property: whatever the input, the CLI accepts it, or ends with a one-line error that names the
key (exit code 2), or argparse rejects a flag's value (exit code 2, naming the flag); never a
traceback. An accepted configuration must be usable: its numbers are finite. Each test counts the
cases it tried; ``docs/reliability.md`` quotes the totals.
"""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from flashdistill import cli
from flashdistill.methods import METHODS, method_module
from flashdistill.methods.dsm import TeacherConfig

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def config_keys(cls, prefix: str = "") -> dict[str, object]:
    """Dotted key -> type of every leaf of a config dataclass."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(config_keys(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


# Values as a user could type them after "key=": YAML scalars and lists, broken YAML, numbers at
# and past every edge, wrong types.
NUMBERS = st.one_of(st.integers(min_value=-10**20, max_value=10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 1, 2**31, 2**63, -2**63, 1e308, -1e-308, 0.5, 1.0, 1000, 1001]))
SCALAR_TEXT = st.one_of(
    NUMBERS.map(repr), NUMBERS.map(str),
    st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "NaN", "1e-3", "1e400", "true", "false", "yes", "no",
                     "null", "~", "", " ", "[]", "{}", "[1, 2", "{a: 1", "a: b", "- 1", "[[1]]", "[1, [2]]", "{a: {b: 1}}",
                     "!!python/object:os.system", "'quoted'", '"x"', "0x10", "0o7", "1_000", "+1", "--1", "\t", "é",
                     "\x00", "[.nan]", "[1e999, 1]", "[-1, -1, -1]", "[0, 0, 0]", "[1]", "[1, 2, 3, 4, 5, 6]",
                     "lcm", "flash", "fp64", "stop", "skip", "huber", "*anchor", "&a 1", "%YAML"]),
    st.text(max_size=12),
    st.lists(NUMBERS, max_size=6).map(lambda v: "[" + ", ".join(map(repr, v)) + "]"),
)


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return lines[-1] if lines else ""


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: usage line + "error:" line, exit code 2
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def check_accepted_config(out: str) -> None:
    """An accepted config printed by --dry-run holds only finite numbers."""
    import json

    start = out.index("{")
    cfg, _ = json.JSONDecoder().raw_decode(out[start:])

    def walk(v, key=""):
        if isinstance(v, float):
            assert math.isfinite(v), f"{key} accepted a non-finite value {v}"
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}" if key else k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)

    walk(cfg)


def test_set_values_of_every_method_key_give_a_one_line_error_or_a_valid_config(tiny_teacher, capsys):
    keys = {}
    for m in METHODS:
        cfg, _ = method_module(m).build_config(str(tiny_teacher), "auto")
        keys[m] = sorted(k for k in config_keys(type(cfg)) if k != "teacher")
    pairs = [(m, k) for m in METHODS for k in keys[m]]
    tried = [0]

    @settings(max_examples=400, **SETTINGS)
    @given(st.sampled_from(pairs), SCALAR_TEXT)
    def prop(method_key, raw):
        method, key = method_key
        tried[0] += 1
        code, out, err = run_cli(["distill", "--teacher", str(tiny_teacher), "--method", method, "--out", "unused",
                                  "--dry-run", "--set", f"{key}={raw}"], capsys)
        assert code in (0, 2), (key, raw, code, err)
        if code == 2:
            line = one_line_error(err)
            assert line.startswith("flashdistill distill: error:"), (key, raw, err)
            assert key.split(".")[-1] in line or "--set" in line, (key, raw, line)
        else:
            check_accepted_config(out)

    prop()
    assert tried[0] >= 400


def test_set_keys_and_shapes_that_do_not_exist(tiny_teacher, capsys):
    tried = [0]
    segment = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="=\n\r"), min_size=0, max_size=8)

    @settings(max_examples=100, **SETTINGS)
    @given(st.lists(segment, min_size=1, max_size=3).map(".".join), SCALAR_TEXT, st.booleans())
    def prop(key, raw, with_equals):
        tried[0] += 1
        pair = f"{key}={raw}" if with_equals else key
        code, out, err = run_cli(["distill", "--teacher", str(tiny_teacher), "--out", "unused", "--dry-run",
                                  "--set", pair], capsys)
        assert code in (0, 2), (pair, code, err)
        if code == 2:
            line = one_line_error(err)
            assert line.startswith("flashdistill distill: error:"), (pair, err)
        else:
            check_accepted_config(out)

    prop()
    assert tried[0] >= 100


YAML_DOCS = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "- a\n- b\n", "1\n", "null\n", "lr: [\n", "train: 5\n", "train:\n  steps: -1\n", "K: .nan\n",
                     "{lr: 1e-3, lr: 2e-3}\n", "a: &x 1\nb: *x\n", "!!binary aGk=\n", "lr: !!python/name:os.system\n",
                     "train: {steps: 1e3}\n", "\xff\xfe", "lora_rank: 0\n", "phase_steps: [1, 2]\n", "--- 1\n--- 2\n"]),
    st.dictionaries(st.sampled_from(["lr", "K", "train", "lora_rank", "phase_steps", "nope", "train.steps"]),
                    st.one_of(NUMBERS, st.text(max_size=5), st.lists(NUMBERS, max_size=3),
                              st.dictionaries(st.sampled_from(["steps", "batch_size", "x"]), NUMBERS, max_size=2)),
                    max_size=3).map(lambda d: __import__("yaml").safe_dump(d)),
)


def test_yaml_config_files(tiny_teacher, tmp_path, capsys):
    tried = [0]
    path = tmp_path / "c.yaml"

    @settings(max_examples=100, **SETTINGS)
    @given(YAML_DOCS, st.sampled_from(["distill", "train-teacher"]))
    def prop(doc, command):
        tried[0] += 1
        path.write_bytes(doc.encode("utf-8", "surrogateescape") if isinstance(doc, str) else doc)
        argv = [command, "--config", str(path), "--out", "unused", "--dry-run"]
        if command == "distill":
            argv += ["--teacher", str(tiny_teacher)]
        code, out, err = run_cli(argv, capsys)
        assert code in (0, 2), (doc, code, err)
        if code == 2:
            assert one_line_error(err).startswith(f"flashdistill {command}: error:"), (doc, err)
        else:
            check_accepted_config(out)

    prop()
    assert tried[0] >= 100


@pytest.mark.parametrize("command", ["train-teacher"])
def test_teacher_set_values(command, capsys):
    keys = sorted(config_keys(TeacherConfig))
    tried = [0]

    @settings(max_examples=60, **SETTINGS)
    @given(st.sampled_from(keys), SCALAR_TEXT)
    def prop(key, raw):
        tried[0] += 1
        code, out, err = run_cli([command, "--out", "unused", "--dry-run", "--set", f"{key}={raw}"], capsys)
        assert code in (0, 2), (key, raw, code, err)
        if code == 2:
            line = one_line_error(err)
            assert line.startswith(f"flashdistill {command}: error:"), (key, raw, err)
            assert key.split(".")[-1] in line, (key, raw, line)
        else:
            check_accepted_config(out)

    prop()
    assert tried[0] >= 60


def test_cli_numbers_are_rejected_by_the_parser_naming_the_flag(tiny_teacher, capsys):
    """Bad numbers for the numeric flags of every command: argparse's one-line error naming the
    flag (no model is loaded, nothing runs)."""
    flags = [("sample", "--steps"), ("sample", "--num-images"), ("sample", "--guidance"), ("sample", "--seed"),
             ("evaluate", "--steps"), ("evaluate", "--num-samples"), ("evaluate", "--guidance"),
             ("train-teacher", "--steps"), ("train-teacher", "--seed"), ("export", "--num-samples"),
             ("benchmark", "--num-samples"), ("demo", "--num-samples")]
    bad = st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e999", "", "x", "1.5.2", "0x", "--", "2**63"]),
                    st.integers(max_value=0).map(str), st.text(alphabet="abc.-+e ", max_size=6))
    zero_ok = {("sample", "--seed"), ("train-teacher", "--seed"), ("export", "--num-samples"),
               ("sample", "--guidance"), ("evaluate", "--guidance")}

    def parses_to_zero(value: str) -> bool:
        try:
            return float(value) == 0
        except ValueError:
            return False

    tried = [0]

    @settings(max_examples=100, **SETTINGS)
    @given(st.sampled_from(flags), bad)
    def prop(command_flag, value):
        command, flag = command_flag
        assume(not (command_flag in zero_ok and parses_to_zero(value)))  # 0 is a valid value there
        argv = [command, f"{flag}={value}"]
        if command in ("sample", "evaluate", "export"):
            argv += ["--model", str(tiny_teacher)]
        if command in ("sample", "export", "demo", "benchmark", "train-teacher"):
            argv += ["--out", "unused"]
        if command == "train-teacher":
            argv += ["--dry-run"]
        if command == "sample":
            argv += ["--prompt", "a digit"]
        tried[0] += 1
        code, out, err = run_cli(argv, capsys)
        assert "Traceback" not in err, (argv, err)
        assert code == 2, (argv, code, err)
        line = one_line_error(err)
        assert "error:" in line and (flag in line or flag.lstrip("-") in line), (argv, line)

    prop()
    assert tried[0] >= 100
