"""Prefill ahead: a sticky conversation's next prompt pass runs while the probe does.

With sticky routing (``RoutingConfig(sticky_margin=...)``) the next call of a conversation usually
keeps the conversation's mixture, and then its prompt pass runs under that mixture over the
conversation's cached keys and values. Only the probe can tell whether it keeps it, and the probe
runs first: the selection is known before the first token. Where torch leaves CPU cores idle
(fewer torch threads than cores), and the probe has new tokens to run (a call whose probed
tokens are all in the probe cache, such as a tool step under ``probe_scope="last_user_turn"``,
probes in a few milliseconds), the engine starts that prompt pass in a worker thread before the
probe, under the mixture it expects. When routing keeps the mixture, the decoder takes the
pass's result and the call's time to first token loses most of the probe's; when routing moves
to another mixture, the pass stops at its next adapted module and the prompt runs again under
the new one (nothing of the stopped pass is kept). Either way the call computes what it would
have without it: the same mixture over the same cached prefix, through the same ops.

The integrations route first (``engine.route``, so the selection is in the run's metadata
before the run starts) and then generate with the routed mixture pinned. So ``route`` starts
the pass too, and when routing keeps the mixture it parks the pass (:class:`Parked`) for the
``generate`` of the same prompt with that mixture that follows.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from logo_engine.decoding import PromptPass
from logo_engine.library import AdapterLibrary
from logo_engine.sticky import mixture_key
from logo_engine.types import Selection


@dataclass
class Ahead:
    """A prompt pass started before its call was routed, under the mixture it expects."""

    key: tuple[tuple[str, float], ...]  # the expected mixture (``mixture_key``)
    library: AdapterLibrary  # the library its plan was built from
    epoch: int  # the prefill cache's epoch its lookups read
    future: Future[PromptPass]
    cancel: threading.Event = field(default_factory=threading.Event)

    def take(
        self, selection: Selection, library: AdapterLibrary, epoch: int
    ) -> Future[PromptPass] | None:
        """The pass, if it computed what ``selection`` needs now; else it is stopped (None)."""
        if mixture_key(selection) == self.key and library is self.library and epoch == self.epoch:
            return self.future
        self.discard()
        return None

    def discard(self) -> None:
        """Stop the pass at its next adapted module (or before it starts); its result is lost."""
        self.cancel.set()
        self.future.cancel()


@contextmanager
def discarded_on_error(ahead: Ahead | None) -> Iterator[None]:
    """Discard ``ahead`` if the block raises (the routing it was started beside failed)."""
    try:
        yield
    except BaseException:
        if ahead is not None:
            ahead.discard()
        raise


_lane = threading.local()


def share_cores(sharing: bool) -> None:
    """Say whether the calling thread computes beside others on the same cores (serving lanes).

    While it does, the cores its own torch threads leave are the others', not idle.
    """
    _lane.sharing = sharing


def idle_cores(device: torch.device) -> bool:
    """Whether torch leaves CPU cores this process may use idle (a pass beside the probe's)."""
    if device.type != "cpu" or getattr(_lane, "sharing", False):
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return torch.get_num_threads() < (cores or 1)


class AheadPool:
    """The worker threads of one engine's passes ahead, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=os.cpu_count() or 1, thread_name_prefix="logo-prefill-ahead"
                )
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class Parked:
    """Passes that ``route`` started, kept for the ``generate`` of the same prompt and mixture.

    At most ``size`` passes (each holds its prompt's keys and values), each for ``ttl`` seconds:
    the integrations generate right after they route. A pass pushed out is discarded.
    """

    def __init__(self, size: int = 2, ttl: float = 30.0) -> None:
        self.size, self.ttl = size, ttl
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[tuple[int, ...], Any], tuple[float, Ahead]] = OrderedDict()

    def park(self, input_ids: Sequence[int], selection: Selection, ahead: Ahead) -> None:
        """Keep ``ahead`` if it runs under ``selection``'s mixture; discard it otherwise."""
        if mixture_key(selection) != ahead.key:
            ahead.discard()
            return
        key = (tuple(input_ids), ahead.key)
        with self._lock:
            dropped = [a for _, a in self._expire()]
            old = self._items.pop(key, None)
            if old is not None:
                dropped.append(old[1])
            self._items[key] = (time.monotonic(), ahead)
            while len(self._items) > self.size:
                dropped.append(self._items.popitem(last=False)[1][1])
        for stale in dropped:
            stale.discard()

    def take(self, input_ids: Sequence[int], selection: Selection) -> Ahead | None:
        """The pass parked for this prompt under ``selection``'s mixture, if any (removed)."""
        with self._lock:
            dropped = self._expire()
            found = self._items.pop((tuple(input_ids), mixture_key(selection)), None)
        for _, stale in dropped:
            stale.discard()
        return found[1] if found is not None else None

    def clear(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
        for _, ahead in items:
            ahead.discard()

    def _expire(self) -> list[tuple[float, Ahead]]:
        """Remove (and return) the passes older than ``ttl``; the lock is held."""
        now = time.monotonic()
        old = [k for k, (t, _) in self._items.items() if now - t > self.ttl]
        return [self._items.pop(k) for k in old]
