"""Command-line entry points: `mergekit-nan-yaml` and `mergekit-nan`."""

import click
import yaml
from mergekit.options import MergeOptions, add_merge_options

import mergekit_nan  # noqa: F401  (registers the nan_* methods)


def run_yaml():
    """`mergekit-nan-yaml`: mergekit-yaml with the NAN methods registered.

    For environments that skip .pth files (python -S, some embedded setups).
    """
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mergekit_yaml(prog_name="mergekit-nan-yaml")


@click.group(name="mergekit-nan")
def main():
    """NAN (norm-aware merging) for mergekit."""


@main.command()
@click.option("--out", default="demo-out", show_default=True, help="where models, configs and merges go")
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated seeds, one full run each")
def demo(out, seeds):
    """Build a tiny real example, merge it with ties and nan_ties, print coefficients and scores."""
    from mergekit_nan.demo import run_demo

    run_demo(out, tuple(int(s) for s in seeds.split(",")))


@main.command()
@click.argument("config_file")
@click.option("--out", default=None, help="write coefficients.json/.csv (and a heatmap) into this folder")
@add_merge_options
def inspect(merge_options: MergeOptions, config_file: str, out):
    """Show the norms and coefficients a merge of CONFIG_FILE would use, without merging."""
    from mergekit.config import MergeConfiguration

    from mergekit_nan.inspect import inspect_config, summary_text, write_outputs

    merge_options.apply_global_options()
    with open(config_file, encoding="utf-8") as handle:
        merge_config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    document = inspect_config(merge_config, merge_options)
    click.echo(summary_text(document))
    if out:
        for path in write_outputs(document, out):
            click.echo(f"wrote {path}")
    else:
        click.echo("\n(pass --out DIR to save coefficients.json, coefficients.csv and a heatmap)")
