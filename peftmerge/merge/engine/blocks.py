"""Blocks of rows and the worker threads that process them (the plumbing of :mod:`.blocked`).

A tensor is viewed as (rows, cols) (cols = its last dimension) and cut into blocks of whole rows of about
``BLOCK`` elements, fixed by its shape alone, so nothing computed per block depends on
how many threads run. Blocks go to ``torch.get_num_threads()`` worker threads, each running torch
single-threaded with its own reused scratch buffers.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import torch
from torch import Tensor

BLOCK = 1 << 16  # elements per block: a few float32 buffers of this size stay in a 2 MB L2 cache


# --- task vectors, block by block --------------------------------------------------------------------------

class Deltas:
    """The n task vectors of one tensor, viewed as (rows, cols) and read by row block.

    Each input is ``("delta", dW)`` (a float task vector), ``("theta", theta_i)`` (a full checkpoint's tensor:
    dW = theta_i - ``base``), ``("factors", (B, A))`` (a LoRA task vector dW = B @ A, float32, formed block by
    block as ``B[r0:r1] @ A`` and never whole) or ``None`` (zero). ``base`` (theta_0, any float dtype) is
    needed for thetas. ``block``: elements per block (whole rows, at least one).
    """

    def __init__(self, inputs: list, base: Tensor | None, shape: tuple[int, ...], block: int = BLOCK):
        self.inputs, self.shape = inputs, tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        self.cols = shape[-1] if len(shape) >= 2 else max(numel, 1)
        self.rows = numel // self.cols if numel else 0
        self.numel = numel
        self.base = None if base is None else base.reshape(self.rows, self.cols)
        self._flat = [None if x is None else x if x[0] == "factors" else (x[0], x[1].reshape(self.rows, self.cols))
                      for x in inputs]
        self.step = max(1, block // max(self.cols, 1))  # rows per block
        self.nblocks = -(-self.rows // self.step) if self.rows else 0

    @classmethod
    def stacked(cls, deltas: Tensor) -> "Deltas":
        """From (n, *shape) dense task vectors."""
        return cls([("delta", d) for d in deltas], None, tuple(deltas.shape[1:]))

    @property
    def n(self) -> int:
        return len(self.inputs)

    def span(self, j: int) -> tuple[int, int]:
        return j * self.step, min((j + 1) * self.step, self.rows)

    def base_block(self, r0: int, r1: int, out: Tensor) -> Tensor:
        return out.copy_(self.base[r0:r1])

    def get(self, i: int, r0: int, r1: int, out: Tensor, base_f: Tensor | None) -> Tensor | None:
        """Input i's float32 rows [r0, r1): a read-only view, or ``out`` filled; None if the input is zero."""
        x = self._flat[i]
        if x is None:
            return None
        kind, t = x
        if kind == "factors":  # the same rows as (B @ A)[r0:r1]: each entry is one dot product over the rank
            return torch.mm(t[0][r0:r1], t[1], out=out)
        if kind == "delta":
            blk = t[r0:r1]
            return blk if blk.dtype == torch.float32 else out.copy_(blk)
        return torch.sub(out.copy_(t[r0:r1]), base_f, out=out)  # theta_i - theta_0 in float32 (exact for bf16)


    def sample(self, i: int, idx: Tensor) -> Tensor:
        """Input i's entries at flat indices ``idx`` (float32; for factors computed as dot products, which may
        differ from the blocked products in the last bit: for estimates only)."""
        kind, t = self._flat[i]
        if kind == "factors":
            b, at = t[0], t[1].T.contiguous()
            out = torch.empty(idx.numel())
            for c in range(0, idx.numel(), 1 << 13):  # small chunks: the gathered rows stay in cache
                part = idx[c:c + (1 << 13)]
                rows, cols = b.index_select(0, part // self.cols), at.index_select(0, part % self.cols)
                torch.bmm(rows.unsqueeze(1), cols.unsqueeze(2), out=out[c:c + part.numel()].view(-1, 1, 1))
            return out
        vals = t.reshape(-1)[idx].float()
        return vals - self.base.reshape(-1)[idx].float() if kind == "theta" else vals


class _Scratch(threading.local):
    def __init__(self):
        self.bufs: dict = {}

    def get(self, key, rows: int, cols: int) -> Tensor:
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < rows * cols:
            buf = self.bufs[key] = torch.empty(max(rows * cols, BLOCK))
        return buf[:rows * cols].view(rows, cols)

    def ones(self, rows: int, cols: int) -> Tensor:
        """A (rows, cols) view of ones, filled once per buffer (callers must not write to it)."""
        buf = self.bufs.get("ones")
        if buf is None or buf.numel() < rows * cols:
            buf = self.bufs["ones"] = torch.ones(max(rows * cols, BLOCK))
        return buf[:rows * cols].view(rows, cols)


_scratch = _Scratch()


def release(key) -> None:
    """Free the calling thread's scratch buffer ``key`` (a large one kept across tensors of one merge)."""
    _scratch.bufs.pop(key, None)
_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_local = threading.local()  # .workers: the block workers of this thread's merges (single_threaded_caller)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="peftmerge-block",
                                                 initializer=torch.set_num_threads, initargs=(1,))
        return _pools[workers]


@contextmanager
def single_threaded_caller():
    """Run the calling thread's own torch ops single-threaded (the block workers keep the cores busy), so that
    the small serial steps between blocked passes never wait at an OpenMP barrier; restored on exit."""
    before, saved = torch.get_num_threads(), getattr(_local, "workers", None)
    _local.workers = saved or before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _local.workers = saved


def run_blocks(fn, nblocks: int, workers: int | None = None) -> list:
    """``[fn(j) for j in range(nblocks)]`` on worker threads (single-threaded torch each); results in order.
    Workers: ``torch.get_num_threads()`` (of the caller, before :func:`single_threaded_caller`), at most 8;
    one worker runs them in the calling thread."""
    workers = max(1, min(workers or getattr(_local, "workers", None) or torch.get_num_threads(), nblocks, 8))
    if workers == 1:
        return [fn(j) for j in range(nblocks)]
    results = [None] * nblocks
    counter = itertools.count()

    def worker():
        while (j := next(counter)) < nblocks:
            results[j] = fn(j)

    futures = [_pool(workers).submit(worker) for _ in range(workers)]
    for f in futures:
        f.result()
    return results


def _one_thread(fn, item):
    _local.workers = 1
    try:
        return fn(item)
    finally:
        _local.workers = None


def each_on_a_thread(fn, items: list, sizes: list[int], workers: int | None = None):
    """Yield ``(k, fn(items[k]))`` as they finish, ``workers`` items at a time (default
    ``torch.get_num_threads()``), each item on its own thread with torch and the block engine single-threaded:
    for many small tensors (a LoRA adapter's modules), whole tensors in parallel beat blocks of one tensor in
    parallel, which wait for each other at every serial step (thresholds, the Krylov SVD). Largest first."""
    workers = max(1, min(workers or torch.get_num_threads(), len(items), 8))
    if workers == 1:
        for k, item in enumerate(items):
            yield k, fn(item)
        return
    order = sorted(range(len(items)), key=lambda k: -sizes[k])
    with ThreadPoolExecutor(workers, thread_name_prefix="peftmerge-tensor", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        futures = {pool.submit(_one_thread, fn, items[k]): k for k in order}
        for f in as_completed(futures):
            yield futures[f], f.result()


# --- exact top-k thresholds --------------------------------------------------------------------------------
