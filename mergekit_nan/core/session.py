"""One merge, one state: everything NAN keeps while a merge runs.

A `MergeSession` is created when a merge starts (mergekit's `run_merge`, `inspect`, or
`recording()` around direct API calls) and is current, in the thread that started it,
until that merge ends, failed merges included. The NAN methods find it with
`current()`; with none current (a bare `merge_tensors` call) they merge and keep no
record. Nothing survives a session: two merges in a row share nothing, and merges
started in different threads each see their own.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Tuple

from mergekit_nan.core.norms import Scratch
from mergekit_nan.core.record import TensorRecord

_CURRENT: ContextVar[Optional[MergeSession]] = ContextVar("mergekit_nan_session", default=None)


class MergeSession:
    """The state of one merge in progress.

    out_path: where the model goes (None for inspect and recording()).
    uses_nan: whether the merge runs a nan_* method (stock merges get a session too,
      so that a record left by an earlier NAN merge can be removed).
    dry_run: compute and record the coefficients, skip the wrapped merge (inspect).
    adapters: for inspect, LoRA references on the merge's base -> {tensor: its
      core.lora.LowRankDelta}, so their deltas are never materialized.
    model_order: the models in the order the config names them (the record's columns).
    measure_shares: for inspect, also measure what the weights do to the merge
      (`core.shares`) in every tensor of a task-vector method.
    norm_cache: the `core.norm_cache.NormCache` the layer/model norms are read from and
      kept in (None: no cache).
    inputs_as_stored: whether every tensor mergekit hands a merge method is a stored
      tensor as its file holds it (not so where a tokenizer merge permutes embeddings or
      slices take tensors from other layers); only then are norms taken from the files
      reused for the merge, or cached.
    """

    def __init__(
        self,
        out_path: Optional[str] = None,
        *,
        uses_nan: bool = True,
        dry_run: bool = False,
        adapters: Optional[Dict[Any, Dict[str, Any]]] = None,
        model_order: Tuple[Any, ...] = (),
        measure_shares: bool = False,
        norm_cache: Optional[Any] = None,
        inputs_as_stored: bool = False,
    ):
        self.out_path = out_path
        self.uses_nan = uses_nan
        self.dry_run = dry_run
        self.adapters = dict(adapters or {})
        self.adapter_norms = {model: {n: d.norm() for n, d in found.items()} for model, found in self.adapters.items()}
        self.model_order = tuple(model_order)
        self.measure_shares = measure_shares
        self.norm_cache = norm_cache
        self.inputs_as_stored = inputs_as_stored
        self.records: List[TensorRecord] = []  # appended under the lock, read once the merge is done
        self.shares: List[Any] = []  # core.shares.TensorShares, likewise
        self.card_section: Optional[str] = None  # set when the record is written
        self.writers: List[Any] = []  # mergekit TensorWriters this merge created
        self.scratch = Scratch()  # the norm kernel's slices, kept for the merge, per thread
        self._lock = threading.Lock()
        self._group_norms: Dict[Hashable, Any] = {}
        self._group_lock = threading.Lock()

    def add(self, record: TensorRecord) -> None:
        with self._lock:
            self.records.append(record)

    def add_shares(self, shares: Any) -> None:
        with self._lock:
            self.shares.append(shares)

    def group_norms(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` once per key for this merge; other threads wait for it."""
        with self._group_lock:
            if key not in self._group_norms:
                self._group_norms[key] = compute()
            return self._group_norms[key]

    def substitute_adapter_norms(self, models, name: str, measured) -> tuple:
        """`measured` delta norms of tensor `name`, each replaced by the adapter norm where
        that model is a LoRA read from its files (0.0 where the adapter lacks `name`)."""
        return tuple(
            n if (norms := self.adapter_norms.get(model)) is None else norms.get(name, 0.0)
            for model, n in zip(models, measured)
        )


def current() -> Optional[MergeSession]:
    return _CURRENT.get()


@contextlib.contextmanager
def opened(session: MergeSession) -> Iterator[MergeSession]:
    """Make `session` current in this thread (and in contexts copied from it) for the block."""
    token = _CURRENT.set(session)
    try:
        yield session
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def recording() -> Iterator[List[TensorRecord]]:
    """Collect the records of NAN merges run inside the block (e.g. merge_tensors)."""
    with opened(MergeSession()) as session:
        yield session.records
