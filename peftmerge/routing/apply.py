"""Apply routed adapters to a plain transformers model, per row of a mixed batch.

Every adapted ``nn.Linear`` of the base model is replaced by a :class:`RoutedLinear` holding each task
adapter's factors (A_i, s_i B_i). One forward pass then serves rows routed to different adapters,
computing for each adapter only the rows (or, for Arrow, the tokens) that selected it:

- ``select``:  y_b = W x_b + s_e B_e A_e x_b with e = the row's top-1 adapter;
- ``mixture``: y_b = W x_b + sum_{i in top-k(b)} p_bi s_i B_i A_i x_b (exact output-space sum);
- ``fuse``:    the same function through one merged adapter per query, built by concatenating factors,
               B_b = [p_b1 s_1 B_1, ..., p_bk s_k B_k], A_b = [A_1; ...; A_k] (exact, rank sum r_i); rows
               with the same adapter set share the concatenated factors and differ by their p;
- ``arrow``:   per token and per layer (see :mod:`peftmerge.routing.arrow`), only the top-k experts of
               each token are computed (gather tokens per expert, ``index_add_`` back).

Rows are reordered by their top-1 adapter (or adapter set) before the forward pass and put back after,
so that each adapter's rows are a contiguous slice (a view, no copy); rows are independent in a
transformer, so this changes nothing else. A classification model's head (``score`` / ``classifier``) is
replaced by a :class:`RoutedHead` that applies each row's top-1 task head (padded with -inf to the
largest label count).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PeftmergeError
from .arrow import arrow_weights, genknowsub
from .decide import Decision

MODES = ("select", "mixture", "fuse", "arrow")


@dataclass
class Plan:
    """What the patched layers do in the current forward pass."""

    mode: str
    groups: list = field(default_factory=list)  # select/mixture: (e, rows, w|None); fuse: (adapters, rows, p)
    head_groups: list = field(default_factory=list)  # (e, rows): rows whose head is task e's
    top_k: int = 3  # arrow
    temperature: float = 1.0  # arrow
    stats: torch.Tensor | None = None  # arrow: (B, E) summed weights per row, when collected
    token_mask: torch.Tensor | None = None  # arrow: (B, L) prompt tokens counted in stats


class State:
    plan: Plan | None = None


def _rows(idx: torch.Tensor):
    """A sorted LongTensor of rows -> a slice when contiguous (a view instead of a gather)."""
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == idx.numel() else idx


def _add_lowrank(out: torch.Tensor, rows, z: torch.Tensor, b: torch.Tensor) -> None:
    """out[rows] += z @ b.T, in place (one fused ``addmm_`` on a contiguous slice of rows)."""
    if isinstance(rows, slice):
        seg = out[rows]
        if seg.is_contiguous():
            seg.view(-1, seg.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), b.T)
            return
        seg += F.linear(z, b)
    else:
        out.index_add_(0, rows, F.linear(z, b))


class RoutedLinear(nn.Module):
    """A base ``nn.Linear`` plus the factors of the adapters that adapt it."""

    def __init__(self, base: nn.Linear, state: State):
        super().__init__()
        self.base, self.state = base, state
        self.adapters: list[int] = []
        self._cat: dict = {}
        self.register_buffer("prototypes", None, persistent=False)
        self.experts: list[int] = []

    def add(self, e: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Adapter ``e``'s factors ``a`` (r, d_in) and scaled ``b`` (d_out, r)."""
        w = self.base.weight
        self.register_buffer(f"a{e}", a.to(w.device, w.dtype).contiguous(), persistent=False)
        self.register_buffer(f"b{e}", b.to(w.device, w.dtype).contiguous(), persistent=False)
        self.adapters.append(e)
        self._cat.clear()

    def factors(self, e: int):
        return getattr(self, f"a{e}"), getattr(self, f"b{e}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self.state.plan
        if plan is None:
            return out
        if plan.mode == "arrow":
            return self._arrow(x, out, plan)
        if plan.mode == "fuse":
            return self._fuse(x, out, plan)
        for e, rows, w in plan.groups:
            if e not in self.adapters:
                continue
            a, b = self.factors(e)
            z = F.linear(x[rows], a)
            if w is not None:
                z = z * w.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
            _add_lowrank(out, rows, z, b)
        return out

    def _concat(self, adapters: tuple):
        if adapters not in self._cat:
            present = [(j, e) for j, e in enumerate(adapters) if e in self.adapters]
            if not present:
                self._cat[adapters] = None
            else:
                a = torch.cat([self.factors(e)[0] for _, e in present])
                b = torch.cat([self.factors(e)[1] for _, e in present], dim=1)
                cols = torch.cat([torch.full((self.factors(e)[0].shape[0],), j) for j, e in present])
                self._cat[adapters] = (a, b, cols.to(a.device))
        return self._cat[adapters]

    def _fuse(self, x, out, plan: Plan):
        for adapters, rows, p in plan.groups:
            cat = self._concat(adapters)
            if cat is None:
                continue
            a, b, cols = cat
            w = p[:, cols].to(x.dtype)  # (n, K): the query's weight on each rank column
            z = F.linear(x[rows], a) * w.view(w.shape[0], *([1] * (x.dim() - 2)), w.shape[1])
            _add_lowrank(out, rows, z, b)
        return out

    def _arrow(self, x, out, plan: Plan):
        if self.prototypes is None:
            return out
        d_out = out.shape[-1]
        t = x.reshape(-1, x.shape[-1])  # (T, d_in)
        w, idx = arrow_weights(t, self.prototypes.to(t.dtype), plan.top_k, plan.temperature)  # (T, k)
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        tok = torch.arange(t.shape[0], device=t.device).repeat_interleave(k)[order]
        ww = w.reshape(-1)[order]
        flat_out = out.view(-1, d_out)
        xs = t.index_select(0, tok)
        start = 0
        for j, c in enumerate(torch.bincount(flat, minlength=len(self.experts)).tolist()):
            if c:
                a, b = self.factors(self.experts[j])
                seg = slice(start, start + c)
                flat_out.index_add_(0, tok[seg], F.linear(F.linear(xs[seg], a) * ww[seg, None], b))
                start += c
        if plan.stats is not None and plan.token_mask is not None and tuple(x.shape[:2]) == tuple(
                plan.token_mask.shape):
            row_of = torch.arange(t.shape[0], device=t.device) // x.shape[1]
            m = plan.token_mask.reshape(-1).to(w.dtype)
            experts = torch.tensor(self.experts, device=t.device)[idx]  # (T, k) global adapter indices
            plan.stats.index_put_((row_of[:, None].expand_as(idx), experts), (w * m[:, None]).float(),
                                  accumulate=True)
        return out


class RoutedHead(nn.Module):
    """A classification head (``nn.Linear``) replaced by each row's task head."""

    def __init__(self, base: nn.Linear, state: State):
        super().__init__()
        self.base, self.state = base, state
        self.heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, e: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = self.base.weight
        self.heads[e] = (weight.to(w.device, w.dtype), None if bias is None else bias.to(w.device, w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self.state.plan
        if plan is None:
            return out
        for e, rows in plan.head_groups:
            if e in self.heads:
                w, b = self.heads[e]
                y = F.linear(x[rows], w, b)
                pad = torch.full((*y.shape[:-1], out.shape[-1]), float("-inf"), dtype=y.dtype, device=y.device)
                pad[..., : y.shape[-1]] = y
                out[rows] = pad
        return out


def make_plan(decision: Decision, mode: str):
    """A :class:`Plan` for ``decision`` and the row order it needs (``perm``), or None to keep the order."""
    if mode not in MODES or mode == "arrow":
        raise PeftmergeError(f"mode {mode!r} is not one of select, mixture, fuse (arrow routes per token)")
    idx, weights = decision.indices, decision.weights
    active = ~decision.abstained
    if mode == "fuse":
        keys = [tuple(int(e) for e, w in zip(i, p) if w > 0) for i, p in zip(idx, weights)]
        sets = sorted({k for k, a in zip(keys, active) if a})
        key = torch.tensor([sets.index(k) if a else -1 for k, a in zip(keys, active)])
    else:
        key = torch.where(active, idx[:, 0], torch.full_like(idx[:, 0], -1))
    perm = key.argsort(stable=True)
    key, idx, weights, active = key[perm], idx[perm], weights[perm], active[perm]
    plan = Plan(mode)
    for e in sorted(set(key.tolist()) - {-1}):
        rows = _rows(torch.nonzero(key == e).flatten())
        plan.head_groups.append((sets[e][0] if mode == "fuse" else e, rows))
        if mode == "select":
            plan.groups.append((e, rows, None))
        elif mode == "fuse":
            plan.groups.append((sets[e], rows, weights[rows][:, : len(sets[e])]))
    if mode == "mixture":
        for e in sorted(set(idx[active].flatten().tolist())):
            hit = (idx == e) & (weights > 0) & active[:, None]  # (n, k)
            first = torch.nonzero(hit[:, 0]).flatten()
            rest = torch.nonzero(hit[:, 1:].any(1)).flatten()
            for part in (first, rest):
                if part.numel():
                    w = (weights * hit)[part].sum(1)
                    plan.groups.append((e, _rows(part), w))
    return plan, perm


class RoutedModel(nn.Module):
    """A transformers model whose adapted Linear layers apply per-row routed LoRA adapters.

    ``adapters``: LoraAdapter list (router order); ``arrow``: the arrow router's tensors (prototypes per
    module) to enable ``mode="arrow"``; ``general``: GenKnowSub's general adapters (arrow only).
    """

    def __init__(self, model: nn.Module, adapters: list, arrow: dict | None = None, general: list | None = None,
                 heads: list | None = None):
        super().__init__()
        self.model, self.state = model, State()
        self.n_adapters = len(adapters)
        self.layers: dict[str, RoutedLinear] = {}
        for e, adapter in enumerate(adapters):
            for name, m in adapter.modules.items():
                if m.kind != "linear":
                    raise PeftmergeError(f"{adapter.path}: module {name} is an embedding LoRA; routing applies "
                                         "Linear LoRA layers only")
                a, b = adapter.factors(name)
                if general:
                    (a, b), = genknowsub([(a, b)], [g.factors(name) for g in general])
                self._layer(name, adapter).add(e, a, b * m.scaling)
        for name, layer in self.layers.items():
            if arrow and f"proto.{name}" in arrow:
                layer.prototypes = arrow[f"proto.{name}"].to(layer.base.weight.device)
                layer.experts = arrow[f"experts.{name}"].tolist()
        self.heads: dict[str, RoutedHead] = {}
        for e, head in enumerate(heads or []):
            for module, (weight, bias) in head.items():
                if module not in self.heads:
                    base = self.model.get_submodule(module)
                    if not isinstance(base, nn.Linear):
                        raise PeftmergeError(f"head {module} is a {type(base).__name__}; only Linear task heads "
                                             "can be routed")
                    self.heads[module] = RoutedHead(base, self.state)
                    self.model.set_submodule(module, self.heads[module])
                self.heads[module].add(e, weight, bias)

    def _layer(self, name: str, adapter) -> RoutedLinear:
        if name not in self.layers:
            try:
                base = self.model.get_submodule(name)
            except AttributeError:
                raise PeftmergeError(f"{adapter.path}: module {name} is not in the base model "
                                     f"{type(self.model).__name__}; route adapters of this base model") from None
            if not isinstance(base, nn.Linear):
                raise PeftmergeError(f"{adapter.path}: module {name} is a {type(base).__name__}, not a Linear layer")
            if tuple(base.weight.shape) != adapter.modules[name].shape:
                raise PeftmergeError(f"{adapter.path}: module {name} has shape {list(adapter.modules[name].shape)}, "
                                     f"the base model's {list(base.weight.shape)}; use the adapters' base model")
            self.layers[name] = RoutedLinear(base, self.state)
            self.model.set_submodule(name, self.layers[name])
        return self.layers[name]

    @property
    def config(self):
        return self.model.config

    @contextlib.contextmanager
    def routed(self, plan: Plan | None):
        old, self.state.plan = self.state.plan, plan
        try:
            yield
        finally:
            self.state.plan = old

    def arrow_plan(self, top_k: int, temperature: float, stats_for: torch.Tensor | None = None) -> Plan:
        """An arrow plan; with ``stats_for`` (an attention mask) it sums each row's expert weights."""
        if not any(layer.prototypes is not None for layer in self.layers.values()):
            raise PeftmergeError("this routed model has no arrow prototypes; build it from an arrow router")
        plan = Plan("arrow", top_k=int(top_k), temperature=float(temperature))
        if stats_for is not None:
            plan.token_mask = stats_for
            plan.stats = torch.zeros(stats_for.shape[0], self.n_adapters, device=stats_for.device)
        return plan

    def forward(self, input_ids, attention_mask=None, decision: Decision | None = None, mode: str = "select",
                plan: Plan | None = None, **kwargs):
        """Logits of the routed model; ``decision`` per row (None with ``plan`` or for the base model)."""
        perm = None
        if decision is not None:
            plan, perm = make_plan(decision, mode)
            input_ids = input_ids[perm]
            attention_mask = None if attention_mask is None else attention_mask[perm]
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs.setdefault("use_cache", False)  # a cache would be in the sorted row order
        with self.routed(plan), self._restore_order(perm) as restored:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if perm is not None and not restored:
            out.logits = out.logits[perm.argsort()]
        return out

    @contextlib.contextmanager
    def _restore_order(self, perm: torch.Tensor | None):
        """Put rows back in their order at the LM head's input (a (B, L, d) tensor), not at its output.

        A causal LM's logits are (B, L, vocab): reordering them after the forward copies vocab/d times more
        (for SmolLM2, 85x) than reordering the last hidden state; in a 32 x 64 batch that copy alone cost 7-10%
        of the forward. Yields whether the hook was set (models without an output embedding: no).
        """
        embeddings = getattr(self.model, "get_output_embeddings", None)
        head = embeddings() if perm is not None and embeddings is not None else None
        if not isinstance(head, nn.Module) or head in self.heads.values():
            yield False
            return
        inverse = perm.argsort()
        handle = head.register_forward_pre_hook(lambda _, args: (args[0].index_select(0, inverse), *args[1:]))
        try:
            yield True
        finally:
            handle.remove()

    def generate(self, input_ids, attention_mask=None, decision: Decision | None = None, mode: str = "select",
                 plan: Plan | None = None, **kwargs):
        """``model.generate`` with per-row routing (greedy or sampling; one sequence per row)."""
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1:
            raise PeftmergeError("routed generation supports num_beams=1 and num_return_sequences=1")
        perm = None
        if decision is not None:
            plan, perm = make_plan(decision, mode)
            input_ids = input_ids[perm]
            attention_mask = None if attention_mask is None else attention_mask[perm]
        with self.routed(plan):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if perm is not None:
            out = out[perm.argsort()]
        return out
