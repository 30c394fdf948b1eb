"""Running a flow as a stream of events, for a UI that shows stage 1 as it goes: each run in a
thread, its tokens handed over as they come (at most one update per interval, the last always),
several runs side by side (a comparison of two bundles). No torch, no UI code."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class _Cancelled(Exception):
    pass


def stream_many(runs: list[Callable[..., Any]], min_interval: float = 0.05) -> Iterator[tuple[int, str, Any]]:
    """Run each ``run(on_token=...)`` in its own thread (a comparison of two models fills both
    token grids side by side); yield ``(run index, "token", codes_so_far)`` as stage 1 goes (at
    most one round per ``min_interval`` seconds, but always each run's last), then ``(run index,
    "done", result)`` for every run. The first error is re-raised here; closing the iterator (the
    user left) stops every worker at its next token."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work(i: int, run: Callable[..., Any]) -> None:
        def on_token(step: int, codes: np.ndarray) -> None:
            if stop.is_set():
                raise _Cancelled
            q.put((i, "token", codes))
        try:
            q.put((i, "done", run(on_token=on_token)))
        except _Cancelled:
            pass
        except BaseException as err:  # handed to the consumer
            q.put((i, "error", err))

    for i, run in enumerate(runs):
        threading.Thread(target=work, args=(i, run), daemon=True, name=f"digit-flow-{i}").start()
    last: dict[int, Any] = {}
    t_last, running = 0.0, len(runs)
    try:
        while running:
            i, kind, value = q.get()
            if kind == "token":
                last[i] = value
                if q.empty() and time.perf_counter() - t_last >= min_interval:
                    t_last = time.perf_counter()
                    for j in sorted(last):
                        yield j, "token", last[j]
                    last.clear()
                continue
            if i in last:
                yield i, "token", last.pop(i)
            if kind == "error":
                raise value
            running -= 1
            yield i, kind, value
    finally:
        stop.set()
