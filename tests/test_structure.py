"""The house rules that a reader relies on: a core that imports no mergekit, no import
cycles, no module-level merge state, and the private mergekit names the adapters use."""

import ast
import importlib
import os
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mergekit_nan"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """Every module an `import` statement in the file names, wherever it stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_core_imports_no_mergekit_and_no_adapter():
    for name, path in MODULES.items():
        if name.startswith("mergekit_nan.core"):
            bad = {
                m for m in imports_of(path) if m.split(".")[0] == "mergekit" or m.startswith("mergekit_nan.adapters")
            }
            assert not bad, (name, bad)


def test_no_import_cycles():
    graph = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join(trail + [name])
        state[name] = "open"
        for target in graph[name]:
            visit(target, trail + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])


def test_no_global_statements():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], name


@pytest.mark.parametrize("module", ["mergekit_nan.adapters.mergekit_io", "mergekit_nan.adapters.lifecycle"])
def test_private_mergekit_names_still_exist(module):
    """mergekit may rename what is not its public API; say so plainly if it did."""
    import mergekit.merge  # noqa: F401
    import mergekit.plan

    for target, names in importlib.import_module(module).PRIVATE_NAMES.items():
        found = importlib.import_module(target)
        for dotted in names:
            path = dotted.split(" ")[0].split(".")
            if path[-1] == "_tensors":  # an instance attribute, set by MergePlanner.__init__
                source = pathlib.Path(mergekit.plan.__file__).read_text(encoding="utf-8")
                assert "self._tensors" in source, f"mergekit {target}.{dotted} is gone; {module} needs updating"
                continue
            obj = found
            for part in path:
                assert hasattr(obj, part), f"mergekit {target}.{dotted} is gone; {module} needs updating"
                obj = getattr(obj, part)


def test_installing_the_plugin_kept_the_mergekit_it_found():
    """CI installs a mergekit first, then the plugin; the plugin must not replace it."""
    from importlib.metadata import version

    expected = os.environ.get("MERGEKIT_NAN_EXPECT_MERGEKIT")
    if not expected:
        pytest.skip("set MERGEKIT_NAN_EXPECT_MERGEKIT to the mergekit version installed before the plugin")
    assert version("mergekit") == expected
