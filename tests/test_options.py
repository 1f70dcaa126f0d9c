"""Options that document themselves: bounds in `option(...)` metadata are checked by the shared validation,
every registered method's options carry help, and the docs' option tables are generated from them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import pytest

from cilbench.config import build
from cilbench.errors import UserError
from cilbench.kit import describe_options, option
from cilbench.kit.registry import known_methods

REPO = Path(__file__).resolve().parent.parent
METHODS = known_methods()


@dataclass
class _Toy:
    weight: float = option(1.0, help="a weight", bounds=(0, None))
    share: float = option(0.5, help="a fraction", bounds=(0, 1))
    steps: list[int] = option([1, 2], help="milestones", unit="steps", bounds=(1, 100))
    size: Optional[int] = option(None, help="a size or null", bounds=(1, lambda: 8))
    free: float = option(-3.0, help="unbounded")
    capped: int = option(5, help="bounded by BOUNDS too", bounds=(0, 10))
    BOUNDS: ClassVar[dict] = {"capped": (0, 6)}      # the ClassVar wins where both name a field


def test_option_bounds_are_checked_by_the_shared_validation():
    ok = build(_Toy, {"weight": 0, "share": 1, "steps": [1, 100], "size": 8, "free": -1e9}, "--set", prefix="toy.")
    assert (ok.weight, ok.share, ok.steps, ok.size) == (0.0, 1.0, [1, 100], 8)
    assert build(_Toy, {"size": None}, "card.yaml").size is None          # null is not range-checked
    cases = [({"weight": -0.5}, "key 'toy.weight': must be >= 0, got -0.5"),
             ({"share": 1.5}, "key 'toy.share': must be between 0 and 1, got 1.5"),
             ({"steps": [5, 0]}, "key 'toy.steps': must be between 1 and 100, got 0"),    # list items too
             ({"size": 9}, "key 'toy.size': must be between 1 and 8, got 9"),            # callable bound
             ({"capped": 7}, "key 'toy.capped': must be between 0 and 6, got 7")]
    for data, expected in cases:
        with pytest.raises(UserError) as err:
            build(_Toy, data, "--set", prefix="toy.")
        assert str(err.value) == f"--set: {expected}"
        assert "\n" not in str(err.value)


def test_a_method_option_out_of_range_is_a_one_line_error_naming_the_key():
    cls = METHODS["seed"].cls
    with pytest.raises(UserError, match=r"^card\.yaml: key 'methods\.seed\.cutout': must be >= 0, got -1$"):
        build(cls.Config, {"cutout": -1}, "card.yaml", prefix="methods.seed.")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_option_of_every_method_documents_itself(name):
    """A new option without help fails here; defaults lie inside their own bounds."""
    entry = METHODS[name]
    config = entry.cls.Config
    missing = [f.name for f in dataclasses.fields(config) if not str(f.metadata.get("help") or "").strip()]
    assert not missing, f"{name}: options without help (use option(..., help=...)): {missing}"
    for row in describe_options(config):
        assert row["help"].strip(), (name, row["name"])
    build(config, dict(entry.defaults), "defaults", prefix=f"{name}.")   # every default satisfies its bounds


def test_show_method_prints_unit_and_range(cli):
    res = cli("show-method", "seed")
    assert res.exit_code == 0, res.output
    assert "cutout = 16  (int; unit: px; range: [0, inf])" in res.stdout
    assert "shared = 0  (int; unit: stages; range: [0, 4])" in res.stdout
