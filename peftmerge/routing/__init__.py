"""Route per query: choose task adapters per query or per token and apply them in mixed batches.

Routers (one registry, :func:`names`): ``arrow`` (data-free, per token), ``centroid`` (retrieval over
each adapter's sample inputs), ``probe`` (a small classifier on pooled hidden states). Application
modes: ``select``, ``mixture``, ``fuse`` (per query) and ``arrow`` (per token); see :mod:`.apply`.
For a serving engine (one adapter per request, by name): :func:`engine_router` and :mod:`.serving`.
"""

from .api import engine_router, predict, predict_for_eval, route_build, route_eval, route_queries
from .apply import RoutedModel
from .decide import Decision, decide
from .registry import get, names
from .router import Router, load_router

__all__ = ["Decision", "RoutedModel", "Router", "decide", "engine_router", "get", "load_router", "names", "predict",
           "predict_for_eval", "route_build", "route_eval", "route_queries"]
