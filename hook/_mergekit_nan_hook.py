"""Brings mergekit-nan into mergekit the moment mergekit loads, with no change to mergekit.

Installed beside site-packages' other modules and run at interpreter start by
`mergekit_nan.pth` (or `mergekit_nan.start` on Python 3.15+). It uses only the
standard library and imports nothing else at start-up: it puts a finder on
sys.meta_path that waits for two mergekit modules, lets each load, then
- after `mergekit.merge_methods` (the package: by then every built-in method is in the
  registry, 0.1.4's multislerp included, which registers itself after the registry
  module has loaded): imports `mergekit_nan.adapters`, whose last line registers the
  nan_* methods;
- after `mergekit.merge`: calls `mergekit_nan.adapters.lifecycle.install(module)`, which
  wraps the merge pipeline (session, record, model card) before anyone binds its names.
"""

import sys

# mergekit module -> (plugin module to import, function of it to call with the module)
_TARGETS = {
    "mergekit.merge_methods": ("mergekit_nan.adapters", None),
    "mergekit.merge": ("mergekit_nan.adapters.lifecycle", "install"),
}


class _TargetFinder:  # duck-typed: importlib.abc costs ~30 ms at start-up
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ActivatingLoader(spec.loader)
                return spec
        return None


class _ActivatingLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _activate(module.__name__, module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


def _activate(target, module):
    plugin, function = _TARGETS[target]
    try:
        __import__(plugin)
        # A half-imported plugin (the user imported it first) finishes the job itself.
        call = getattr(sys.modules[plugin], function, None) if function else None
        if call is not None:
            call(module)
    except Exception as error:  # mergekit must keep working without NAN
        import warnings

        warnings.warn(f"mergekit-nan could not hook into {target}: {error!r}", stacklevel=2)


def install():
    """Put the finder in front of the import system (idempotent); targets that have
    already loaded are activated now."""
    if any(type(f).__name__ == "_TargetFinder" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TargetFinder())
    for target in _TARGETS:
        if target in sys.modules:
            _activate(target, sys.modules[target])
