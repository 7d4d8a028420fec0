"""Registers mergekit-nan's merge methods the moment mergekit's registry is imported.

Installed beside site-packages' other modules and run at interpreter start by
`mergekit_nan.pth` (or `mergekit_nan.start` on Python 3.15+). It uses only the
standard library and imports nothing else at start-up: it puts a finder on
sys.meta_path that waits for `mergekit.merge_methods.registry`, lets it load, then
imports `mergekit_nan.methods`, whose last line registers the methods.
"""

import sys

_TARGET = "mergekit.merge_methods.registry"
_PLUGIN = "mergekit_nan.methods"


class _RegistryFinder:  # duck-typed: importlib.abc costs ~30 ms at start-up
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # Only an import, never an attribute: if the plugin is half-imported
        # (the user imported it first), its own last line will register.
        try:
            __import__(_PLUGIN)
        except Exception as error:  # mergekit must keep working without NAN
            import warnings

            warnings.warn(f"mergekit-nan could not register its merge methods: {error!r}")

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


def install():
    """Put the finder in front of the import system (idempotent)."""
    if any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        return
    if _TARGET in sys.modules:  # mergekit already loaded: register right away
        __import__(_PLUGIN)
        return
    sys.meta_path.insert(0, _RegistryFinder())
