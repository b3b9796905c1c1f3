"""peftmerge inspect: factor-space cosine against dense dW, sign conflicts and overlaps against hand counts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from peftmerge.analysis.inspect import inspect, mask_stats
from peftmerge.io.adapter import load_adapter


def test_mask_stats_by_hand():
    d0 = torch.tensor([[5.0, -4.0, 0.1], [3.0, 0.2, -2.0]])
    d1 = torch.tensor([[-6.0, -1.0, 0.3], [2.0, 5.0, 0.05]])
    # top-3 of |d0|: (0,0) (0,1) (1,0); of |d1|: (0,0) (1,1) (1,0); shared (0,0) [+ vs -] and (1,0) [+ vs +]
    both, conflict, union = mask_stats(torch.stack([d0, d1]), 0.5)
    assert both[0, 1] == 2 and conflict[0, 1] == 1 and union[0, 1] == 4
    assert both[0, 0] == 3 and conflict[0, 0] == 0


def _dense(adapters, name):
    return [a.delta(name).flatten() if name in a.modules else None for a in adapters]


def test_cosine_conflict_overlap_match_dense(adapters):
    r = inspect([str(p) for p in adapters], density=0.3, progress=False)
    loaded = [load_adapter(p) for p in adapters]
    names = [m["module"] for m in r["per_module"]]
    assert set(names) == set().union(*(a.modules for a in loaded))
    n, size = len(loaded), {}
    dot = torch.zeros(n, n, dtype=torch.float64)
    both = torch.zeros(n, n)
    conf = torch.zeros(n, n)
    union = torch.zeros(n, n)
    for row in r["per_module"]:
        flat = _dense(loaded, row["module"])
        size[row["module"]] = next(f.numel() for f in flat if f is not None)
        flat = [f if f is not None else torch.zeros(size[row["module"]]) for f in flat]
        keep = []
        for f in flat:  # top-k by hand: a Python set of the k largest |x|
            k = int(0.3 * f.numel())
            keep.append(set(torch.topk(f.abs(), k).indices.tolist()) if f.abs().sum() > 0 else set())
        for i in range(n):
            assert row["norm"][i] == pytest.approx(float(flat[i].norm()), rel=1e-4)
            for j in range(n):
                d = float(flat[i].double() @ flat[j].double())
                dot[i, j] += d
                if i != j and flat[i].norm() > 0 and flat[j].norm() > 0:
                    want = d / float(flat[i].norm() * flat[j].norm())
                    assert row["cosine"][i][j] == pytest.approx(want, abs=1e-4)
                shared = keep[i] & keep[j]
                c = sum(1 for e in shared if (flat[i][e] > 0) != (flat[j][e] > 0))
                both[i, j] += len(shared)
                conf[i, j] += c
                union[i, j] += len(keep[i] | keep[j])
                if shared and i != j:
                    assert row["sign_conflict"][i][j] == pytest.approx(c / len(shared), abs=1e-6)
    o = r["overall"]
    for i in range(n):
        for j in range(n):
            if i != j:
                assert o["cosine"][i][j] == pytest.approx(float(dot[i, j] / (dot[i, i] * dot[j, j]).sqrt()), abs=1e-4)
                assert o["sign_conflict"][i][j] == pytest.approx(float(conf[i, j] / both[i, j]), abs=1e-6)
                assert o["jaccard"][i][j] == pytest.approx(float(both[i, j] / union[i, j]), abs=1e-6)
        assert o["norm"][i] == pytest.approx(float(dot[i, i].sqrt()), rel=1e-4)


def test_identical_adapters_agree_fully(adapters):
    r = inspect([str(adapters[0]), str(adapters[0])], progress=False)
    o = r["overall"]
    assert o["cosine"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert o["sign_conflict"][0][1] == 0 and o["jaccard"][0][1] == pytest.approx(1.0)


def test_cli_inspect_writes_table_and_heatmaps(adapters, tmp_path):
    from peftmerge.cli.main import main

    out = tmp_path / "diag"
    res = CliRunner().invoke(main, ["inspect", *map(str, adapters), "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "| pair | cosine | sign conflict | mask Jaccard |" in res.output
    for f in ("cosine.png", "sign_conflict.png", "jaccard.png", "modules.png"):
        assert (out / f).stat().st_size > 1000
    assert json.loads((out / "inspect.json").read_text())["modules"] > 0


@pytest.mark.parametrize("extra, message", [([], "at least two adapters"),
                                            (["--density", "0"], "must be in (0, 1]")])
def test_cli_inspect_bad_input_exit_2(adapters, extra, message):
    from peftmerge.cli.main import main

    inputs = [str(adapters[0])] if not extra else [str(adapters[0]), str(adapters[1])]
    res = CliRunner().invoke(main, ["inspect", *inputs, *extra])
    assert res.exit_code == 2 and message in res.output
