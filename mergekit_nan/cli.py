"""Command-line entry points: `mergekit-nan-yaml` and `mergekit-nan`."""

import argparse

import mergekit_nan  # noqa: F401  (registers the nan_* methods)


def run_yaml():
    """`mergekit-nan-yaml`: mergekit-yaml with the NAN methods registered.

    For environments that skip .pth files (python -S, some embedded setups).
    """
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mergekit_yaml(prog_name="mergekit-nan-yaml")


def main(argv=None):
    """`mergekit-nan`: the plugin's own commands."""
    parser = argparse.ArgumentParser(prog="mergekit-nan", description="NAN merging for mergekit")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a tiny real example, merge it with nan_ties, print the coefficients")
    demo.add_argument("--out", default="demo-out", help="where models, configs and merges go (default: demo-out)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from mergekit_nan.demo import run_demo

        run_demo(args.out)
