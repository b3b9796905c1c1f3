"""Fused loops for the elementwise chains of :mod:`.blocked` and :mod:`.radix`.

In torch, TIES' trim, election and disjoint mean over one block are ~25 elementwise ops (each a pass over
the block, with its dispatch), and the threshold pass four per input plus a ``nonzero`` scan. Here each is
one numba-compiled loop nest: a block is taken in chunks of ``CHUNK`` entries whose scratch stays in L1,
each step a branch-free loop over 1-d views that LLVM vectorizes (indexing the 2-d arrays inside the inner
loops stops it), sums of squares kept per lane (a float64 scalar sum is a serial chain of adds). ``nogil``:
the block worker threads run them in parallel; ``cache``: compiled once per machine. The definitions are those
of :mod:`peftmerge.merge.methods.ops` (the tests hold them equal), in float32 like the torch chains they
replace. The first call in a process loads them from numba's cache; :func:`warm` pays that up front. Timings:
``docs/engine.md``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..methods import ops

CHUNK = 2048
_ZERO, _ONE = np.float32(0.0), np.float32(1.0)


@njit(nogil=True, cache=True)
def band(x, lo, hi, out):
    """Over flat float32 ``x``: the count of |x| > hi, and the values |x| with lo <= |x| <= hi written to
    ``out`` (size >= x.size + 1) in index order; returns (count above, number written)."""
    above = 0
    n = 0
    for j in range(x.size):
        a = abs(x[j])
        above += a > hi
        out[n] = a  # written always, kept only if in the band: no branch
        n += (a >= lo) & (a <= hi)
    return above, n


@njit(nogil=True, cache=True)
def _trim(x, t, tie_end, s0, k):
    """k = x with all but |x| > t, and |x| == t at flat positions (s0 + j) < tie_end, zeroed."""
    for j in range(k.size):
        val = x[j]
        mag = abs(val)
        keep = (mag > t) | ((mag == t) & (s0 + j < tie_end))
        k[j] = val if keep else _ZERO


@njit(nogil=True, cache=True)
def _buffers(n):
    """One chunk's scratch for :func:`_consensus`: the n trimmed inputs, vote, sum, count, per-lane squares."""
    f32 = np.float32
    return (np.empty((n, CHUNK), f32), np.empty(CHUNK, f32), np.empty(CHUNK, f32), np.empty(CHUNK, f32),
            np.zeros(CHUNK, np.float64))


@njit(nogil=True, cache=True)
def _consensus(kept, m, w, ties, by_count, vote, acc, count, o, sq):
    """o[:m] = the consensus of the trimmed inputs kept[:, :m] (see :func:`merge`); adds o^2 to sq[:m]
    (lane by lane: a float64 scalar sum would be a serial chain of adds)."""
    n = kept.shape[0]
    a, c, v = acc[:m], count[:m], vote[:m]
    for j in range(m):
        a[j] = _ZERO
        v[j] = _ZERO
        c[j] = _ZERO
    for i in range(n):  # the sum, or the vote
        k, wi = kept[i, :m], w[i]
        if not ties:
            for j in range(m):
                a[j] += wi * k[j]
        elif by_count:
            for j in range(m):
                v[j] += (_ONE if k[j] > _ZERO else _ZERO) - (_ONE if k[j] < _ZERO else _ZERO)
        else:
            for j in range(m):
                v[j] += k[j]
    if not ties:
        for j in range(m):
            o[j] = a[j]
    else:
        for j in range(m):  # elect: +1 where the vote is >= 0
            v[j] = _ONE if v[j] >= _ZERO else -_ONE
        for i in range(n):  # the agreeing inputs' weighted magnitudes and their number
            k, wi = kept[i, :m], w[i]
            for j in range(m):
                e = k[j] * v[j]
                pos = e > _ZERO
                a[j] += (wi * e) if pos else _ZERO
                c[j] += _ONE if pos else _ZERO
        for j in range(m):  # disjoint mean
            o[j] = (a[j] * v[j]) / max(c[j], _ONE)
    for j in range(m):
        sq[j] += np.float64(o[j]) * np.float64(o[j])


@njit(nogil=True, cache=True)
def merge(xs, t, tie_end, start, w, ties, by_count, out):
    """One block of a trim-then-consensus merge, into flat float32 ``out``; returns sum(out^2) in float64.

    ``xs``: (n, L) float32 task vector entries (already dropped/rescaled for DARE); input i keeps |x| > t[i]
    and the ties |x| == t[i] at flat positions < tie_end[i] (``start``: the block's first position;
    t = -1 keeps all). ``w``: float32 weights. ``ties`` False: sum_i w_i x_i. ``ties`` True (Yadav et al.
    2023, Alg. 1): the sign s = +1 where the vote sum_i x_i (``by_count``: sum_i sign x_i) is >= 0, else -1;
    the entry is s * sum_i w_i |x_i| over the inputs that agree with s (x_i s > 0), divided by their number
    (at least 1).
    """
    n, size = xs.shape
    kept, vote, acc, count, sq = _buffers(n)
    for c0 in range(0, size, CHUNK):
        m = min(CHUNK, size - c0)
        for i in range(n):
            _trim(xs[i, c0:c0 + m], t[i], tie_end[i], start + c0, kept[i, :m])
        _consensus(kept, m, w, ties, by_count, vote, acc, count, out[c0:c0 + m], sq)
    return sq.sum()


@njit(nogil=True, cache=True)
def speculate(xs, lo, hi, t0, w, ties, by_count, out, above, where):
    """:func:`merge` of one block before the exact top-k thresholds are known (one pass instead of two).

    Each input i's threshold lies in its bracket [lo[i], hi[i]]: entries with |x| > hi are kept under it
    and entries with |x| < lo dropped, whatever it is; trimming at the estimate t0[i] (keep |x| > t0) gets
    every entry right but those with some input inside its bracket (~1% per input). Their block positions
    go to ``where`` (in order) for the caller to recompute once the thresholds are known; ``above[i]`` gets
    the number of |x_i| > hi[i]. Returns (sum(out^2) in float64, the number of positions written).
    """
    n, size = xs.shape
    kept, vote, acc, count, sq = _buffers(n)
    inside = np.empty(CHUNK, np.int32)
    found = 0
    for c0 in range(0, size, CHUNK):
        m = min(CHUNK, size - c0)
        f = inside[:m]
        for j in range(m):
            f[j] = 0
        for i in range(n):
            x, k, lo_i, t0_i, hi_i = xs[i, c0:c0 + m], kept[i, :m], lo[i], t0[i], hi[i]
            up = 0
            for j in range(m):
                val = x[j]
                mag = abs(val)
                k[j] = val if mag > t0_i else _ZERO
                up += mag > hi_i
                f[j] |= (mag >= lo_i) & (mag <= hi_i)
            above[i] += up
        _consensus(kept, m, w, ties, by_count, vote, acc, count, out[c0:c0 + m], sq)
        for j in range(m):  # written always, kept only if flagged: no branch
            where[found] = c0 + j
            found += f[j]
    return sq.sum(), found


@njit(nogil=True, cache=True)
def threshold(x, where, lo, hi, need, numel):
    """The ``need``-th largest of the |x| inside [lo, hi] (the k-th largest |dW| of a tensor, when ``need``
    is k less the count above hi and ``x`` lists, in order of their flat positions ``where``, every entry
    inside the bracket), and the flat position just past the last entry equal to it that the top k keep
    (ties in index order; ``numel``: all of them). (nan, -1) if the bracket missed it."""
    band = np.empty(x.size + 1, np.float32)
    n = 0
    for j in range(x.size):
        a = abs(x[j])
        band[n] = a
        n += (a >= lo) & (a <= hi)
    if need < 1 or need > n:
        return np.float32(np.nan), -1
    t = np.partition(band[:n], n - need)[n - need]
    greater = 0
    equal = 0
    for j in range(n):
        greater += band[j] > t
        equal += band[j] == t
    keep = need - greater  # entries equal to t to keep, 1 <= keep <= equal
    if keep >= equal:
        return t, numel
    seen = 0
    for j in range(x.size):
        if abs(x[j]) == t:
            seen += 1
            if seen == keep:
                return t, where[j] + 1
    return t, numel


@njit(nogil=True, cache=True)
def patch(values, where, t, tie_end, w, ties, by_count, out, cols, v0, y0):
    """Merge again, exactly, the entries :func:`speculate` listed: ``values`` (n, N) the inputs' entries at
    flat positions ``where`` (increasing), trimmed at the exact t / tie_end (as in :func:`merge`). Writes each
    into flat ``out`` where it changed, adds the change times row ``where % cols`` of ``v0`` to row
    ``where // cols`` of ``y0`` (= out @ v0), and returns the change in sum(out^2)."""
    n, size = values.shape
    kept, vote, acc, count, sq = _buffers(n)
    new = np.empty(CHUNK, np.float32)
    change = 0.0
    for c0 in range(0, size, CHUNK):
        m = min(CHUNK, size - c0)
        for i in range(n):
            x, k, ti, te = values[i, c0:c0 + m], kept[i, :m], t[i], tie_end[i]
            for j in range(m):
                mag = abs(x[j])
                keep = (mag > ti) | ((mag == ti) & (where[c0 + j] < te))
                k[j] = x[j] if keep else _ZERO
        _consensus(kept, m, w, ties, by_count, vote, acc, count, new, sq)
        for j in range(m):
            p = where[c0 + j]
            old = out[p]
            if new[j] != old:
                out[p] = new[j]
                change += np.float64(new[j]) * np.float64(new[j]) - np.float64(old) * np.float64(old)
                d = new[j] - old
                r, c = p // cols, p % cols
                for q in range(v0.shape[1]):
                    y0[r, q] += d * v0[c, q]
    return change


# --- DARE's random drop: the counter-based stream of :mod:`peftmerge.merge.methods.ops`, compiled ------------------
# No generator state: any block draws its own part of the stream directly.
_GOLDEN, _MIX1, _MIX2 = np.uint64(ops.GOLDEN), np.uint64(ops.MIX1), np.uint64(ops.MIX2)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
_U24 = 1.0 / (1 << 24)


@njit(nogil=True, cache=True)
def drop(x, density, key, start):
    """DARE on flat float32 ``x`` (positions start, start + 1, ... of the tensor), in place: entries with
    u < density are rescaled by 1/density, the others zeroed."""
    inv = np.float32(1.0 / density)
    for j in range(x.size):
        z = key + (np.uint64(start + j) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        z = z ^ (z >> _S31)
        u = np.float64(z >> _S40) * _U24
        x[j] = x[j] * inv if u < density else _ZERO


def warm() -> None:
    """Load (or compile) every kernel now: their first call in a process loads numba's cache, which a timing can
    then leave out, as it leaves out imports."""
    xs = np.zeros((2, 4), np.float32)
    out = np.zeros(5, np.float32)
    keep_all = np.full(2, -1.0, np.float32), np.zeros(2, np.int64)
    merge(xs, *keep_all, 0, np.ones(2, np.float32), True, False, out)
    speculate(xs, keep_all[0], keep_all[0], keep_all[0], np.ones(2, np.float32), True, False, out,
              np.zeros(2, np.int64), np.zeros(5, np.int32))
    threshold(xs[0], np.arange(4, dtype=np.int64), np.float32(0.0), np.float32(1.0), 1, 8)
    patch(xs, np.arange(4, dtype=np.int64), *keep_all, np.ones(2, np.float32), True, False, out, 2,
          np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    band(xs[0], np.float32(0.0), np.float32(1.0), out)
    drop(xs[0], 0.5, ops.stream_key(0, 0), 0)
