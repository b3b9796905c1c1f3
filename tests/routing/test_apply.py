"""Applying routed adapters: one adapter at p=1 equals PEFT; mixed batches equal each row alone;
mixture = fuse = PEFT's exact weighted merge; abstain gives the base model; generation; task heads."""

from __future__ import annotations

import pytest
import torch

from conftest import make_adapter, tiny_llama
from peftmerge.io.adapter import load_adapter
from peftmerge.routing.apply import RoutedModel
from peftmerge.routing.decide import Decision


@pytest.fixture(scope="module")
def ads(tmp_path_factory):
    d = tmp_path_factory.mktemp("apply")
    return [
        make_adapter(d / "a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "down_proj")),
        make_adapter(d / "b", seed=2, r=2, alpha=4, targets=("q_proj", "o_proj", "up_proj")),
        make_adapter(d / "c", seed=3, r=6, alpha=3, use_rslora=True, targets=("k_proj", "v_proj", "down_proj")),
    ]


def routed_model(ads):
    return RoutedModel(tiny_llama(0), [load_adapter(p) for p in ads])


def peft_logits(path, ids, mask=None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), str(path)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def peft_weighted(ads, weights, ids):
    """PEFT's exact weighted merge (combination_type='cat') of several adapters."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), str(ads[0]), adapter_name="a0")
    for i, p in enumerate(ads[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(ads))]
    model.add_weighted_adapter(names, list(weights), "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def decision(rows):
    """[[(adapter, weight), ...] or [] (abstain), ...] -> Decision padded to the largest k."""
    k = max(1, *(len(r) for r in rows))
    idx = torch.zeros(len(rows), k, dtype=torch.long)
    w = torch.zeros(len(rows), k)
    for i, r in enumerate(rows):
        for j, (e, p) in enumerate(r):
            idx[i, j], w[i, j] = e, p
    abstained = torch.tensor([not r for r in rows])
    return Decision(idx, w, abstained, torch.ones(len(rows)))


IDS = torch.randint(1, 128, (6, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["select", "mixture", "fuse"])
def test_one_adapter_at_p1_equals_peft(ads, mode):
    routed = routed_model(ads)
    for e, path in enumerate(ads):
        with torch.no_grad():
            got = routed(IDS, decision=decision([[(e, 1.0)]] * len(IDS)), mode=mode).logits
        torch.testing.assert_close(got, peft_logits(path, IDS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["mixture", "fuse"])
def test_mixture_equals_peft_weighted_merge(ads, mode):
    routed = routed_model(ads)
    with torch.no_grad():
        got = routed(IDS[:2], decision=decision([[(1, 0.6), (0, 0.3), (2, 0.1)]] * 2), mode=mode).logits
    torch.testing.assert_close(got, peft_weighted([ads[1], ads[0], ads[2]], [0.6, 0.3, 0.1], IDS[:2]),
                               rtol=1e-4, atol=1e-5)


ROWS = [[(2, 0.7), (0, 0.3)], [(0, 1.0)], [], [(1, 0.5), (2, 0.5)], [(0, 0.6), (1, 0.4)], [(2, 0.9), (1, 0.1)]]


@pytest.mark.parametrize("mode", ["select", "mixture", "fuse"])
def test_mixed_batch_equals_each_row_alone(ads, mode):
    routed = routed_model(ads)
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0  # left padding in one row
    with torch.no_grad():
        got = routed(IDS, mask, decision=decision(ROWS), mode=mode).logits
        for i, r in enumerate(ROWS):
            alone = routed(IDS[i:i + 1], mask[i:i + 1], decision=decision([r]), mode=mode).logits
            torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-4, atol=1e-5)
        if mode != "select":  # mixture and fuse are the same function
            other = routed(IDS, mask, decision=decision(ROWS), mode="fuse" if mode == "mixture" else "mixture")
            torch.testing.assert_close(got, other.logits, rtol=1e-4, atol=1e-5)


def test_abstain_returns_base_outputs(ads):
    routed = routed_model(ads)
    with torch.no_grad():
        base = tiny_llama(0)(input_ids=IDS).logits
        got = routed(IDS, decision=decision(ROWS), mode="mixture").logits
        assert (got[0] - base[0]).abs().max() > 1e-3
        torch.testing.assert_close(got[2], base[2], rtol=0, atol=0)
        torch.testing.assert_close(routed(IDS).logits, base, rtol=0, atol=0)  # no routing: the base model


def test_generate_mixed_batch_equals_each_row(ads):
    routed = routed_model(ads)
    ids = IDS[:4, :5]
    mask = torch.ones_like(ids)
    ids[2, :2], mask[2, :2] = 0, 0  # left padding
    rows = ROWS[:4]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = routed.generate(ids, mask, decision=decision(rows), mode="mixture", **kw)
        for i, r in enumerate(rows):
            alone = routed.generate(ids[i:i + 1], mask[i:i + 1], decision=decision([r]), mode="mixture", **kw)
            assert torch.equal(got[i:i + 1], alone)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_llama(0), str(ads[0])).eval()
    with torch.no_grad():
        want = peft_model.generate(input_ids=ids[1:2], attention_mask=mask[1:2], **kw)
    assert torch.equal(got[1:2], want)  # row 1 is adapter 0 alone


def test_classification_uses_the_routed_task_head(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification as Cls

    ads = [make_adapter(tmp_path / f"t{i}", seed=i + 1, task_type="SEQ_CLS", cls=Cls) for i in range(2)]
    from peftmerge.routing.load import head_tensors

    opened = [load_adapter(p) for p in ads]
    routed = RoutedModel(tiny_llama(0, cls=Cls, num_labels=3), opened, heads=[head_tensors(a) for a in opened])
    ids = IDS[:4]
    with torch.no_grad():
        got = routed(ids, decision=decision([[(1, 1.0)], [(0, 1.0)], [(0, 1.0)], [(1, 1.0)]])).logits
        for e, path in enumerate(ads):
            model = PeftModel.from_pretrained(tiny_llama(0, cls=Cls, num_labels=3), str(path)).eval()
            want = model(input_ids=ids).logits
            rows = [1, 2] if e == 0 else [0, 3]
            torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-5)


def test_rows_are_restored_before_the_lm_head_so_labels_line_up(ads):
    """Rows run sorted by adapter and are put back at the LM head's input: logits and the loss against
    ``labels`` (given in the caller's order) refer to the caller's rows, and no hook is left behind."""
    routed = routed_model(ads)
    rows = [[(2, 1.0)], [(0, 1.0)], [(1, 1.0)], [(0, 1.0)], [(2, 1.0)], [(1, 1.0)]]
    with torch.no_grad():
        out = routed(IDS, decision=decision(rows), mode="select", labels=IDS)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                             IDS[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert not routed.model.get_output_embeddings()._forward_pre_hooks
