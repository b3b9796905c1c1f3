"""peftmerge: compose parameter-efficient adapters (merge, train, route, evaluate, share).

Commands have their Python twins here, imported on first use (``import peftmerge`` stays cheap)::

    peftmerge.combine(inputs, out, "ties", params={"density": 0.3})   # peftmerge combine
    peftmerge.methods()                                              # peftmerge methods

and in the subpackage of the same name: ``peftmerge.search.search``, ``peftmerge.train.train``,
``peftmerge.evaluate.evaluate``, ``peftmerge.routing.route_build``.
"""

from .errors import PeftmergeError
from .version import __version__

# name -> (module, attribute): the library function behind each command
_API = {
    "combine": ("peftmerge.merge.combine", "combine"),
    "methods": ("peftmerge.merge.registry", "methods"),
    "extract": ("peftmerge.merge.extract", "extract"),
    "grams": ("peftmerge.analysis.grams", "grams"),
    "inspect": ("peftmerge.analysis.inspect", "inspect"),
    "push": ("peftmerge.hub.push", "push"),
    "set_threads": ("peftmerge.threads", "set_threads"),
}

__all__ = ["PeftmergeError", "__version__", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'peftmerge' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
