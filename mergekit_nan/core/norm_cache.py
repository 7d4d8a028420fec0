"""A persistent cache of per-tensor norms, so that the same checkpoint file is normed once.

A norm is kept under the identity of the files it was taken from (each `.safetensors`
file's resolved path, device and inode, size, mtime and ctime in ns, and the SHA-256 of
its header), the tensor's name, the dtype it was normed in, the device kind and the norm
kernel's version. A file rewritten in any way changes its ctime (which no program can set
back), so it is never served stale; other files (`.bin`) are not cached.

On disk: one small JSON file per (kind, files, dtype, device), named by the SHA-256 of
that key, holding {tensor name: norm}. Files are replaced atomically (written beside,
then renamed), so two merges filling the cache at once leave every file whole; a file
that is unreadable, truncated or of another format is ignored with one warning and
rewritten. A cache directory that cannot be written costs a warning, never the merge.
Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
from typing import Dict, Optional, Sequence, Tuple

LOG = logging.getLogger("mergekit_nan")

CACHE_FORMAT = "mergekit-nan/norm-cache/1"
ENVIRONMENT_VARIABLE = "MERGEKIT_NAN_NORM_CACHE"  # a directory, or `off`
OFF = "off"
DELTA = "delta"  # ||model - base||, keyed by (model file, base file)
WEIGHT = "weight"  # ||tensor||, keyed by its file (a base norm is the base's weight norm)
_MAX_HEADER = 100 << 20  # safetensors caps its header at 100 MB

Identity = Tuple  # of one checkpoint file, see file_identity


def default_directory(environ=None) -> Optional[str]:
    """Where the cache lives: $MERGEKIT_NAN_NORM_CACHE (None if it says `off`), else
    `mergekit-nan/norms` under the Hugging Face cache ($HF_HOME, by default
    $XDG_CACHE_HOME/huggingface, by default ~/.cache/huggingface)."""
    environ = os.environ if environ is None else environ
    setting = environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if setting.lower() == OFF:
        return None
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hf_home = environ.get("HF_HOME") or os.path.join(cache_home, "huggingface")
    return os.path.join(os.path.abspath(os.path.expanduser(hf_home)), "mergekit-nan", "norms")


def file_identity(path: str) -> Optional[Identity]:
    """What a norm taken from `path` is kept under; None for a file that is not a readable
    safetensors file (its norms are not cached)."""
    resolved = os.path.realpath(path)
    if not resolved.endswith(".safetensors"):
        return None
    try:
        with open(resolved, "rb") as handle:
            stat = os.fstat(handle.fileno())
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(_MAX_HEADER, stat.st_size - 8):
                return None
            header = handle.read(length)
    except (OSError, struct.error):
        return None
    digest = hashlib.sha256(header).hexdigest()
    return (resolved, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest)


class NormCache:
    """The norms of one cache directory, as one merge uses them: tables are read once,
    new norms are kept in memory and written by `flush()` when the merge ends.

    `kernel`: the version of the arithmetic the norms come from (core.norms.NORM_KERNEL);
    norms of another version are other entries. Thread-safe (mergekit's executor threads).
    """

    def __init__(self, directory: str, kernel: int):
        self.directory = directory
        self.kernel = kernel
        self.from_cache = 0  # norms served
        self.computed = 0  # norms computed and stored
        self._identities: Dict[str, Optional[Identity]] = {}
        self._names: Dict[tuple, Optional[str]] = {}  # (kind, files, dtype, device) -> its table's file name
        self._tables: Dict[str, Dict[str, float]] = {}  # file name -> its norms
        self._keys: Dict[str, list] = {}  # file name -> its key, for the document
        self._new: Dict[str, Dict[str, float]] = {}  # file name -> norms not yet written
        self._warned = set()
        self._lock = threading.Lock()

    def identity(self, path: str) -> Optional[Identity]:
        """file_identity(path), read once per merge."""
        with self._lock:
            if path not in self._identities:
                self._identities[path] = file_identity(path)
            return self._identities[path]

    def get(self, kind: str, tensor: str, files: Sequence[str], dtype: str, device: str) -> Optional[float]:
        """The norm of `tensor` taken from `files` (model file, then base file for DELTA), or None."""
        name = self._table_name(kind, files, dtype, device)
        if name is None:
            return None
        with self._lock:
            value = self._table(name).get(tensor)
            if value is not None:
                self.from_cache += 1
            return value

    def put(self, kind: str, tensor: str, files: Sequence[str], dtype: str, device: str, value: float) -> None:
        """Keep a norm just computed (a non-finite one is not kept)."""
        name = self._table_name(kind, files, dtype, device)
        if name is None or not math.isfinite(value):
            return
        with self._lock:
            self._table(name)[tensor] = value
            self._new.setdefault(name, {})[tensor] = value
            self.computed += 1

    def flush(self) -> None:
        """Write the norms computed since the last flush (merged with what another merge
        may have written meanwhile); a directory that cannot be written is warned about."""
        with self._lock:
            new, self._new = self._new, {}
            for name, norms in new.items():
                try:
                    self._write(name, {**(self._read(name) or {}), **self._tables[name], **norms})
                except OSError as error:
                    self._warn_once(
                        "write",
                        f"the NAN norm cache in {self.directory} could not be written ({error.strerror or error});"
                        f" the merge is not affected, its norms will be computed again next time (set"
                        f" {ENVIRONMENT_VARIABLE}=off to stop using it)",
                    )
                    return

    # --- files ----------------------------------------------------------------------

    def _table_name(self, kind: str, files: Sequence[str], dtype: str, device: str) -> Optional[str]:
        """The file name of the table of (kind, files, dtype, device); None where a file has no identity.
        Worked out once per merge (file identities are too)."""
        asked = (kind, tuple(files), dtype, device)
        with self._lock:
            if asked in self._names:
                return self._names[asked]
        identities = [self.identity(path) for path in files]
        name = None
        if all(identity is not None for identity in identities):
            key = [kind, [list(i) for i in identities], dtype, device, self.kernel]
            name = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest() + ".json"
        with self._lock:
            self._names[asked] = name
            if name is not None:
                self._keys.setdefault(name, key)
        return name

    def _table(self, name: str) -> Dict[str, float]:
        if name not in self._tables:
            self._tables[name] = self._read(name) or {}
        return self._tables[name]

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name[:2], name)

    def _read(self, name: str) -> Optional[Dict[str, float]]:
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            return self._unreadable(path, str(getattr(error, "strerror", None) or error))
        if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
            return self._unreadable(path, f"not of format {CACHE_FORMAT}")
        norms = document.get("norms")
        if document.get("key") != self._keys[name] or not isinstance(norms, dict):
            return self._unreadable(path, "its key or norms are not what its name says")
        if not all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in norms.values()):
            return self._unreadable(path, "it holds values that are not norms")
        return norms

    def _unreadable(self, path: str, why: str) -> None:
        self._warn_once(path, f"NAN norm cache file {path} is ignored ({why}); it is rebuilt")
        return None

    def _write(self, name: str, norms: Dict[str, float]) -> None:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        document = {"format": CACHE_FORMAT, "key": self._keys[name], "norms": norms}
        handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(document, out, indent=0)
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            LOG.warning(message)
