"""Command-line entry points: `mergekit-nan-yaml` and `mergekit-nan`."""

import os
import sys

import click
import yaml
from mergekit.options import MergeOptions, add_merge_options

import mergekit_nan  # noqa: F401  (registers the nan_* methods)
from mergekit_nan.core.norm_cache import ENVIRONMENT_VARIABLE

NORM_CACHE_HELP = (
    "where the layer/model norms are cached: a directory, or `off` "
    f"(default: ${ENVIRONMENT_VARIABLE}, else mergekit-nan/norms in the Hugging Face cache)"
)


def run_yaml():
    """`mergekit-nan-yaml`: mergekit-yaml with the NAN methods registered, and
    `--norm-cache DIR|off` (sets $MERGEKIT_NAN_NORM_CACHE for the merge).

    For environments that skip .pth files (python -S, some embedded setups).
    """
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    arguments, rest = sys.argv[1:], []
    while arguments:
        argument = arguments.pop(0)
        if argument == "--norm-cache" and arguments:
            os.environ[ENVIRONMENT_VARIABLE] = arguments.pop(0)
        elif argument.startswith("--norm-cache="):
            os.environ[ENVIRONMENT_VARIABLE] = argument.split("=", 1)[1]
        else:
            rest.append(argument)
    mergekit_yaml(args=rest, prog_name="mergekit-nan-yaml")


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
@click.option("--per-tensor", is_flag=True, help="also write every tensor's shares into shares.json/.csv")
@click.option("--no-shares", is_flag=True, help="only the norms and coefficients, not what the weights do")
@click.option("--norm-cache", default=None, metavar="DIR|off", help=NORM_CACHE_HELP)
@add_merge_options
def inspect(
    merge_options: MergeOptions,
    config_file: str,
    out,
    verbose: bool,
    per_tensor: bool,
    no_shares: bool,
    norm_cache: str,
):
    """Show the norms and coefficients a merge of CONFIG_FILE would use, and what they do to
    it against the stock weights, without merging. CONFIG_FILE may name a nan_* method or
    the stock method it wraps."""
    from mergekit.config import MergeConfiguration

    from mergekit_nan.inspect import inspect_merge, shares_text, summary_text, write_outputs

    merge_options.apply_global_options()
    if norm_cache is not None:
        os.environ[ENVIRONMENT_VARIABLE] = norm_cache
    try:
        try:
            with open(config_file, encoding="utf-8") as handle:
                raw = yaml.safe_load(handle)
        except OSError as error:
            raise click.ClickException(f"cannot read {config_file}: {error.strerror or error}") from error
        merge_config = MergeConfiguration.model_validate(raw)
        inspection = inspect_merge(merge_config, merge_options, per_tensor=per_tensor, shares=not no_shares)
    except config_errors() as error:
        if verbose:
            raise
        raise click.ClickException(f"{one_line(error, config_file)} (--verbose shows the traceback)") from error
    click.echo(summary_text(inspection.document))
    click.echo(shares_text(inspection))
    if out:
        for path in write_outputs(inspection, out):
            click.echo(f"wrote {path}")
    else:
        click.echo("\n(pass --out DIR to save coefficients.json/.csv, shares.json/.csv and their plots)")
