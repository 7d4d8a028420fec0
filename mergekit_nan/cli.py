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


def one_line(error: BaseException, config_file: str) -> str:
    """A config error as one line: what is wrong and where, without a traceback."""
    import pydantic

    if isinstance(error, pydantic.ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc'])) or 'config'}: {problem['msg']}" for problem in error.errors()
        )
        text = f"{config_file} is not a valid mergekit config: {problems}"
    elif isinstance(error, yaml.YAMLError):
        text = f"{config_file} is not valid YAML: {error}"
    else:
        text = str(error)
    return " ".join(text.split())


def config_errors() -> tuple:
    """What a bad config raises (a NAN check, mergekit's validation, YAML, a model that
    cannot be found: OSError), or a bad input tensor: shown as one line, not a traceback."""
    import pydantic

    from mergekit_nan.core.parameters import NanConfigError
    from mergekit_nan.core.weighing import NonFiniteInput

    return (NanConfigError, NonFiniteInput, pydantic.ValidationError, yaml.YAMLError, OSError)


@main.command()
@click.argument("config_file")
@click.option("--out", default=None, help="write coefficients.json/.csv (and a heatmap) into this folder")
@click.option("--verbose", is_flag=True, help="on a config error, show the full traceback")
@add_merge_options
def inspect(merge_options: MergeOptions, config_file: str, out, verbose: bool):
    """Show the norms and coefficients a merge of CONFIG_FILE would use, without merging."""
    from mergekit.config import MergeConfiguration

    from mergekit_nan.inspect import inspect_config, summary_text, write_outputs

    merge_options.apply_global_options()
    try:
        try:
            with open(config_file, encoding="utf-8") as handle:
                raw = yaml.safe_load(handle)
        except OSError as error:
            raise click.ClickException(f"cannot read {config_file}: {error.strerror or error}") from error
        merge_config = MergeConfiguration.model_validate(raw)
        document = inspect_config(merge_config, merge_options)
    except config_errors() as error:
        if verbose:
            raise
        raise click.ClickException(f"{one_line(error, config_file)} (--verbose shows the traceback)") from error
    click.echo(summary_text(document))
    if out:
        for path in write_outputs(document, out):
            click.echo(f"wrote {path}")
    else:
        click.echo("\n(pass --out DIR to save coefficients.json, coefficients.csv and a heatmap)")
