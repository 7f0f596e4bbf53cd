"""Dataclass configs from TOML + dotted overrides."""

from dataclasses import dataclass, field

import pytest

from pretrain.utils.config import apply_overrides, build, dump_toml, load_config, parse_value, to_dict


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    name: str = "adamw"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class Outer:
    steps: int
    sizes: tuple[int, ...] = (224, 98)
    optim: Inner = field(default_factory=Inner)
    tag: str | None = None


def test_parse_value_types():
    assert parse_value("3") == 3
    assert parse_value("1e-4") == 1e-4
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("hello") == "hello"
    assert parse_value('"a b"') == "a b"


def test_overrides_and_build_roundtrip(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("steps = 10\n[optim]\nlr = 0.5\n")
    cfg = load_config(Outer, str(recipe), ["optim.name=sgd", "sizes=[518]", "tag=x"])
    assert cfg.steps == 10 and cfg.optim.lr == 0.5 and cfg.optim.name == "sgd"
    assert cfg.sizes == (518,) and cfg.tag == "x"
    again = build(Outer, __import__("tomllib").loads(dump_toml(to_dict(cfg))))
    assert again == cfg


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="optim.bogus"):
        build(Outer, {"steps": 1, "optim": {"bogus": 1}})
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        build(Outer, {"steps": 1, "optim": {"lr": -1.0}})
    with pytest.raises(ValueError, match="steps: expected an integer"):
        build(Outer, {"steps": "ten"})
    with pytest.raises(ValueError, match="steps"):
        build(Outer, {})
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides({}, ["novalue"])
