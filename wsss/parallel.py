"""A process pool for per-file work outside Lightning (``wsss evaluate``, ``wsss eval-cams``), and
the end of a DDP stage's process group."""
from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _worker_init() -> None:
    # Each worker is one of N processes: keep BLAS/torch from starting N threads each.
    # Only if torch is already loaded (evaluation): importing it here would cost seconds per worker.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def end_process_group() -> None:
    """Destroy torch.distributed's default process group if one is up. A DDP stage leaves it up;
    torn down only at interpreter exit, gloo's threads sometimes aborted the process ("terminate
    called without an active exception"). Never imports torch: without it no group can exist."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive chunks of at most ``size`` items."""
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


def balanced_chunk_size(count: int, workers: int, most: int) -> int:
    """Items per chunk: at most ``most`` (to amortise the round trip), and small enough for about
    four chunks per worker (to keep every worker busy)."""
    return max(1, min(most, -(-count // (4 * max(1, workers)))))


def parallel_imap(fn: Callable[[T], R], tasks: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``tasks`` in ``workers`` processes, results as they finish (in-process if 1).

    ``fn`` must be a module-level function; give it chunks of work so each task is worth a
    round trip. Worker exceptions propagate and the pool is torn down.
    """
    if workers <= 1:
        # Per-image tensors are small: torch's intra-op threads cost more than they give,
        # badly so on a shared machine. Limit them for the duration, as the workers do.
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch is not None else None
        try:
            if torch is not None:
                torch.set_num_threads(1)
            yield from map(fn, tasks)
        finally:
            if torch is not None:
                torch.set_num_threads(threads)
        return
    with multiprocessing.get_context().Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap_unordered(fn, tasks)


def sum_in_chunks(fn: Callable[[list[T]], tuple[int, R]], items: Sequence[T], workers: int, chunk_size: int, desc: str = "",
                  progress: bool = False) -> R:
    """The sum of ``fn(chunk)[1]`` over chunks of ``items``, computed in ``workers`` processes.

    ``fn`` (a module-level function, or a ``functools.partial`` of one) returns how many items it
    did and an array of counts to add up (confusion matrices): counts are summed before anything is
    divided. Chunks are big enough to amortise the round trip, and many enough to keep every worker
    busy. ``progress`` shows a bar named ``desc``.
    """
    from tqdm import tqdm

    size = balanced_chunk_size(len(items), workers, chunk_size)
    total = None
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        for done, counts in parallel_imap(fn, chunked(items, size), workers):
            total = counts if total is None else total + counts
            bar.update(done)
    return total
