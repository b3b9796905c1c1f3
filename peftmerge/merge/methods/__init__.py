"""The merge methods: one short file each, pure math over tensors (no engine).

Every module here is imported by the registry on first use (pkgutil), so a method is its file and nothing else:
``register(...)`` in it declares the name, the paper, the parameters (:class:`~peftmerge.merge.registry.Param`)
and how it may be computed fast. ``ops`` and ``lowrank`` are the shared building blocks (masks, consensus,
factor-space linear algebra); they register nothing.
"""
