"""Command-line entry points."""

import mergekit_nan  # noqa: F401  (registers the nan_* methods)


def run_yaml():
    """`mergekit-nan-yaml`: mergekit-yaml with the NAN methods registered.

    For environments that skip .pth files (python -S, some embedded setups).
    """
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mergekit_yaml(prog_name="mergekit-nan-yaml")


def main():
    """`mergekit-nan`: the plugin's own commands."""
    import sys

    print("usage: mergekit-nan-yaml CONFIG.yml OUT_DIR [mergekit-yaml options]", file=sys.stderr)
    raise SystemExit(2)
