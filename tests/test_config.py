"""Typed configs: YAML presets, dotted overrides, clear errors, resolved config written out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from umit.config import (
    PRESETS_DIR,
    UmitConfig,
    build_config,
    list_presets,
    load_yaml,
    parse_overrides,
    resolve_config_file,
    save_config,
)
from umit.errors import InputError


class Inner(UmitConfig):
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Target spacing."""
    scheme: str = "ct_window"
    """Normalization scheme."""


class Outer(UmitConfig):
    out: Path = Path("x")
    """Output folder."""
    workers: int = 1
    """Processes."""
    plan: Inner = Inner()
    """Nested settings."""


def test_field_docstrings_become_descriptions():
    assert Outer.model_fields["workers"].description == "Processes."
    assert Inner.model_fields["spacing"].description == "Target spacing."


def test_parse_overrides_nested_and_typed():
    got = parse_overrides(["workers=4", "plan.spacing=[1.5, 1.5, 2]", "plan.scheme=mri_zscore"])
    assert got == {"workers": 4, "plan": {"spacing": [1.5, 1.5, 2], "scheme": "mri_zscore"}}


def test_precedence_defaults_yaml_values_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("workers: 3\nplan:\n  scheme: ct_zscore\n")
    cfg = build_config(Outer, f, ["plan.spacing=[2,2,2]"], out="o", workers=None)
    assert cfg.workers == 3 and cfg.plan.scheme == "ct_zscore"
    assert cfg.plan.spacing == (2.0, 2.0, 2.0) and cfg.out == Path("o")
    cfg = build_config(Outer, f, ["workers=5"], workers=4)
    assert cfg.workers == 5  # command-line overrides win over named args and YAML


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["wrokers=2"], "wrokers"),  # typo: unknown key is an error, not ignored
        (["workers=two"], "workers"),
        (["workers"], "key=value"),
        (["plan..x=1"], "empty key"),
    ],
)
def test_bad_overrides_fail_clearly(overrides, match):
    with pytest.raises(InputError, match=match):
        build_config(Outer, None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("workers: [1, 2\n")
    with pytest.raises(InputError, match="bad.yaml"):
        build_config(Outer, f)
    with pytest.raises(InputError, match="not found"):
        build_config(Outer, tmp_path / "missing.yaml")
    f.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        build_config(Outer, f)


def test_save_config_round_trips(tmp_path):
    cfg = build_config(Outer, None, ["plan.spacing=[1,2,3]", "workers=2"])
    path = save_config(cfg, tmp_path)
    assert path.name == "config.yaml"
    again = Outer.model_validate(yaml.safe_load(path.read_text()))
    assert again == cfg
    assert not list(tmp_path.glob(".tmp-*"))


def test_settings_named_like_the_builder_parameters_pass_through():
    """``umit evaluate/predict --model`` pass ``model=`` to build_config (a clash before)."""

    class WithModel(UmitConfig):
        model: str = ""
        config_file: str = ""

    cfg = build_config(WithModel, None, ["config_file=b"], model="a")
    assert (cfg.model, cfg.config_file) == ("a", "b")


# -- shipped presets ------------------------------------------------------------------------------
def _preset_class(name: str):
    from umit.eval.data_efficiency import DataEfficiencyConfig
    from umit.federated.config import FederatedConfig
    from umit.ssl.pretrain import PretrainConfig

    group = name.split("/")[1]
    classes = {"pretrain": PretrainConfig, "experiments": DataEfficiencyConfig}
    return {**classes, "federated": FederatedConfig}[group]


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_parses(name):
    """Each YAML inside the package validates against its stage's config (paths filled in)."""
    data = load_yaml(name)
    cls = _preset_class(name)
    required = {"data": "PREP"} if "data" in cls.model_fields else {}
    cls.model_validate({**required, **data})


def test_presets_ship_inside_the_package_and_resolve_by_name(tmp_path, monkeypatch):
    import umit

    assert len(list_presets()) >= 4
    assert all((PRESETS_DIR / p.removeprefix("configs/")).is_file() for p in list_presets())
    assert PRESETS_DIR.parent == Path(umit.__file__).parent  # package data, not the repo root
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the preset is found in the package
    assert resolve_config_file("configs/pretrain/mae_vit3d_tiny.yaml").is_file()
    assert resolve_config_file("pretrain/mae_vit3d_tiny.yaml").is_file()
    (tmp_path / "configs/pretrain").mkdir(parents=True)
    (tmp_path / "configs/pretrain/mae_vit3d_tiny.yaml").write_text("model: x\n")
    assert load_yaml("configs/pretrain/mae_vit3d_tiny.yaml") == {"model": "x"}  # a local file wins
    with pytest.raises(InputError, match="shipped presets: configs/"):
        load_yaml("configs/pretrain/nope.yaml")
