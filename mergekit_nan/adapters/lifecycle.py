"""Every place NAN hooks into mergekit's merge, in one module (the same in both API
generations): the session around `run_merge`, the check of the config, the record next
to the model, the model card section, and failed merges.

- `mergekit.merge.run_merge` runs inside a `MergeSession` (created when the merge starts,
  closed when it returns or fails). A NAN merge's config is checked first, before any
  tensor is loaded. Every merge (stock methods too) then holds its output folder with a
  lock file, so a second merge into it is refused while the first runs.
- `TensorWriter.__init__/finalize`: the writer of the merge is remembered; once every
  tensor is written, a NAN merge saves `nan_coefficients.json` beside them, and any
  merge removes a `nan_coefficients.json` an earlier merge left in that folder.
- `mergekit.merge.generate_card`: the card of a NAN merge gets a "NAN coefficients" section.
- `MultiGPUExecutor`: its worker threads see the merge's session.
- A NAN merge that fails removes the shards it wrote, and says what the folder holds.

`install(mergekit.merge)` applies the patches once mergekit.merge has loaded (the import
hook calls it; so does `import mergekit_nan` when mergekit.merge is already there).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import re
import sys
from typing import List, Optional

from mergekit_nan.adapters import generation
from mergekit_nan.core.norm_cache import NormCache, default_directory
from mergekit_nan.core.norms import NORM_KERNEL
from mergekit_nan.core.parameters import (
    LINEAR_SHARED,
    SHARED,
    NanConfigError,
    ParameterSite,
    base_model_needed,
    check_config,
    check_model_count,
)
from mergekit_nan.core.record import RECORD_FILENAME, card_section, to_json, write
from mergekit_nan.core.session import MergeSession, current, opened
from mergekit_nan.core.weighing import NonFiniteInput

try:
    import fcntl
except ImportError:  # Windows: no flock, merges there go unlocked
    fcntl = None

LOG = logging.getLogger("mergekit_nan")
_MARK = "_mergekit_nan"  # set on every function this module installs


def install(merge_module) -> None:
    """Patch mergekit's merge pipeline (idempotent)."""
    if not hasattr(merge_module, "run_merge") or installed(merge_module):
        return
    from mergekit.io.tensor_writer import TensorWriter
    from mergekit.multigpu_executor import MultiGPUExecutor

    _patch_writer(TensorWriter)
    _patch_multi_gpu(MultiGPUExecutor)
    merge_module.generate_card = _marked(_card_writer(merge_module.generate_card))
    merge_module.run_merge = _marked(_merge_runner(merge_module.run_merge))


def installed(merge_module) -> bool:
    return bool(getattr(getattr(merge_module, "run_merge", None), _MARK, False))


def install_when_loaded() -> None:
    """Patch now if mergekit.merge has loaded, and in any case once it loads (through the
    import hook's finder; `import mergekit_nan` puts it in place where start-up did not)."""
    try:
        import _mergekit_nan_hook
    except ImportError:  # the package was copied without its hook module
        _mergekit_nan_hook = None
    if _mergekit_nan_hook is not None:
        _mergekit_nan_hook.install()
    merge_module = sys.modules.get("mergekit.merge")
    if merge_module is not None:
        install(merge_module)


def _marked(function):
    setattr(function, _MARK, True)
    return function


# --- the session around a merge -------------------------------------------------------


def _merge_runner(original):
    @functools.wraps(original)
    def run_merge(merge_config, out_path, *args, **kwargs):
        uses_nan = check_merge_config(merge_config)
        session = MergeSession(
            os.path.abspath(out_path),
            uses_nan=uses_nan,
            model_order=config_model_order(merge_config),
            norm_cache=open_norm_cache() if uses_nan else None,
            inputs_as_stored=inputs_as_stored(merge_config),
        )
        with opened(session), output_folder_held(session.out_path), norm_cache_kept(session):
            try:
                return original(merge_config, out_path, *args, **kwargs)
            except BaseException as error:  # Ctrl-C included: nothing half-written stays
                if uses_nan:
                    _abandon(session, error)
                raise

    return run_merge


# --- the norm cache -------------------------------------------------------------------


def open_norm_cache() -> Optional[NormCache]:
    """The norm cache a merge uses (`core.norm_cache.default_directory`), None if off."""
    directory = default_directory()
    return None if directory is None else NormCache(directory, NORM_KERNEL)


@contextlib.contextmanager
def norm_cache_kept(session: MergeSession):
    """Write the norms the merge computed into the cache when it ends (a failed merge's
    too: a norm does not depend on whether the merge went on)."""
    try:
        yield
    finally:
        if session.norm_cache is not None:
            session.norm_cache.flush()


def inputs_as_stored(merge_config) -> bool:
    """Whether mergekit hands the merge methods each tensor as a checkpoint stores it
    under that name: not with a tokenizer merge (embeddings are permuted) nor with
    `slices:` (a tensor may come from another layer of a source)."""
    if getattr(merge_config, "tokenizer_source", None) is not None or getattr(merge_config, "tokenizer", None):
        return False
    containers = [merge_config, *(merge_config.modules or {}).values()]
    return not any(getattr(container, "slices", None) for container in containers)


def cache_use(session: MergeSession) -> Optional[dict]:
    """For the record: how many norms came from the cache and how many were added to it."""
    cache = session.norm_cache
    if cache is None or not (cache.from_cache or cache.computed):
        return None
    return {"read": cache.from_cache, "added": cache.computed}


# --- one merge per output folder -------------------------------------------------------

LOCK_FILENAME = ".mergekit-merge.lock"


class OutputFolderBusy(RuntimeError):
    """Another merge is writing into the same output folder."""


@contextlib.contextmanager
def output_folder_held(out_path: str):
    """Hold `out_path` for this merge: two merges writing one folder would mix their shards
    (mergekit names its temporary shards `model-N.safetensors` whatever the merge).

    An flock on `<out_path>/.mergekit-merge.lock`: the kernel releases it on any exit, a
    SIGKILL included, so a lock file a killed merge left is never stale (the next merge
    locks it again). The file is removed when the merge ends, so a finished folder does not
    keep it. A folder that cannot be created or written is left to mergekit to report."""
    created = not os.path.exists(out_path)
    if fcntl is None:
        yield
        return
    try:
        os.makedirs(out_path, exist_ok=True)
        handle = _locked(os.path.join(out_path, LOCK_FILENAME))
    except OutputFolderBusy:
        raise
    except OSError:  # read-only, or a file: nothing can be written there, mergekit says why
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # while still held: a merge that opens it after this makes its own
            os.remove(handle.name)
        handle.close()
        if created:  # a merge that failed before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                os.rmdir(out_path)


def _locked(path: str):
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputFolderBusy(
                f"Another merge is writing into {os.path.dirname(path)} (it holds {path}); this merge was not"
                " started and changed nothing there. Wait for that merge to end, or choose another output folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:  # removed by a merge that just ended
            same = False
        if same:
            return handle
        handle.close()  # locked a file its holder had already removed: take the new one


def nan_method(merge_config) -> Optional[str]:
    method = merge_config.merge_method
    return method if method.startswith("nan_") else None


def check_merge_config(merge_config) -> bool:
    """Check a NAN merge's config once, before planning loads any tensor; log warnings.
    Returns whether the config uses a NAN method."""
    method = nan_method(merge_config)
    if method is None:
        return False
    if method not in generation().registered_names():
        return True  # mergekit reports an unknown method itself
    linear = method == "nan_linear"
    if not linear and merge_config.base_model is None:
        raise NanConfigError(base_model_needed(method))
    check_model_count(method, model_groups(merge_config))
    sites = parameter_sites(merge_config)
    shared = LINEAR_SHARED if linear else tuple(SHARED)
    for warning in check_config(method, generation().parameter_names(method), sites, shared):
        LOG.warning(warning)
    return True


def parameter_sites(merge_config) -> List[ParameterSite]:
    """Every place the config sets parameters: top level, modules, slices, and each
    model (the base model's own parameters are not read by NAN)."""
    base = merge_config.base_model

    def settings(parameters):
        return {k: (v.model_dump() if hasattr(v, "model_dump") else _dumped(v)) for k, v in (parameters or {}).items()}

    sites = [ParameterSite("the top-level `parameters:`", None, settings(merge_config.parameters))]
    for model in merge_config.models or ():
        if model.model != base:
            sites.append(ParameterSite(f"model {model.model}", str(model.model), settings(model.parameters)))
    containers = [("", merge_config)] + [
        (f"module {name} ", module) for name, module in (merge_config.modules or {}).items()
    ]
    for prefix, container in containers:
        if prefix:
            sites.append(ParameterSite(f"{prefix}`parameters:`", None, settings(container.parameters)))
            for model in container.models or ():
                if model.model != base:
                    sites.append(
                        ParameterSite(f"{prefix}model {model.model}", str(model.model), settings(model.parameters))
                    )
        for index, output_slice in enumerate(container.slices or ()):
            where = f"{prefix}slice {index}"
            sites.append(ParameterSite(f"{where} `parameters:`", None, settings(output_slice.parameters)))
            for source in output_slice.sources:
                if source.model != (output_slice.base_model or base):
                    sites.append(
                        ParameterSite(
                            f"model {source.model} in {where}", str(source.model), settings(source.parameters)
                        )
                    )
    return sites


def model_groups(merge_config) -> List[tuple]:
    """(label, the models besides the base) for each set of models merged together: the
    top-level `models:`, each module's, and each slice's sources."""
    base = merge_config.base_model
    groups = []
    containers = [("", merge_config)] + [
        (f"module {name} ", module) for name, module in (merge_config.modules or {}).items()
    ]
    for prefix, container in containers:
        if getattr(container, "models", None):
            groups.append((f"{prefix}`models:`", [m.model for m in container.models if m.model != base]))
        for index, output_slice in enumerate(container.slices or ()):
            slice_base = output_slice.base_model or base
            sources = [s.model for s in output_slice.sources if s.model != slice_base]
            groups.append((f"{prefix}slice {index}", sources))
    return groups


def _dumped(value):
    if isinstance(value, (list, tuple)):
        return [v.model_dump() if hasattr(v, "model_dump") else v for v in value]
    return value


def config_model_order(merge_config) -> tuple:
    """The models in the order the config names them (mergekit 0.1.5's planner order)."""
    seen = []

    def add(model):
        if model not in seen:
            seen.append(model)

    for model in merge_config.models or ():
        add(model.model)
    for container in [merge_config] + list((merge_config.modules or {}).values()):
        for model in getattr(container, "models", None) or ():
            add(model.model)
        for output_slice in container.slices or ():
            for source in output_slice.sources:
                add(source.model)
    return tuple(seen)


# --- writing: the record, stale files, failed merges ----------------------------------


def _patch_writer(writer_class) -> None:
    if getattr(writer_class.finalize, _MARK, False):
        return
    original_init, original_finalize = writer_class.__init__, writer_class.finalize

    def __init__(self, out_path, *args, **kwargs):
        original_init(self, out_path, *args, **kwargs)
        session = current()
        if session is not None:
            session.writers.append(self)

    def finalize(self):
        original_finalize(self)
        session = current()
        if session is not None and self in session.writers:
            _after_writing(self, session)

    writer_class.__init__ = functools.wraps(original_init)(__init__)
    writer_class.finalize = _marked(functools.wraps(original_finalize)(finalize))


def _names(writer):
    """The shard name pieces mergekit's TensorWriter uses (`model`, `safetensors`)."""
    prefix = writer.override_basename or ("model" if writer.safe_serialization else "pytorch_model")
    return prefix, "safetensors" if writer.safe_serialization else "bin"


def _after_writing(writer, session: MergeSession) -> None:
    """Every tensor is written: save this merge's record, remove what describes another."""
    path = os.path.join(writer.out_path, RECORD_FILENAME)
    if session.uses_nan and session.records:
        document = to_json(session.records, norm_cache=cache_use(session))
        write(document, path)
        session.card_section = card_section(document)
        _remove_other_shards(writer)
    elif os.path.exists(path):  # left by an earlier NAN merge into this folder
        os.remove(path)


def _remove_other_shards(writer) -> None:
    """Weight files of mergekit's naming that this writer did not produce: shards of an
    earlier merge with another shard count, its index, or temporary shards of a failed run."""
    prefix, extension = _names(writer)
    count = writer.shards_written
    ours = (
        {f"{prefix}.{extension}"}
        if count == 1
        else {f"{prefix}-{i:05d}-of-{count:05d}.{extension}" for i in range(1, count + 1)}
        | {f"{prefix}.{extension}.index.json"}
    )
    pattern = re.compile(rf"{re.escape(prefix)}(-\d+|-\d{{5}}-of-\d{{5}})?\.{extension}(\.index\.json)?$")
    for name in os.listdir(writer.out_path):
        if pattern.fullmatch(name) and name not in ours:
            os.remove(os.path.join(writer.out_path, name))


def _abandon(session: MergeSession, error: BaseException) -> None:
    """A NAN merge failed: remove the shards it wrote and say what the folder holds."""
    for writer in session.writers:
        prefix, extension = _names(writer)
        for index in range(1, writer.shards_written + 1):
            partial = os.path.join(writer.out_path, f"{prefix}-{index}.{extension}")
            if os.path.exists(partial):
                os.remove(partial)
    if isinstance(error, (NonFiniteInput, NanConfigError)) and error.args:
        error.args = (f"{error.args[0]}. {_folder_state(session.out_path)}",) + error.args[1:]


def _folder_state(out_path: str) -> str:
    if out_path and os.path.exists(os.path.join(out_path, "config.json")):
        return (
            f"Nothing of this merge was kept; {out_path} still holds the model of an earlier merge, "
            "as it was before this run"
        )
    return f"Nothing of this merge was kept; {out_path} holds no merged model"


# --- the model card and multi-GPU workers ----------------------------------------------


def _card_writer(original):
    @functools.wraps(original)
    def generate_card(*args, **kwargs):
        card = original(*args, **kwargs)
        session = current()
        return card + session.card_section if session is not None and session.card_section else card

    return generate_card


def _patch_multi_gpu(executor_class) -> None:
    """mergekit's multi-GPU executor runs tasks in a thread pool, which does not carry
    context variables: hand each worker a copy of the context that started the run."""
    if getattr(executor_class.run, _MARK, False):
        return
    original_run, original_worker = executor_class.run, executor_class._device_worker

    def run(self, *args, **kwargs):
        self._mergekit_nan_context = contextvars.copy_context()
        return original_run(self, *args, **kwargs)

    def _device_worker(self, *args, **kwargs):
        context = getattr(self, "_mergekit_nan_context", None)
        if context is None:
            return original_worker(self, *args, **kwargs)
        return context.copy().run(original_worker, self, *args, **kwargs)

    executor_class.run = _marked(functools.wraps(original_run)(run))
    executor_class._device_worker = functools.wraps(original_worker)(_device_worker)


# mergekit names outside its public API that this module relies on (a test checks them).
PRIVATE_NAMES = {"mergekit.multigpu_executor": ("MultiGPUExecutor._device_worker",)}
