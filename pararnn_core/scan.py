"""Chunked linear scans in framework ops (the ``parallel`` mode's linear solver).

Solves ``h_t = A_t h_{t-1} + b_t`` (or, with ``reverse=True``,
``h_t = A_t h_{t+1} + b_t``) from a zero start, for block-diagonal A:
``A[i][j]`` are arrays [B, T, N] (K x K blocks, one per channel; K = 1 is the
diagonal case), ``b[i]`` arrays [B, T, N].

Initial values are folded into ``b`` by the caller (``b_1 += A_1 h_0``).

Algorithm: split time into ``nc`` chunks of ``C ~ sqrt(T)`` steps. Pass 1 runs
the recurrence inside every chunk at once (vectorised over batch x chunk x
channel) from a zero carry, together with the running product of the A's.
Pass 2 runs the short recurrence over chunk summaries. Pass 3 adds each chunk's
incoming carry through the running products. Depth O(sqrt T), work O(T), no
O(T log T) doubling and no materialised T x T operators.
"""

from __future__ import annotations

import math


class _Block:
    """K x K block-diagonal elements stored as nested lists of per-channel arrays."""

    def __init__(self, k: int):
        self.k = k

    def apply(self, a, h):
        return [sum_terms([a[i][j] * h[j] for j in range(self.k)]) for i in range(self.k)]

    def compose(self, a, p):
        k = self.k
        return [[sum_terms([a[i][m] * p[m][j] for m in range(k)]) for j in range(k)] for i in range(k)]

    def add(self, h, b):
        return [hi + bi for hi, bi in zip(h, b)]

    def take(self, x, idx, is_matrix):
        if is_matrix:
            return [[x[i][j][idx] for j in range(self.k)] for i in range(self.k)]
        return [xi[idx] for xi in x]

    def map(self, fn, x, is_matrix):
        if is_matrix:
            return [[fn(x[i][j]) for j in range(self.k)] for i in range(self.k)]
        return [fn(xi) for xi in x]

    def stack(self, ops, items, axis, is_matrix):
        k = self.k
        if is_matrix:
            return [[ops.stack([it[i][j] for it in items], axis) for j in range(k)] for i in range(k)]
        return [ops.stack([it[i] for it in items], axis) for i in range(k)]

    def length(self, b):
        return b[0].shape[1]


def sum_terms(terms):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def default_chunk(length: int) -> int:
    return max(1, int(math.ceil(math.sqrt(length))))


def _scan(ops, alg, A, b, reverse: bool, chunk: int | None):
    T = alg.length(b)
    C = min(chunk or default_chunk(T), T)
    nc = -(-T // C)
    pad = nc * C - T

    def to_chunks(x):
        if pad:
            x = ops.pad_time(x, pad)
        return x.reshape((x.shape[0], nc, C) + tuple(x.shape[2:]))

    A = alg.map(to_chunks, A, True)
    b = alg.map(to_chunks, b, False)
    order = range(C - 1, -1, -1) if reverse else range(C)

    # pass 1: every chunk from a zero carry, plus running products of A
    at = lambda x, i, m: alg.take(x, (slice(None), slice(None), i), m)  # noqa: E731
    local, prods = [None] * C, [None] * C
    h = p = None
    for i in order:
        a_i, b_i = at(A, i, True), at(b, i, False)
        if h is None:
            h, p = b_i, a_i
        else:
            h = alg.add(alg.apply(a_i, h), b_i)
            p = alg.compose(a_i, p)
        local[i], prods[i] = h, p
    if nc == 1:
        out = alg.stack(ops, local, 2, False)
        return alg.map(lambda x: x.reshape((x.shape[0], T) + tuple(x.shape[3:])), out, False)

    # pass 2: carries between chunks (carry into chunk k is the state leaving chunk k-1)
    last = C - 1 if not reverse else 0
    chunk_order = range(nc - 1, -1, -1) if reverse else range(nc)
    carries = [None] * nc
    carry = None
    for k in chunk_order:
        carries[k] = carry
        end_h = alg.take(local[last], (slice(None), k), False)
        if carry is None:
            carry = end_h
        else:
            carry = alg.add(alg.apply(alg.take(prods[last], (slice(None), k), True), carry), end_h)
    first = chunk_order[0]
    zero = alg.map(ops.zeros_like, alg.take(local[last], (slice(None), first), False), False)
    carries[first] = zero
    carry_arr = alg.stack(ops, carries, 1, False)  # [B, nc, ...]

    # pass 3: add the incoming carry through the running products
    local = alg.stack(ops, local, 2, False)
    prods = alg.stack(ops, prods, 2, True)
    carry_arr = alg.map(lambda x: ops.expand_dims(x, 2), carry_arr, False)
    out = alg.add(alg.apply(prods, carry_arr), local)
    return alg.map(lambda x: x.reshape((x.shape[0], nc * C) + tuple(x.shape[3:]))[:, :T], out, False)


def block_scan(ops, A, b, reverse: bool = False, chunk: int | None = None):
    """Scan with K x K block-diagonal A (nested lists of [B, T, N]); returns a list of K arrays."""
    return _scan(ops, _Block(len(b)), A, b, reverse, chunk)


def transpose_block(A):
    k = len(A)
    return [[A[j][i] for j in range(k)] for i in range(k)]
