"""A transform reads a model's canonical views once per call (``one_call``) and points the new model's views
at its blank tensors without walking the layout again (``views_like``); neither may change what is written.

Adversarial cases: a parameter stored transposed (the blank model's is contiguous, so re-pointing a view with
the source's strides would address the wrong entries: ``views_like`` must fall back), a parameter replaced
between two calls (views are never kept across calls), and a bridge whose blank is a bare model of other names.
The transforms are checked directly: logits of the original and the new model in float64, to 1e-10."""
from __future__ import annotations

import pytest
import torch
from test_layout_bits import FAMILIES, _bridge, build

import workbench as wb
from workbench.models import _layout, blank, canonical_views, one_call, views_like


def _where(views: dict) -> dict:
    return {k: (v.untyped_storage().data_ptr(), tuple(v.shape), v.stride(), v.storage_offset(), v.dtype)
            for k, v in views.items()}


def _counted(monkeypatch, module=_layout, name: str = "_canonical_views") -> list:
    """The models ``module.name`` is called with from now on (the function itself still runs)."""
    calls = []
    real = getattr(module, name)

    def spy(model):
        calls.append(model)
        return real(model)
    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2-bridge", "gpt2-bridge"])
def test_views_like_are_the_new_models_own_canonical_views(family):
    model = build(family.removesuffix("-bridge"))
    if family.endswith("-bridge"):
        model = _bridge(model)
    for dtype in (torch.float32, torch.float64):
        new = blank(model, dtype)
        got, want = views_like(canonical_views(model), model, new), canonical_views(new)
        assert want is not None and _where(got) == _where(want)


def test_a_transposed_parameter_falls_back_and_the_transform_is_exact(monkeypatch):
    model = build("phi", torch.float64)  # untied: lm_head is its own parameter (LayerNorm computed in float64)
    w = model.lm_head.weight.detach()
    model.lm_head.weight = torch.nn.Parameter(w.T.contiguous().T)  # same values, column-major storage
    assert model.lm_head.weight.stride() != w.stride()
    src = canonical_views(model)
    new = blank(model, torch.float64)
    want = canonical_views(new)
    # the negative control: the source's strides on the blank's (contiguous) tensor address other entries
    key = next(k for k, v in src.items() if v.untyped_storage().data_ptr() == model.lm_head.weight.untyped_storage().data_ptr())
    t = new.lm_head.weight.detach()
    naive = t.as_strided(src[key].shape, src[key].stride(), t.storage_offset())
    assert naive.stride() != want[key].stride()
    assert _where(views_like(src, model, new)) == _where(want)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    out, _ = wb.random_intertwiner(model, seed=4)
    with torch.no_grad():
        a, b = model(ids).logits, out(ids).logits
    assert not torch.equal(out.lm_head.weight, model.lm_head.weight)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10


def test_one_transform_computes_the_views_once(monkeypatch):
    model = build("qwen2")
    wb.random_intertwiner(model, seed=0)  # first-call caches (layout, rotary pairs) out of the way
    calls = _counted(monkeypatch)
    wb.random_intertwiner(model, seed=1)
    assert calls == [model]  # the map's and the push's; the new model's come from views_like
    calls.clear()
    new, t = wb.random_intertwiner(model, seed=1)
    wb.apply_transform(model, t)
    assert calls == [model, model]  # one per call, never kept between calls


def test_views_are_not_kept_across_calls_or_models(monkeypatch):
    model = build("gpt2", torch.float64)
    calls = _counted(monkeypatch)
    with one_call():
        a, b = canonical_views(model), canonical_views(model)
        assert a is not b and _where(a) == _where(b) and len(calls) == 1
        a.clear()  # a caller's dict is its own
        assert canonical_views(model)
        twin = build("gpt2", torch.float64)  # another object of the same structure: its own views
        assert _where(canonical_views(twin)) != _where(b) and len(calls) == 2
    p = model.transformer.wpe.weight
    model.transformer.wpe.weight = torch.nn.Parameter(p.detach().clone())  # replaced between two calls
    after = canonical_views(model)
    ptr = model.transformer.wpe.weight.untyped_storage().data_ptr()
    assert ptr in {v.untyped_storage().data_ptr() for v in after.values()}
    assert p.untyped_storage().data_ptr() not in {v.untyped_storage().data_ptr() for v in after.values()}
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    out, _ = wb.random_intertwiner(model, seed=2)
    with torch.no_grad():
        x, y = model(ids).logits, out(ids).logits
    assert ((x - y).abs().max() / x.abs().max()).item() < 1e-10


def test_the_structure_check_runs_once_per_transform_and_again_on_the_next_call(monkeypatch):
    from workbench.models import _hf

    model = build("gpt2", torch.float64)
    wb.random_intertwiner(model, seed=0)
    checked = _counted(monkeypatch, _hf, "_unsupported")
    wb.random_intertwiner(model, seed=1)
    assert checked == [model]  # the map's and the push's question, answered once
    # An edit between two calls is seen by the next one: a module swapped after the model was built is refused.
    model.transformer.h[0].mlp.act = torch.nn.ReLU()
    with pytest.raises(wb.UnsupportedModelError, match="was changed after it was built"):
        wb.random_intertwiner(model, seed=2)
    assert checked[1:] and all(m is model for m in checked)
    with one_call():  # inside one call, asked twice of one model, answered once; another object is its own
        twin = build("gpt2", torch.float64)
        assert _hf.unsupported(model) == _hf.unsupported(model) and _hf.unsupported(twin) is None
        assert [m for m in checked[2:] if m is model] == [model] and [m for m in checked if m is twin] == [twin]


def test_the_config_key_is_made_once_per_call_and_sees_an_edit_on_the_next(monkeypatch):
    """``_hf._config_key`` (a layout's lookup key: the class and the ``repr`` of every config attribute) is made once
    per config object inside a call, and again on the next call: a config edited between two calls (a norm's eps,
    which its modules were built with) is read anew and refused as an edit, and a second config of equal contents
    is its own object."""
    from workbench.models import _hf

    model = build("gpt2", torch.float64)
    wb.random_intertwiner(model, seed=0)
    made = _counted(monkeypatch, _hf, "_config_repr")
    wb.random_intertwiner(model, seed=1)
    assert made == [model.config]  # the map, the push, the adapter and the layout: one repr
    with one_call():
        before = _hf.config_key(model)
        model.config.layer_norm_epsilon = 0.5  # an edit inside one call is not read there (no verb edits a config) ...
        assert _hf.config_key(model) == before
    after = _hf.config_key(model)  # ... and is read by the next
    assert after != before and "0.5" in after[2]
    with pytest.raises(wb.UnsupportedModelError, match="configuration was edited"):
        wb.random_intertwiner(model, seed=2)
    model.config.layer_norm_epsilon = 1e-5  # undone: read as before, and the transform is exact again
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    out, _ = wb.random_intertwiner(model, seed=3)
    with torch.no_grad():
        x, y = model(ids).logits, out(ids).logits
    assert ((x - y).abs().max() / x.abs().max()).item() < 1e-10
