"""The README states what the code does: its parameters table against the package's parameter definitions, its
"which method" table against the methods the package registers, and its length against the front-door budget.
(docs/ commands are run by scripts/check_docs_commands.py in CI; the benchmark tables are checked by
benchmarks/select_weighting.py --check.)"""

import re
from pathlib import Path

from mergekit_nan.adapters import WRAPPED_METHODS
from mergekit_nan.core.coefficients import WEIGHTINGS
from mergekit_nan.core.parameters import GRANULARITIES, NORM_SOURCES, SHARED, shared_default

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def parameter_rows() -> dict:
    """{parameter: (default cell, allowed cell)} from the README's Parameters table."""
    rows = {}
    for line in section("Parameters").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.match(r"`(\w+)`", cells[0]) if line.startswith("| `") else None
        if name:
            rows[name.group(1)] = (cells[1], cells[2])
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_readme_is_within_the_front_door_budget():
    assert len(README.split()) <= 2500


def test_every_nan_parameter_is_in_the_parameters_table():
    assert set(parameter_rows()) == set(SHARED) | {"weight"}


def test_the_parameters_table_gives_each_methods_default():
    rows = parameter_rows()
    for name in ("granularity", "norm_of", "weighting"):
        default, _ = rows[name]
        assert backticked(default) == [SHARED[name][0]], name
        assert {shared_default(name, m) for m in WRAPPED_METHODS} == {SHARED[name][0]}, name
    # temperature: "`4` in `nan_a` and `nan_b`; `1` (the paper's) in every other method"
    default, _ = rows["temperature"]
    stated = {}
    for clause in default.split(";"):
        value, *methods = backticked(clause)
        for method in methods or ["*"]:
            stated[method] = float(value)
    for method in WRAPPED_METHODS:
        assert stated.get(f"nan_{method}", stated["*"]) == shared_default("temperature", method), method
    assert backticked(rows["weight"][0]) == ["1"]


def test_the_parameters_table_gives_the_allowed_values():
    rows = parameter_rows()
    assert backticked(rows["granularity"][1]) == list(GRANULARITIES)
    assert backticked(rows["norm_of"][1]) == list(NORM_SOURCES)
    assert backticked(rows["weighting"][1]) == list(WEIGHTINGS)


def test_the_which_method_table_names_every_method():
    table = section("Which method to use")
    for method in WRAPPED_METHODS:
        assert f"`{method}`" in table, method
    assert "`nan_linear`" in table
