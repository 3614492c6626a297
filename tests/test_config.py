"""Config validation: malformed configs are rejected with one line naming the field."""

from __future__ import annotations

import textwrap

import pytest

from pipeline.config import (
    ConfigError,
    SimulateConfig,
    dump,
    example_names,
    load_config,
    resolve_config_path,
)

GOOD = """\
stage: simulate
model:
  name: lorenz96
  size: 40
  params: {F: 8}
members: 4
steps: 10
save_every: 2
"""


def _write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config_resolves_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert isinstance(cfg, SimulateConfig)
    assert cfg.model.params == {"F": 8.0}
    assert cfg.model.dt == 0.05  # resolved from the model's default
    assert cfg.dtype == "float32"
    again = load_config(_write(tmp_path, dump(cfg)))
    assert again == cfg  # the resolved config round-trips


BAD = [
    # (description, yaml, substring that must name the field)
    ("unknown top-level key", GOOD + "bogus: 1\n", "bogus: unknown key"),
    ("unknown model key", GOOD.replace("size: 40", "size: 40\n  sise: 3"), "model.sise: unknown key"),
    ("wrong type", GOOD.replace("members: 4", "members: four"), "members:"),
    ("float for int", GOOD.replace("members: 4", "members: 4.5"), "members:"),
    ("string number", GOOD.replace("steps: 10", "steps: '10'"), "steps:"),
    ("negative", GOOD.replace("members: 4", "members: -1"), "members:"),
    ("zero size", GOOD.replace("size: 40", "size: 0"), "model.size:"),
    ("size below model minimum", GOOD.replace("size: 40", "size: 3"), "model.size:"),
    ("unknown model", GOOD.replace("name: lorenz96", "name: lorenz63"), "model.name:"),
    ("unknown param", GOOD.replace("{F: 8}", "{G: 8}"), "model.params.G:"),
    ("param out of range", GOOD.replace("{F: 8}", "{F: 1e9}"), "model.params.F:"),
    ("non-positive log param", """\
        stage: simulate
        model: {name: kolmogorov, size: 16, params: {viscosity: -0.1}}
        """, "model.params.viscosity: -0.1 is not positive"),
    ("unknown model option", GOOD.replace("params: {F: 8}", "params: {F: 8}\n  options: {wavy: 1}"),
     "model.options.wavy:"),
    ("steps not multiple of save_every", GOOD.replace("steps: 10", "steps: 11"), "steps:"),
    ("bad dtype", GOOD + "dtype: float16\n", "dtype:"),
    ("bad device", GOOD + "device: tpu\n", "device: must be cpu, cuda, cuda:N or mps (got 'tpu')"),
    ("bad option value", GOOD.replace("params: {F: 8}", "params: {F: 8}\n  options: {tile: abc}"),
     "model.options: invalid literal"),
    ("bad theta mode", GOOD + "theta: posterior\n", "theta:"),
    ("negative dt", GOOD.replace("size: 40", "size: 40\n  dt: -0.1"), "model.dt:"),
    ("missing model", "stage: simulate\nmembers: 2\n", "model: required key is missing"),
    ("wrong stage", GOOD.replace("stage: simulate", "stage: train2"), "stage:"),
    ("not a mapping", "- 1\n- 2\n", "expected a mapping"),
    ("bad yaml", "model: [unclosed\n", "not valid YAML"),
    ("odd kolmogorov grid", "stage: simulate\nmodel: {name: kolmogorov, size: 33}\n", "model.size:"),
]


@pytest.mark.parametrize("desc,text,expected", BAD, ids=[b[0] for b in BAD])
def test_malformed_config_rejected(tmp_path, desc, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg, "error must be one line"
    assert str(path) in msg, "error must name the file"
    assert expected in msg, f"{desc}: {msg!r} does not contain {expected!r}"


def test_binary_file_named(tmp_path):
    """A netCDF file or checkpoint passed where a config goes (arguments swapped)."""
    path = tmp_path / "a.nc"
    path.write_bytes(b"\x89HDF\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"a.nc: not a YAML config \(not UTF-8 text\)$"):
        load_config(path)


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", example_names())
def test_shipped_examples_are_valid(name):
    cfg = load_config(resolve_config_path(name))
    assert cfg.stage in name


def test_examples_exist():
    assert {"simulate_lorenz96", "simulate_kolmogorov", "simulate_fhn", "simulate_kdv"} <= set(
        example_names()
    )
