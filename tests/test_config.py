"""params.yaml schema: unknown keys and wrong types are rejected by name; the shipped file is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from qfm.config import load_params, parse_section
from qfm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params["ingest"].format == "demo"
    assert params["splits"].n_splits == 10


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'splits.test_fracton'.*did you mean 'test_fraction'"):
        parse_section("splits", {"test_fracton": 0.3})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'splits.n_splits' must be int, got '10'"):
        parse_section("splits", {"n_splits": "10"})
    with pytest.raises(ConfigError, match=r"'ingest.skip_invalid' must be bool"):
        parse_section("ingest", {"skip_invalid": 1})


def test_int_is_accepted_where_float_is_expected():
    assert parse_section("splits", {"test_fraction": 1}).test_fraction == 1


def test_unknown_section_and_bad_yaml(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("trainn:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trainn'\]"):
        load_params(bad)
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
