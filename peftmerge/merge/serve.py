"""An adapter the multi-LoRA serving engines load as it is: one rank for every module, from the engine's sizes.

vLLM, SGLang, LoRAX and TGI keep every served adapter in buffers sized by a maximum rank and apply one
adapter per request. What they read of a PEFT adapter (their LoRA loaders):

- vLLM: ``--max-lora-rank`` is one of :data:`VLLM_RANKS` (``MaxLoRARanks`` in ``vllm/config/lora.py``); an
  adapter whose ``r`` is larger is refused, a smaller one is zero-padded into the buffers. Its PEFT helper
  refuses DoRA, ``bias`` other than ``none``, ``lora_bias`` and ``modules_to_save`` (recent versions accept
  only ``classifier``/``score`` heads of classification models); versions before ``rank_pattern`` support
  scale every module by the one ``lora_alpha / r``.
- SGLang copies each module into a buffer slice of the config's ``r``: every module must have rank ``r``.
- TGI and LoRAX stack one layer type's factors across layers (one rank per type) and scale by the one
  ``lora_alpha / r``.

So a served adapter has every module at one rank R, ``r = lora_alpha = R`` (scaling 1: peftmerge folds
the scaling into the factors) and no ``rank_pattern``, ``alpha_pattern``, bias or head. Each module's
factors ``(A, B)`` of rank k are brought to R by :func:`fit`:

    k <= R:  A' = [A; 0],  B' = [B, 0]              # zero rows and columns: B' A' = B A exactly
    k >  R:  B' A' = U_R S_R V_R^T of B A            # Eckart-Young: the best rank-R approximation
             error = ||B A - B' A'||_F / ||B A||_F = sqrt(sum_{i>R} s_i^2 / sum_i s_i^2)

R is ``serve_rank`` when it is a number, and for ``"vllm"`` the smallest vLLM size at least the largest
module rank (512 above that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import PeftmergeError
from .methods.lowrank import truncate_factors

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py: MaxLoRARanks
ENGINES = {"vllm": VLLM_RANKS}


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest vLLM ``--max-lora-rank`` that serves rank ``rank`` (None above 512)."""
    return next((size for size in VLLM_RANKS if size >= rank), None)


@dataclass(frozen=True)
class ServeRank:
    """What ``--serve-rank`` asked for: an engine's sizes (``"vllm"``) or one rank."""

    engine: str | None  # "vllm": the smallest of its sizes that holds the adapter's largest rank
    rank: int | None  # an explicit rank

    def target(self, largest: int) -> int:
        """The rank every module gets, for an adapter whose largest module rank is ``largest``."""
        if self.rank is not None:
            return self.rank
        sizes = ENGINES[self.engine]
        return next((size for size in sizes if size >= largest), sizes[-1])


def parse(value) -> ServeRank | None:
    """``--serve-rank``: None (off), ``"vllm"`` or a positive whole number (a string of one too)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ENGINES:
        return ServeRank(text, None)
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise PeftmergeError(f"--serve-rank {value!r} is not {' or '.join(ENGINES)} or a whole number >= 1 "
                             f"(vLLM's sizes: {', '.join(map(str, VLLM_RANKS))})")
    return ServeRank(None, int(text))


def refuse_unservable(*, heads: list[str] = (), biases: bool = False, where: str = "the output") -> None:
    """One-line refusal of what the serving engines do not load: task heads (modules_to_save) and bias tensors."""
    if heads:
        raise PeftmergeError(f"{where} carries task heads ({', '.join(heads)}: modules_to_save), which the "
                             "multi-LoRA engines do not serve per adapter (vLLM: only a classification model's "
                             "classifier/score; SGLang, LoRAX, TGI: none); drop --serve-rank and serve it with "
                             "PEFT, or merge adapters without heads")
    if biases:
        raise PeftmergeError(f"{where} carries bias updates (bias / lora_bias), which vLLM, SGLang, LoRAX and TGI "
                             "do not serve; drop --serve-rank, or merge into a full model with --base BASE")


def fit(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A', B', error)``: the factors ``a`` (k, d_in) and ``b`` (d_out, k) at rank ``rank``, zero-padded
    (exact, error 0) or optimally truncated (the relative Frobenius error of B' A' against b @ a)."""
    err = 0.0
    if a.shape[0] > rank:
        a_r, b_r, s = truncate_factors(b.float(), a.float(), rank)  # at most rank (fewer: b @ a's own rank bound)
        s2 = s.double().square()
        err = float((s2[rank:].sum() / s2.sum()).sqrt()) if float(s2.sum()) > 0 else 0.0
        a, b = a_r.to(a.dtype), b_r.to(b.dtype)
    k = a.shape[0]
    return (torch.cat([a, a.new_zeros(rank - k, a.shape[1])]).contiguous(),
            torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1).contiguous(), err)


def fit_all(factors: dict, serve: ServeRank) -> tuple[dict, dict]:
    """Every module of ``factors`` ({name: (A, B)}) at one rank; returns ``({name: (A', B', error)}, summary)``,
    the summary giving the rank, what was padded and truncated, the truncation errors and vLLM's
    ``--max-lora-rank`` for it."""
    largest = max(a.shape[0] for a, _ in factors.values())
    rank = serve.target(largest)
    out = {name: fit(a, b, rank) for name, (a, b) in factors.items()}
    errors = [err for _, _, err in out.values()]
    summary = {
        "requested": serve.engine or serve.rank, "rank": rank, "largest_rank_before": largest,
        "padded": sum(a.shape[0] < rank for a, _ in factors.values()),
        "truncated": sum(a.shape[0] > rank for a, _ in factors.values()),
        "truncation_error_mean": sum(errors) / len(errors), "truncation_error_max": max(errors),
        "vllm_max_lora_rank": vllm_max_lora_rank(rank),
    }
    return out, summary


def describe(summary: dict) -> str:
    """The summary line's part about serving: the rank, padding, truncation error and the engine flag."""
    text = f"serve rank {summary['rank']}: {summary['padded']} modules padded (exact)"
    if summary["truncated"]:
        text += (f", {summary['truncated']} truncated (truncation error mean {summary['truncation_error_mean']:.2e}, "
                 f"max {summary['truncation_error_max']:.2e})")
    vllm = summary["vllm_max_lora_rank"]
    return text + (f"; vLLM --max-lora-rank {vllm}" if vllm else "; above vLLM's largest --max-lora-rank 512")
