"""The engine: how the merges of :mod:`peftmerge.merge.methods` are computed fast, tested equal to them.

- :mod:`.blocked`: sparsifier x consensus merges (TIES, DARE, breadcrumbs, every :class:`Sparse` method) and linear
  sums over row blocks of a tensor, on worker threads (:mod:`.blocks`: the blocks, threads and scratch buffers);
- :mod:`.fused`: numba kernels of their elementwise chains (trim, election, disjoint mean, DARE's drop);
- :mod:`.selection` and :mod:`.radix`: exact top-k thresholds without a serial quickselect;
- :mod:`.speculative`: TIES of LoRA task vectors with its thresholds found in the same pass as the merge;
- :mod:`.sparse_lora`: a sparse merge of LoRA inputs straight from their factors, refactorized to a rank;
- :mod:`.krylov`: the block Krylov SVD that refactorizes a dense merge, warm-started from the inputs.

Timings and the measurements behind these choices: ``docs/engine.md``.
"""
