"""Arrow routing: parity with PEFT's implementation (ArrowConfig / create_arrow_model) on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from peftmerge.routing.arrow import top_right_singular_vector
from routing_util import TASKS, save_base, task_adapter

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj")


def gapped(folder):
    """Make rank component 0 dominant, so PEFT's 15 power iterations converge (its prototypes are exact)."""
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    for k, v in state.items():
        if "lora_A" in k:
            v[0] *= 6.0
    save_file(state, str(path))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrow")
    base = save_base(d / "base")
    tasks = list(TASKS) + ["extra"]
    ads = [gapped(task_adapter(d / t, t, base, seed=i + 1, r=4, targets=TARGETS, samples=0))
           for i, t in enumerate(tasks)]
    general = [gapped(task_adapter(d / f"g{i}", f"g{i}", base, seed=50 + i, r=4, targets=TARGETS, samples=0))
               for i in range(2)]
    return d, ads, general


def test_prototype_is_top_right_singular_vector():
    torch.manual_seed(0)
    a, b = torch.randn(5, 40), torch.randn(30, 5)
    v = top_right_singular_vector(a, b)
    _, _, vh = torch.linalg.svd(b @ a)
    assert torch.allclose(v.abs(), vh[0].abs(), atol=1e-5)
    assert abs(float(v.norm()) - 1) < 1e-5


def _peft_arrow(ads, general, top_k, temperature):
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=bool(general), rng_seed=0)
    return create_arrow_model(tiny_llama(0), [str(a) for a in ads], cfg,
                              general_adapter_paths=[str(g) for g in general] or None).eval()


@pytest.mark.parametrize("top_k,temperature,use_gks", [(2, 1.0, False), (3, 0.5, False), (2, 1.0, True)])
def test_arrow_matches_peft(setup, top_k, temperature, use_gks):
    from peftmerge.routing import route_build
    from peftmerge.routing.load import open_routed

    d, ads, general = setup
    general = general if use_gks else []
    out = d / f"router-{top_k}-{temperature}-{use_gks}"
    router = route_build([str(a) for a in ads], out, "arrow", top_k=top_k, temperature=temperature,
                         general=[str(g) for g in general] or None)
    routed, _ = open_routed(router)
    peft_model = _peft_arrow(ads, general, top_k, temperature)
    ids = torch.randint(4, 22, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = routed(ids, mask, plan=routed.arrow_plan(top_k, temperature)).logits
        base = tiny_llama(0)(input_ids=ids, attention_mask=mask).logits
    # prototypes equal up to sign, module by module
    n = 0
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_arrow") and "arrow_router" in module.lora_arrow:
            theirs = module.lora_arrow["arrow_router"].prototypes
            ours = router.tensors[f"proto.{name.removeprefix('base_model.model.')}"]
            cos = (theirs * ours).sum(1).abs()
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5), name
            n += 1
    assert n == 2 * len(TARGETS)
    assert (got - base).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_arrow_computes_only_selected_experts(setup):
    """Top-1 arrow over a row equals applying, token by token, only that token's best expert."""
    from peftmerge.routing import route_build
    from peftmerge.routing.apply import RoutedLinear
    from peftmerge.routing.load import open_routed

    d, ads, _ = setup
    router = route_build([str(a) for a in ads], d / "r-top1", "arrow", top_k=1)
    routed, _ = open_routed(router)
    layer = next(m for m in routed.modules() if isinstance(m, RoutedLinear))
    x = torch.randn(2, 5, layer.base.in_features)
    with routed.routed(routed.arrow_plan(1, 1.0)):
        got = layer(x)
    best = (x @ layer.prototypes.T).abs().argmax(-1)  # (2, 5)
    want = layer.base(x)
    for i in range(2):
        for t in range(5):
            a, b = layer.factors(layer.experts[int(best[i, t])])
            want[i, t] += b @ (a @ x[i, t])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
