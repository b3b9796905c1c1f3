"""Fused loops for the elementwise chains of :mod:`peftmerge.merge.blocked` and :mod:`peftmerge.merge.radix`.

In torch, TIES' trim, election and disjoint mean over one block are ~25 elementwise ops (each a pass over
the block, with its dispatch), and the threshold pass four per input plus a ``nonzero`` scan. Here each is
one numba-compiled loop nest: a block is taken in chunks of ``CHUNK`` entries whose scratch stays in L1,
each step a branch-free loop that LLVM vectorizes (kept as separate functions: inlined into one loop nest,
LLVM gives up on vectorizing them). ``nogil``: the block worker threads run them in parallel; ``cache``:
compiled once per machine. The definitions are those of :mod:`peftmerge.merge.ops` (the tests hold them
equal), in float32 like the torch chains they replace.

Measured on one 4096 x 4096 module of three inputs, one thread: the TIES chain 20 ms against ~60 ms as
torch ops, the threshold pass 13 ms per input against ~31 ms. The first call in a process costs ~0.5 s
(numba loading its cache; ~1.5 s more the first time on a machine, compiling).
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
    kept = np.empty((max(n, 1), CHUNK), np.float32)
    vote = np.empty(CHUNK, np.float32)
    acc = np.empty(CHUNK, np.float32)
    count = np.empty(CHUNK, np.float32)
    sq = np.zeros(CHUNK, np.float64)
    for c0 in range(0, size, CHUNK):
        m = min(CHUNK, size - c0)
        a, c, v, o, q = acc[:m], count[:m], vote[:m], out[c0:c0 + m], sq[:m]
        for j in range(m):
            a[j] = _ZERO
            v[j] = _ZERO
            c[j] = _ZERO
        for i in range(n):  # trim, and add to the sum or the vote
            x, k, ti, te, s0, wi = xs[i, c0:c0 + m], kept[i, :m], t[i], tie_end[i], start + c0, w[i]
            for j in range(m):
                val = x[j]
                mag = abs(val)
                keep = (mag > ti) | ((mag == ti) & (s0 + j < te))
                k[j] = val if keep else _ZERO
            if not ties:
                for j in range(m):
                    a[j] += wi * k[j]
            elif by_count:
                for j in range(m):
                    v[j] += (_ONE if k[j] > _ZERO else _ZERO) - (_ONE if k[j] < _ZERO else _ZERO)
            else:
                for j in range(m):
                    v[j] += k[j]
        if ties:
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
        else:
            for j in range(m):
                o[j] = a[j]
        for j in range(m):
            q[j] += np.float64(o[j]) * np.float64(o[j])
    return sq.sum()


# --- DARE's random drop: a counter-based stream ---------------------------------------------------------------
# Entry p of input i is kept when u(key_i, p) < density, u the top 24 bits of SplitMix64 (Steele, Lea & Flood
# 2014) of key_i + (p + 1) * golden: no generator state, so any block, on any thread, draws its own part of
# the stream directly (torch.rand from a seeded generator costs ~3 ns an entry; this ~0.3 ns).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
_U24 = 1.0 / (1 << 24)


def stream_key(seed: int, i: int) -> np.uint64:
    """The 64-bit key of input i's mask stream in a tensor whose mask seed is ``seed``."""
    return np.uint64((seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xD1B54A32D192ED03) % (1 << 64))


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
