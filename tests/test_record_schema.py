"""The coefficient record's JSON Schema (mergekit_nan/schema/nan_coefficients-1.json): real
records follow it, hand-broken ones do not, it ships inside the package, and the
validation snippet of docs/record.md runs as written."""

import copy
import json
import pathlib
import re

import jsonschema
import pytest
from checkpoints import make_family
from merging import RECORD_VALIDATOR, mergekit_yaml, read_record, validate_record

from mergekit_nan.core import record
from mergekit_nan.core.coefficients import WEIGHTINGS
from mergekit_nan.core.parameters import GRANULARITIES, NORM_SOURCES

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sliced_merge(tmp_path_factory):
    """A real nan_ties merge whose two slices take different models, with a `lambda`
    gradient and granularity: layer: its record has null columns (a model absent from a
    slice) and per-tensor parameters. Returns (folder, base, [ft0, ft1, ft2])."""
    root = tmp_path_factory.mktemp("schema")
    base, *tuned = make_family(str(root / "family"), [0.003, 0.02, 0.01])

    def source(path, layers, weight=None):
        entry = {"model": path, "layer_range": layers}
        if weight is not None:
            entry["parameters"] = {"weight": weight, "density": 0.5}
        return entry

    config = {
        "merge_method": "nan_ties",
        "base_model": base,
        "parameters": {"lambda": [0.5, 1.0], "temperature": 0.7, "granularity": "layer"},
        "slices": [
            {"sources": [source(base, [0, 1]), source(tuned[0], [0, 1], 1.0), source(tuned[1], [0, 1], 2.0)]},
            {"sources": [source(base, [1, 2]), source(tuned[1], [1, 2], 2.0), source(tuned[2], [1, 2], 1.0)]},
        ],
        "dtype": "float32",
    }
    out = root / "merged"
    run = mergekit_yaml(config, str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    return out, base, tuned


def test_a_real_record_with_absent_models_and_per_tensor_parameters_validates(sliced_merge):
    out, base, tuned = sliced_merge
    document = read_record(str(out))  # validates
    assert document["base_model"] == base and sorted(document["models"]) == sorted(tuned)
    # The record holds what the schema's optional parts describe: output layer 0 comes from
    # the first slice, which lacks ft2, and output layer 1 from the second, which lacks ft0.
    column = {model: index for index, model in enumerate(document["models"])}
    layer_0 = [t for t in document["tensors"] if t["name"].startswith("model.layers.0.")]
    layer_1 = [t for t in document["tensors"] if t["name"].startswith("model.layers.1.")]
    assert layer_0 and layer_1
    assert all(t["norms"][column[tuned[2]]] is None and t["norms"][column[tuned[0]]] > 0 for t in layer_0)
    assert all(t["norms"][column[tuned[0]]] is None and t["norms"][column[tuned[2]]] > 0 for t in layer_1)
    assert {t["parameters"]["lambda"] for t in document["tensors"]} == {0.5, 1.0}  # the gradient's ends
    assert document["parameters"]["granularity"] == "layer"


def test_a_real_nan_linear_record_validates(tmp_path):
    paths = make_family(str(tmp_path / "family"), [0.5, 2.0])
    config = {
        "merge_method": "nan_linear",
        "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths],
        "parameters": {"weighting": "shrink_median"},
        "dtype": "float32",
    }
    run = mergekit_yaml(config, str(tmp_path / "merged"))
    assert run.returncode == 0, run.stderr[-2000:]
    document = read_record(str(tmp_path / "merged"))  # validates
    assert document["base_model"] is None and all(t["base_norm"] is None for t in document["tensors"])


def test_a_record_without_tensors_validates():
    validate_record(record.to_json([]))


def broken(document, change):
    """A deep copy of `document` with `change` applied to it."""
    copied = copy.deepcopy(document)
    change(copied)
    return copied


def set_first_tensor(key, value):
    return lambda d: d["tensors"][0].__setitem__(key, value)


def set_first_norm(value):
    return lambda d: d["tensors"][0]["norms"].__setitem__(0, value)


BREAKAGES = {
    # name: (change, where a validation error points)
    "no models key": (lambda d: d.pop("models"), "$"),
    "no tensors key": (lambda d: d.pop("tensors"), "$"),
    "a tensor without weights": (lambda d: d["tensors"][0].pop("weights"), "$.tensors[0]"),
    "format 2": (lambda d: d.__setitem__("format", "mergekit-nan/coefficients/2"), "$.format"),
    "format missing its prefix": (lambda d: d.__setitem__("format", "coefficients/1"), "$.format"),
    "a norm as a string": (set_first_norm("0.25"), "$.tensors[0].norms[0]"),
    "a base norm as a string": (set_first_tensor("base_norm", "1.0"), "$.tensors[0].base_norm"),
    "an unknown top-level key": (lambda d: d.__setitem__("comment", "hand-edited"), "$"),
    "an unknown tensor key": (set_first_tensor("alphas", [0.5, 0.5, None]), "$.tensors[0]"),
    "norms of booleans": (set_first_tensor("norms", [True, False, None]), "$.tensors[0].norms[0]"),
    "norms of lists": (set_first_tensor("norms", [[0.1], [0.2], None]), "$.tensors[0].norms[0]"),
    "a negative norm": (set_first_norm(-0.25), "$.tensors[0].norms[0]"),
    "a coefficient above 1": (
        lambda d: d["tensors"][0]["coefficients"].__setitem__(0, 1.5),
        "$.tensors[0].coefficients[0]",
    ),
    "a model named twice": (lambda d: d["models"].append(d["models"][0]), "$.models"),
    "a granularity NAN lacks": (
        lambda d: d["parameters"].__setitem__("granularity", "block"),
        "$.parameters.granularity",
    ),
    "a base model with nan_linear": (lambda d: d.__setitem__("merge_method", "nan_linear"), "$.base_model"),
    "empty per-tensor parameters": (set_first_tensor("parameters", {}), "$.tensors[0].parameters"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_a_hand_broken_record_fails(sliced_merge, name):
    document = read_record(str(sliced_merge[0]))
    change, where = BREAKAGES[name]
    document = broken(document, change)
    with pytest.raises(jsonschema.ValidationError):
        validate_record(document)
    # among the errors is the one this breakage causes (not only another)
    assert where in {error.json_path for error in RECORD_VALIDATOR.iter_errors(document)}


def test_columns_of_another_length_than_models_fail(sliced_merge):
    document = read_record(str(sliced_merge[0]))
    with pytest.raises(jsonschema.ValidationError, match="one per model"):
        validate_record(broken(document, lambda d: d["tensors"][0]["weights"].pop()))
    with pytest.raises(jsonschema.ValidationError, match="null in the same places"):
        validate_record(broken(document, lambda d: d["tensors"][0]["priors"].__setitem__(0, None)))


def test_the_schema_is_a_valid_draft_2020_12_schema_inside_the_package():
    schema = record.record_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["format"] == {"const": "mergekit-nan/coefficients/1"}
    # read through importlib.resources, it is the file in the checkout's package folder
    shipped = ROOT / "mergekit_nan" / "schema" / "nan_coefficients-1.json"
    assert schema == json.loads(shipped.read_text(encoding="utf-8"))


def test_the_schema_allows_exactly_nans_parameter_values():
    parameters = record.record_schema()["$defs"]["parameters"]["properties"]
    assert parameters["granularity"]["enum"] == list(GRANULARITIES)
    assert parameters["norm_of"]["enum"] == list(NORM_SOURCES)
    assert parameters["weighting"]["enum"] == list(WEIGHTINGS)


def docs_block(language):
    """The one ```language block of docs/record.md."""
    text = (ROOT / "docs" / "record.md").read_text(encoding="utf-8")
    (block,) = re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)
    return block


def test_the_example_of_the_docs_validates():
    validate_record(json.loads(docs_block("json")))


def test_the_validation_snippet_of_the_docs_runs(sliced_merge, monkeypatch):
    """docs/record.md's Python block, as written, in a folder whose merged/ holds a record."""
    snippet = docs_block("python")
    monkeypatch.chdir(sliced_merge[0].parent)
    exec(compile(snippet, "docs/record.md", "exec"), {})
