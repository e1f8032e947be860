"""The codec thread pool: a large CPU decode is cut into contiguous parts decoded at once on
threads whose torch ops run single-threaded (``set_codec_threads``, ``LOWBIT_CODEC_THREADS``)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from lowbit.errors import ConfigError

_THREADS = 1
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def set_codec_threads(n: int) -> None:
    """Threads one CPU decode may use (default 1, or ``LOWBIT_CODEC_THREADS``). A large frame's
    chunks are then cut into ``n`` contiguous parts decoded at once on a pool of worker threads
    whose torch ops run single-threaded (torch ops release the GIL; nested OpenMP teams would
    oversubscribe the cores). Give a rank about as many as it has cores."""
    global _THREADS
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"codec threads must be an integer >= 1, got {n!r}")
    _THREADS = n


def get_codec_threads() -> int:
    return _THREADS


def _env_threads() -> None:
    v = os.environ.get("LOWBIT_CODEC_THREADS", "").strip()
    if v:
        try:
            set_codec_threads(int(v))
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"LOWBIT_CODEC_THREADS={v!r}: {e}") from None


_env_threads()


def pool(n: int) -> ThreadPoolExecutor:
    """A pool of at least ``n`` threads, each with torch's intra-op threads set to 1. All its
    threads are started here (a barrier holds them until every one runs), and the process-wide
    default that ``torch.set_num_threads(1)`` also changes (it seeds threads started later) is
    restored afterwards; the calling thread's own setting is untouched."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is not None and _POOL_SIZE >= n:
            return _POOL
        keep = torch.get_num_threads()
        started = threading.Barrier(n + 1)

        def single_threaded() -> None:
            torch.set_num_threads(1)
            started.wait()

        ex = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lowbit-codec")
        for _ in range(n):
            ex.submit(single_threaded)
        started.wait()
        torch.set_num_threads(keep)
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL, _POOL_SIZE = ex, n
        return ex


def run_spans(make_run, spans: list, dev: torch.device) -> None:
    """Run ``make_run()(a, e, pb)`` over every span. On CPU with codec threads > 1
    (:func:`set_codec_threads`) the spans are cut into that many contiguous parts (at least 2
    chunks each), one decoder per part, run on the pool; the parts write disjoint ranges of the
    output. The first error in span order is raised after every part has stopped, so no thread
    still writes into the output when the caller sees it."""
    threads = min(_THREADS, len(spans) // 2) if dev.type == "cpu" else 1
    if threads <= 1:
        run = make_run()
        for a, e, pb in spans:
            run(a, e, pb)
        return
    n = len(spans)
    parts = [spans[i * n // threads:(i + 1) * n // threads] for i in range(threads)]

    def work(part) -> None:
        run = make_run()
        for a, e, pb in part:
            run(a, e, pb)

    futures = [pool(_THREADS).submit(work, part) for part in parts]
    errors = [fut.exception() for fut in futures]
    for e in errors:
        if e is not None:
            raise e
