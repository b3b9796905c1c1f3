"""The adapter a serving engine should be asked for, per query.

vLLM, SGLang, LoRAX and TGI apply one LoRA adapter per request, chosen by the name it is served under
(vLLM: ``--lora-modules NAME=PATH``, then ``"model": NAME`` in the request). A router's adapters are served
under their task names (:func:`lora_modules`), so a query router's decision becomes one name per query
(:func:`engine_names`): its top-1 adapter, exactly what ``predict --mode select`` applies; a query the
router abstains on goes to the base model (no name). A top-k > 1 router's mixture cannot be served; its
top-1 is.

Arrow routes each token in each adapted layer to its own mixture of adapters, which these engines
cannot run. Its per-query form (``per_query``) names, for each query,

    argmax_i  W_i,   W_i = mean over the adapted modules m and prompt tokens t of w_{m,t,i}

where w_{m,t,i} is the weight Arrow gives adapter i at token t in module m (zero outside that token's
top-k), taken in one forward pass of the prompt through the base model with Arrow applied. It is a
routing decision for the whole request, not Arrow: the engine then applies that one adapter to every
token, generated ones included.
"""

from __future__ import annotations

from ..errors import PeftmergeError
from .decide import Decision
from .router import Router

ENGINES = "vLLM, SGLang, LoRAX and TGI"


def check(router: Router, per_query: bool) -> None:
    """Refuse (one line) to name adapters for a per-token router unless its per-query form is asked for."""
    if router.spec.per_token and not per_query:
        raise PeftmergeError(f"the {router.strategy} router mixes adapters per token and layer, which {ENGINES} "
                             "cannot serve (one adapter per request); pass --per-query to name, per query, the "
                             "adapter with the largest mean Arrow weight over its tokens (see docs/serving.md)")
    if per_query and not router.spec.per_token:
        raise PeftmergeError(f"--per-query applies to per-token (arrow) routers; the {router.strategy} router "
                             "routes per query already: drop --per-query")


def engine_names(router: Router, decision: Decision) -> list[str | None]:
    """Per query, the name of its top-1 adapter (None where the router abstains: the base model)."""
    return [router.tasks[c[0][0]] if c else None for c in decision.rows()]


def lora_modules(router: Router) -> dict[str, str]:
    """``{name: adapter folder}``: what to serve, as vLLM's ``--lora-modules NAME=PATH`` takes it."""
    return {a.task: a.path for a in router.adapters}
