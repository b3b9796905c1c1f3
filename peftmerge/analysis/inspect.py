"""``inspect``: where LoRA task vectors agree and conflict, per module and overall (streaming).

For inputs i, j and each module (dW_i = s_i B_i A_i):

- cosine: <dW_i, dW_j> / (|dW_i| |dW_j|), exact in factor space without forming dW:
  <B_i A_i, B_j A_j> = tr(A_i^T B_i^T B_j A_j) = sum((B_i^T B_j) * (A_i A_j^T))   (r_i x r_j matrices);
  overall it is the cosine of the whole adapters (inner products and squared norms summed over modules);
- sign conflict: among entries in the top-``density`` magnitude masks of both (TIES' trim, Yadav et al.
  2023, arXiv:2306.01708), the fraction whose signs differ; dense, one module at a time;
- mask overlap: Jaccard |M_i & M_j| / |M_i | M_j| of those masks (how much of what each keeps is shared);
- norms: |dW_i|_F per module and overall.

Only one module's dense task vectors are in memory at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import PeftmergeError
from ..io import atomic
from ..merge.engine.selection import magnitude_mask
from ..merge.plan import open_inputs, plan_modules, stacked_deltas


def factor_inner(a1, b1, a2, b2) -> torch.Tensor:
    """<b1 @ a1, b2 @ a2>_F without forming either product."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def gram(factors: list[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
    """(n, n) inner products of the task vectors given as (A, s B) factors (None: the input lacks the module)."""
    n = len(factors)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            if factors[i] is not None and factors[j] is not None:
                g[i, j] = g[j, i] = float(factor_inner(*factors[i], *factors[j]))
    return g


def mask_stats(deltas: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, n) counts over one module: |M_i & M_j|, sign conflicts in M_i & M_j, |M_i | M_j|."""
    masks = magnitude_mask(deltas, density).reshape(deltas.shape[0], -1)
    masks &= deltas.reshape(deltas.shape[0], -1) != 0  # an absent module / exact zeros keep nothing
    m = masks.double()
    pos = (masks & (deltas.reshape(deltas.shape[0], -1) > 0)).double()
    neg = m - pos
    both = m @ m.T
    conflict = pos @ neg.T + neg @ pos.T
    sizes = m.sum(1)
    union = sizes[:, None] + sizes[None, :] - both
    return both, conflict, union


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, float("nan")))


def _cosine(g: torch.Tensor) -> torch.Tensor:
    norms = g.diagonal().clamp(min=0).sqrt()
    return _ratio(g, norms[:, None] * norms[None, :])


def _matrix(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(x) else round(x, 6) for x in row] for row in t.tolist()]


def inspect(inputs: Sequence[str | Path], out: str | Path | None = None, *, density: float = 0.2,
            alpha: float | None = None, force: bool = False, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Conflict diagnostics of LoRA adapters; writes inspect.json/.md and PNG heatmaps to ``out`` if given."""
    if len(inputs) < 2:
        raise PeftmergeError("inspect needs at least two adapters to compare; give two or more")
    if not 0 < density <= 1:
        raise PeftmergeError(f"--density {density} must be in (0, 1]")
    if out is not None:
        out = atomic.check_output(out, [Path(p) for p in inputs], overwrite)
    adapters = open_inputs(list(inputs), alpha=alpha, force=force)
    plans = plan_modules(adapters, force=force)
    n = len(adapters)
    tot_g = torch.zeros(n, n, dtype=torch.float64)
    tot_both, tot_conf, tot_union = (torch.zeros(n, n, dtype=torch.float64) for _ in range(3))
    rows = []
    for plan in tqdm(plans, desc="inspect", unit="module", disable=not progress):
        g = gram([adapters[i].scaled_factors(plan.name) if i in plan.present else None for i in range(n)])
        both, conflict, union = mask_stats(stacked_deltas(adapters, plan), density)
        tot_g += g
        tot_both += both
        tot_conf += conflict
        tot_union += union
        rows.append({"module": plan.name, "norm": [round(x, 6) for x in g.diagonal().sqrt().tolist()],
                     "cosine": _matrix(_cosine(g)), "sign_conflict": _matrix(_ratio(conflict, both)),
                     "jaccard": _matrix(_ratio(both, union))})
    tasks = [a.task for a in adapters]
    result = {
        "tasks": tasks, "inputs": [str(a.path) for a in adapters], "density": density, "modules": len(rows),
        "overall": {"norm": [round(x, 6) for x in tot_g.diagonal().sqrt().tolist()],
                    "cosine": _matrix(_cosine(tot_g)), "sign_conflict": _matrix(_ratio(tot_conf, tot_both)),
                    "jaccard": _matrix(_ratio(tot_both, tot_union))},
        "per_module": rows,
    }
    if out is not None:
        with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "inspect.json").write_text(json.dumps(result, indent=2))
            (tmp / "inspect.md").write_text(markdown(result))
            heatmaps(result, tmp)
    return result


def _pairs(tasks):
    return [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]


def markdown(result: dict) -> str:
    """Pairwise overall table, then the norms, then the 10 modules with the most sign conflict."""
    t, o = result["tasks"], result["overall"]
    f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"# Task-vector diagnostics (top-{result['density']:g} masks, {result['modules']} modules)", "",
             "| pair | cosine | sign conflict | mask Jaccard |", "|---|---|---|---|"]
    for i, j in _pairs(t):
        lines.append(f"| {t[i]} / {t[j]} | {f(o['cosine'][i][j])} | {f(o['sign_conflict'][i][j])} | "
                     f"{f(o['jaccard'][i][j])} |")
    lines += ["", "| task | norm |", "|---|---|"] + [f"| {t[i]} | {f(o['norm'][i])} |" for i in range(len(t))]
    worst = []
    for r in result["per_module"]:
        vals = [r["sign_conflict"][i][j] for i, j in _pairs(t) if r["sign_conflict"][i][j] is not None]
        if vals:
            worst.append((sum(vals) / len(vals), r["module"]))
    if worst:
        lines += ["", "| module (most conflict) | mean sign conflict |", "|---|---|"]
        lines += [f"| {m} | {v:.4f} |" for v, m in sorted(worst, reverse=True)[:10]]
    return "\n".join(lines) + "\n"


def heatmaps(result: dict, folder: Path) -> None:
    """cosine.png, sign_conflict.png, jaccard.png (task x task, overall) and modules.png (module x pair)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t = result["tasks"]
    for key, title in (("cosine", "cosine similarity"), ("sign_conflict", "sign conflict (top-k)"),
                       ("jaccard", "mask overlap (Jaccard)")):
        m = np.array([[np.nan if x is None else x for x in row] for row in result["overall"][key]], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 * len(t) + 2, 1.0 * len(t) + 1.5))
        im = ax.imshow(m, cmap="coolwarm" if key == "cosine" else "viridis")
        ax.set_xticks(range(len(t)), t, rotation=45, ha="right")
        ax.set_yticks(range(len(t)), t)
        for i in range(len(t)):
            for j in range(len(t)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w")
        fig.colorbar(im)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=110)
        plt.close(fig)
    pairs = _pairs(t)
    mods = result["per_module"]
    m = np.array([[np.nan if r["cosine"][i][j] is None else r["cosine"][i][j] for i, j in pairs] for r in mods])
    fig, ax = plt.subplots(figsize=(1.0 * len(pairs) + 4, min(0.18 * len(mods) + 2, 30)))
    im = ax.imshow(m, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(pairs)), [f"{t[i]}/{t[j]}" for i, j in pairs], rotation=45, ha="right")
    ax.set_yticks(range(len(mods)), [r["module"] for r in mods], fontsize=5)
    fig.colorbar(im)
    ax.set_title("cosine per module")
    fig.tight_layout()
    fig.savefig(folder / "modules.png", dpi=110)
    plt.close(fig)
