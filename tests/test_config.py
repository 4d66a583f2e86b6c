"""Params: deep merge order, overrides, and one clear line per bad key naming its file."""

from __future__ import annotations

import shutil

import pytest

from peftflow.config import ParamsError, load_params, read_resolved, save_params
from tests.conftest import PARAMS_DIR


@pytest.fixture
def params_dir(tmp_path):
    shutil.copytree(PARAMS_DIR, tmp_path / "params")
    return tmp_path / "params"


def test_method_file_wins_over_base_and_override_wins_over_both():
    assert load_params("lora", PARAMS_DIR).train.lr == 5.0e-4
    assert load_params("full", PARAMS_DIR).train.lr == 2.0e-5
    params = load_params("lora", PARAMS_DIR, ["train.lr=1e-4", "method.r=4", "method.target_modules=[q_proj]"])
    assert params.train.lr == 1e-4  # a string "1e-4" from YAML is still read as a float
    assert params.method.r == 4 and params.method.target_modules == ["q_proj"]
    assert params.train.batch_size == 16  # untouched keys keep base.yaml's values


def test_typo_in_method_file_names_file_key_and_expected(params_dir):
    path = params_dir / "methods" / "lora.yaml"
    path.write_text(path.read_text().replace("  r: 16", "  rank: 16"))
    with pytest.raises(ParamsError) as err:
        load_params("lora", params_dir)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: method.rank: unknown key; expected one of:") and " r," in line


def test_bad_value_names_the_override(params_dir):
    with pytest.raises(
        ParamsError, match=r"override 'train.batch_size=0': train.batch_size: .*greater than or equal to 1"
    ):
        load_params("lora", params_dir, ["train.batch_size=0"])


def test_unknown_top_level_key_in_base(params_dir):
    (params_dir / "base.yaml").write_text((params_dir / "base.yaml").read_text() + "trian:\n  lr: 1.0\n")
    with pytest.raises(
        ParamsError, match=r"base.yaml: trian: unknown key; expected one of: compare, data, distributed, eval"
    ):
        load_params("lora", params_dir)


def test_unknown_method_lists_the_available_ones(params_dir):
    with pytest.raises(ParamsError, match=r"methods/lorra.yaml: no params file for method 'lorra'; available: .*lora"):
        load_params("lorra", params_dir)


def test_method_file_must_name_its_own_method(params_dir):
    (params_dir / "methods" / "copy.yaml").write_text("method:\n  name: lora\n")
    with pytest.raises(ParamsError, match=r"copy.yaml: method.name: expected 'copy' \(the file name\), got 'lora'"):
        load_params("copy", params_dir)


def test_invalid_yaml_names_file_and_line(params_dir):
    (params_dir / "data.yaml").write_text("data:\n  source: [unclosed\n")
    with pytest.raises(ParamsError, match=r"data.yaml: line \d+: not valid YAML"):
        load_params("lora", params_dir)


def test_malformed_override():
    with pytest.raises(ParamsError, match=r"override 'train.lr': expected KEY.PATH=VALUE"):
        load_params("lora", PARAMS_DIR, ["train.lr"])


def test_resolved_params_round_trip(tmp_path):
    params = load_params("lora", PARAMS_DIR, ["method.r=8", "seed=7"])
    save_params(params, tmp_path / "params.yaml")
    again = read_resolved(tmp_path / "params.yaml")
    assert again == params and type(again.method) is type(params.method)


def test_override_with_invalid_yaml_value():
    with pytest.raises(ParamsError, match=r"override 'train.lr=\[1': the value is not valid YAML"):
        load_params("lora", PARAMS_DIR, ["train.lr=[1"])
