"""Where a parameter server's keys go: each key to one server, balanced by element count
(:func:`lowbit.comm.transport.partition`), and each server's keys cut into the key groups that
travel as one chunk message each (:func:`chunk_keys`). Every rank computes the same plan from the shapes alone.
"""
from __future__ import annotations

import math
from typing import Mapping

DEFAULT_CHUNKS = 10  # pieces per bundle: the receiver decodes one while the next is on the wire


def element_counts(shapes: Mapping[int, tuple]) -> dict[int, int]:
    """key -> number of elements."""
    return {int(k): math.prod(tuple(s)) for k, s in shapes.items()}


def chunk_shares(n: int) -> list[float]:
    """Relative sizes of ``n`` key groups: equal, except that with 4 or more the last
    ``min(4, n - 2)`` halve, one after the other (10 groups: six of 1, then 1/2, 1/4, 1/8, 1/16).
    Whatever is still to do once the last gradients are in (average and re-quantize the groups
    completed last, send them to every worker, which decode them) grows with the last groups; the
    earlier groups' weights leave while later gradients still arrive."""
    if n < 4:
        return [1.0] * n
    t = min(4, n - 2)
    return [1.0] * (n - t) + [0.5 ** j for j in range(1, t + 1)]


def chunk_keys(keys: list[int], sizes: Mapping[int, int], chunks: int) -> list[list[int]]:
    """``keys`` (in order) cut into at most ``chunks`` contiguous groups whose element counts follow
    :func:`chunk_shares` (a key is never split), none empty (fewer groups when there are fewer keys)."""
    keys = list(keys)
    n = max(1, min(int(chunks), len(keys)))
    shares = chunk_shares(n)
    ends = [sum(shares[:j + 1]) / sum(shares) for j in range(n)]  # cumulative fraction after group j
    total = sum(sizes[k] for k in keys)
    groups: list[list[int]] = [[]]
    done = 0
    for i, k in enumerate(keys):
        left_keys, left_groups = len(keys) - i, n - len(groups) + 1
        if groups[-1] and len(groups) < n and (done >= total * ends[len(groups) - 1] or left_keys < left_groups):
            groups.append([])
        groups[-1].append(k)
        done += sizes[k]
    return groups

