"""mergekit adapters: one module per mergekit method-API generation, chosen by what the
installed mergekit offers (not by its version string, since mergekit's git main reports
0.1.4 and may move on).

- `mergekit_0_1_5`: `GroupMergeMethod` and `registry.register` (mergekit 0.1.5).
- `mergekit_0_1_4`: `MergeMethod.make_task` and `registry.REGISTERED_MERGE_METHODS`
  (mergekit 0.1.4 and its git main).

The last line registers the NAN methods. The import hook imports this module when
mergekit's merge methods have loaded; `import mergekit_nan` imports it too.
"""

from __future__ import annotations

import importlib

# mergekit's task-vector methods that get a nan_ twin (plus nan_linear).
WRAPPED_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
# mergekit's slerp-family methods that take a weight per model, where the installed mergekit
# has them. They are handed every model (weight 0 for one NAN leaves out): nuslerp takes
# exactly two, and multislerp returns a lone model as it is, not as base plus its delta.
SLERP_METHODS = ("multislerp", "nuslerp")


def generation():
    """The adapter module for the installed mergekit."""
    from mergekit.merge_methods import registry

    if hasattr(registry, "register") and hasattr(registry, "registered_methods"):
        return importlib.import_module("mergekit_nan.adapters.mergekit_0_1_5")
    if hasattr(registry, "REGISTERED_MERGE_METHODS"):
        return importlib.import_module("mergekit_nan.adapters.mergekit_0_1_4")
    raise ImportError(
        "mergekit-nan supports mergekit's two merge-method APIs (0.1.4 and 0.1.5); the installed "
        "mergekit.merge_methods.registry has neither `register` nor `REGISTERED_MERGE_METHODS`"
    )


def register_methods() -> None:
    """Register every nan_* method with mergekit; calling it again changes nothing."""
    generation().register(WRAPPED_METHODS, SLERP_METHODS)


def registered_names() -> list:
    """Every merge method name mergekit knows, nan_* included."""
    return generation().registered_names()


register_methods()
