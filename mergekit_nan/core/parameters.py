"""NAN's own parameters: names, defaults, validation, and the check of a whole config.

Pure Python. Both mergekit adapters build their parameter definitions from here, and
`check_config` runs once when a merge (or `inspect`) is planned, before any tensor is
loaded, so that a bad value fails early with the parameter (and model) named.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence

from mergekit_nan.core.coefficients import WEIGHTINGS, check_temperature

GRANULARITIES = ("tensor", "layer", "model")
NORM_SOURCES = ("delta", "weights")

# NAN's shared parameters: name -> (default, description). nan_linear has no base
# model, so only `temperature` applies to it.
SHARED = {
    "temperature": (1.0, "NAN softmax temperature: alpha_i ∝ norm_i^(-1/T)"),
    "granularity": ("tensor", "take each model's norm per tensor, per transformer block or over the model"),
    "norm_of": ("delta", "norm of the task delta (default) or of the fine-tuned weights themselves"),
    "weighting": (
        "paper",
        "paper: the weight budget redistributed by inverse norm; shrink_median / shrink_geomean: only "
        "deltas longer than the median (geometric mean) norm are weighed down, nothing is stretched",
    ),
}
LINEAR_SHARED = ("temperature", "weighting")
# Where a wrapped method's own default differs from SHARED's: in the quality benchmarks (README,
# "When NAN helps") the paper's T=1 cost up to 1.9 points against stock task arithmetic and
# DARE-TIES, and T=4 lost far less wherever either lost (a provisional choice, said there).
METHOD_DEFAULTS = {
    "task_arithmetic": {"temperature": 4.0},
    "dare_ties": {"temperature": 4.0},
}
PRIOR = "weight"  # per model, optional, default 1.0: a prior share of the weight budget


def shared_default(name: str, wrapped_method: Optional[str]) -> Any:
    """The default of NAN's shared parameter `name` in nan_<wrapped_method>."""
    return METHOD_DEFAULTS.get(wrapped_method, {}).get(name, SHARED[name][0])


class NanConfigError(ValueError):
    """A config NAN cannot merge; the message names the parameter (and model)."""


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise NanConfigError(f"NAN parameter `{name}` must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_shared(name: str, value: Any) -> Any:
    """One of NAN's shared parameters, validated (raises naming it)."""
    if name == "temperature":
        try:
            return check_temperature(value)
        except ValueError as error:
            raise NanConfigError(str(error)) from None
    if name == "granularity":
        return check_choice(name, value, GRANULARITIES)
    if name == "norm_of":
        return check_choice(name, value, NORM_SOURCES)
    if name == "weighting":
        return check_choice(name, value, WEIGHTINGS)
    raise KeyError(name)


def check_prior(value: Any, method: str, model: Any, tensor: Optional[str] = None) -> float:
    """A model's `weight`, read by NAN as a prior share: a finite number >= 0."""
    where = f"model {model}" + (f" for tensor {tensor}" if tensor else "")
    try:
        if isinstance(value, bool):
            raise TypeError
        prior = float(value)
    except (TypeError, ValueError):
        raise NanConfigError(f"{method}: `weight` of {where} is {value!r}; it must be a number >= 0") from None
    if not (math.isfinite(prior) and prior >= 0):
        raise NanConfigError(
            f"{method}: `weight` of {where} is {value!r}; NAN takes it as a prior share, "
            "which must be a finite number >= 0"
        )
    return prior


@dataclass(frozen=True)
class NanSettings:
    """NAN's shared parameters for one tensor, validated."""

    temperature: float = 1.0
    granularity: str = "tensor"
    norm_of: str = "delta"
    weighting: str = "paper"

    @classmethod
    def pop_from(cls, parameters: dict) -> NanSettings:
        """Take NAN's parameters out of a wrapped method's parameter dict."""
        return cls(**{name: check_shared(name, parameters.pop(name)) for name in SHARED if name in parameters})


def leaf_values(setting: Any) -> Iterable[Any]:
    """Every plain value in a mergekit parameter setting: a scalar, a gradient list,
    or a list of {filter, value} conditions (as dumped to Python)."""
    if isinstance(setting, Mapping):
        if "value" in setting:
            yield from leaf_values(setting["value"])
        return
    if isinstance(setting, (list, tuple)):
        for item in setting:
            yield from leaf_values(item)
        return
    yield setting


@dataclass(frozen=True)
class ParameterSite:
    """Where a config sets parameters: top level / a slice (model None) or one model."""

    label: str  # "the top-level `parameters:`", "model /path/ft1", ...
    model: Optional[str]
    parameters: Mapping[str, Any]


def check_config(
    method: str,
    known: Sequence[str],
    sites: Sequence[ParameterSite],
    shared: Sequence[str],
) -> List[str]:
    """Check every place a config sets parameters for `method`; return warnings.

    Raises NanConfigError for a bad value of NAN's parameters or `weight`, for one of
    NAN's shared parameters set per model (it would be ignored), for a key that is a
    near-miss of a known parameter (a misspelling would merge with the default), and
    for nan_linear configs whose every weight is 0. Other unknown keys only warn:
    mergekit ignores them, and configs switched from another method often carry some
    (e.g. `density` under task arithmetic).
    """
    warnings: List[str] = []
    priors: dict = {}  # site model (None: every model) -> its `weight` values
    for site in sites:
        for key, setting in site.parameters.items():
            if key in shared:
                if site.model is not None:
                    raise NanConfigError(
                        f"{method}: `{key}` is set for {site.label}, but NAN's `{key}` is shared by all "
                        "models; set it in the top-level `parameters:`"
                    )
                for value in leaf_values(setting):
                    check_shared(key, value)
            elif key == PRIOR:
                owner = site.model or "(every model)"
                priors.setdefault(site.model, []).extend(check_prior(v, method, owner) for v in leaf_values(setting))
            elif key not in known:
                warnings.append(_unknown_key(method, key, site.label, known))
    models = [site.model for site in sites if site.model is not None]
    _check_budget(method, models, priors)
    if (
        method == "nan_linear"
        and models
        and all(all(p == 0 for p in priors.get(m, priors.get(None, [1.0]))) for m in models)
    ):
        raise NanConfigError(
            "nan_linear: every model's `weight` is 0; a weighted average needs at least one weight > 0"
        )
    return warnings


# mergekit multiplies each delta by its weight in the tensors' dtype (float32 or bfloat16
# here, both with this range), so larger weights give Inf/NaN in the output.
FLOAT32_MAX = 3.4028234663852886e38


def _check_budget(method: str, models: Sequence[str], priors: Mapping[Optional[str], List[float]]) -> None:
    """The largest possible sum of the models' `weight` values must fit in float32: NAN's
    paper weighting hands it out as the budget, and mergekit multiplies deltas by it."""
    largest = {m: max(priors.get(m, priors.get(None, [1.0])), default=1.0) for m in models}
    if not largest:
        return
    scale = max(largest.values())
    if scale > 0 and scale * math.fsum(v / scale for v in largest.values()) > FLOAT32_MAX:
        top = max(largest, key=largest.get)
        raise NanConfigError(
            f"{method}: the models' `weight` values sum past {FLOAT32_MAX:.3g}, the float32 range in which "
            f"mergekit weighs the deltas (largest: {largest[top]:g}, model {top}); "
            "only their ratios matter to NAN's shares, so scale them down"
        )


def _unknown_key(method: str, key: str, where: str, known: Sequence[str]) -> str:
    """The warning for a key `method` does not know; raises for a near-miss (a typo)."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        raise NanConfigError(
            f"{method}: unknown parameter `{key}` in {where}; did you mean `{close[0]}`? "
            "(as written it would be ignored)"
        )
    nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
    hint = f"; the nearest known parameter is `{nearest[0]}`" if nearest else ""
    return f"{method}: parameter `{key}` in {where} is not a parameter of {method} and is ignored{hint}"


# Methods that merge a fixed number of models besides the base (mergekit's nuslerp: two).
EXACT_MODEL_COUNT = {"nan_nuslerp": 2}


def check_model_count(method: str, groups: Sequence[tuple]) -> None:
    """Raise, naming the method and where, unless each (label, models) group has the
    number of models besides the base that `method` merges."""
    wanted = EXACT_MODEL_COUNT.get(method)
    if wanted is None:
        return
    for label, models in groups:
        if len(models) != wanted:
            listed = ", ".join(map(str, models)) or "none"
            raise NanConfigError(
                f"{method} merges exactly {wanted} models besides the base model; {label} has {len(models)} ({listed})"
            )


def base_model_needed(method: str) -> str:
    return (
        f"{method} needs `base_model:` in the config: NAN weighs each model by the norm "
        "of its task delta (model minus base)"
    )
