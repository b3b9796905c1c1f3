"""peftmerge: compose parameter-efficient adapters (merge, train, route, evaluate, share)."""

from .errors import PeftmergeError
from .version import __version__

__all__ = ["PeftmergeError", "__version__", "combine", "extract", "methods", "set_threads"]


def __getattr__(name):
    # Lazy: `import peftmerge` stays cheap; torch is imported when a function is used.
    if name == "set_threads":
        from .threads import set_threads

        return set_threads
    if name in ("combine", "methods"):
        from .merge import combine as _combine_mod, registry

        return {"combine": _combine_mod.combine, "methods": registry.methods}[name]
    if name == "extract":
        from .merge.extract import extract

        return extract
    raise AttributeError(f"module 'peftmerge' has no attribute {name!r}")
