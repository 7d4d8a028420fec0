"""Write mergekit configs and run the real `mergekit-yaml`, as a user would.

One helper for the demo, the tests and the benchmarks. Standard library and PyYAML
only: it knows nothing of NAN or of mergekit's Python API.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import yaml

PathLike = Union[str, os.PathLike]


def merge_config(
    method: str,
    models: Sequence[PathLike],
    base: Optional[PathLike] = None,
    model_parameters: Union[Mapping, Sequence[Mapping], None] = None,
    parameters: Optional[Mapping] = None,
    dtype: str = "float32",
) -> dict:
    """A mergekit config as a dict. Paths become absolute: mergekit reads a relative
    `a/b` as a hub repository. `model_parameters` is one mapping for every model or one
    per model."""
    if model_parameters is None or isinstance(model_parameters, Mapping):
        model_parameters = [model_parameters or {}] * len(models)
    if len(model_parameters) != len(models):
        raise ValueError(f"{len(models)} models but {len(model_parameters)} parameter sets")
    config: dict = {"merge_method": method}
    if base is not None:
        config["base_model"] = os.path.abspath(base)
    config["models"] = []
    for model, own in zip(models, model_parameters):
        entry: dict = {"model": os.path.abspath(model)}
        if own:
            entry["parameters"] = dict(own)
        config["models"].append(entry)
    if parameters:
        config["parameters"] = dict(parameters)
    config["dtype"] = dtype
    return config


def write_config(path: PathLike, config: Mapping) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


def command_path(name: str = "mergekit-yaml") -> str:
    """The console script of this interpreter's environment, activated or not."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def run_mergekit_yaml(
    config: Union[PathLike, Mapping],
    out: PathLike,
    options: Iterable[str] = (),
    *,
    command: Union[str, Sequence[str]] = "mergekit-yaml",
    threads: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
    capture: bool = True,
    clear: bool = False,
    log: Optional[PathLike] = None,
) -> subprocess.CompletedProcess:
    """Run `mergekit-yaml CONFIG OUT OPTIONS...` in a child process.

    `config` is a path, or a mapping written beside `out` as `<out>.yml`. `command` is
    a console-script name or a full command line standing for it. `threads` caps
    torch's threads in the child; `env` replaces the environment (offline flags are
    added). `clear` removes `out` first. With `log`, the child's output goes to that
    file and the result carries `wall` (seconds), `rusage` (the child's own, from
    os.wait4: CPU time, peak RSS, block reads) and `io` (the child's /proc/<pid>/io
    counters, read_bytes among them, taken once it has exited; None where there is no
    /proc). With `check`, a failed run raises RuntimeError
    carrying the end of its output.
    """
    out = Path(out)
    if isinstance(config, Mapping):
        config = write_config(out.with_name(out.name + ".yml"), config)
    if clear:
        shutil.rmtree(out, ignore_errors=True)
    launcher = [command_path(command)] if isinstance(command, str) else list(command)
    argv = [*launcher, str(config), str(out), *options]
    child_env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads is not None:
        child_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if log is None:
        run = subprocess.run(argv, env=child_env, text=True, capture_output=capture)
        tail = (run.stderr or "")[-3000:] if capture else ""
    else:
        with open(log, "w", encoding="utf-8") as handle:
            started = time.perf_counter()
            child = subprocess.Popen(argv, env=child_env, stdout=handle, stderr=subprocess.STDOUT)
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
            wall = time.perf_counter() - started
            io = _io_counters(child.pid)
            _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        run = subprocess.CompletedProcess(argv, child.returncode)
        run.wall, run.rusage, run.io = wall, usage, io
        tail = Path(log).read_text(encoding="utf-8", errors="replace")[-3000:]
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {run.returncode}\n{tail}")
    return run


def _io_counters(pid: int) -> Optional[dict]:
    """/proc/<pid>/io of an exited, not yet reaped child (Linux), as {name: int}."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as handle:
            return {key: int(value) for key, value in (line.split(":") for line in handle if ":" in line)}
    except OSError:
        return None
