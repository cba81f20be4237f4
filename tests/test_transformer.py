"""The cache on TransformerLens models: a TransformerBridge on 4.x, a HookedTransformer on 3.9.

`make test` runs this file twice: once on the installed TransformerLens 4.x and once with 3.9
overlaid (WORKBENCH_EXPECT_TL=3), so both APIs are held to the same behaviour.
"""
import os
import warnings

import pytest
import torch

import workbench as wb

from conftest import has_hooked_transformer, make_transformer

pytestmark = pytest.mark.transformer


@pytest.fixture(scope="module")
def model():
    return make_transformer()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(0))


def hook_state(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_runs_against_the_expected_transformer_lens(model):
    expected = os.environ.get("WORKBENCH_EXPECT_TL")
    if expected == "3":
        assert has_hooked_transformer() and type(model).__name__ == "HookedTransformer"
    else:
        assert type(model).__name__ == "TransformerBridge"


def test_hook_names_cover_every_registered_name_and_mark_unfired(model, tokens):
    names = wb.hook_names(model)
    assert set(names) | set(names.aliases) == set(model.hook_dict)
    assert not set(names) & set(names.aliases)
    _, ref = model.run_with_cache(tokens)
    firing = set(names.firing) | {a for a, c in names.aliases.items() if c in names.firing}
    assert firing == set(ref.keys())  # exactly the names TransformerLens's own cache fills
    assert names.unfired["blocks.0.attn.hook_result"] == "fires only with model.cfg.use_attn_result=True"
    assert "blocks.0.hook_resid_pre" in names  # the classic name is the canonical one
    frame = names.to_frame()
    assert frame.loc[frame.name == "blocks.0.attn.hook_result", "fires"].item() is False


def test_values_equal_transformer_lens_run_with_cache(model, tokens):
    out, cache = wb.run_with_cache(model, tokens)
    ref_out, ref = model.run_with_cache(tokens)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert set(ref.keys()) <= set(cache) | set(wb.hook_names(model).aliases)
    for name in ref.keys():
        torch.testing.assert_close(cache[name], ref[name], rtol=0, atol=0, msg=name)


def test_aliases_resolve_to_one_activation(model, tokens):
    names = wb.hook_names(model)
    if has_hooked_transformer():
        assert names.aliases == {}  # HookedTransformer 3.x registers one name per hook point
        return
    assert names.aliases["blocks.0.hook_in"] == "blocks.0.hook_resid_pre"
    _, cache = wb.run_with_cache(model, tokens, names=["blocks.0.hook_in", "blocks.0.hook_resid_pre"])
    assert cache.names == ["blocks.0.hook_in"]  # one module, stored once, under the name asked first
    assert cache["blocks.0.hook_resid_pre"] is cache["blocks.0.hook_in"]


def test_glob_over_layers_and_per_head_shapes(model, tokens):
    _, cache = wb.run_with_cache(model, tokens, names=["blocks.*.hook_resid_post", "blocks.0.attn.hook_q"])
    assert {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"} <= set(cache)
    assert cache["blocks.1.hook_resid_post"].shape == (3, 7, 32)
    assert cache["blocks.0.attn.hook_q"].shape == (3, 7, 4, 8)  # [batch, pos, head, d_head], as TL shows it


def test_gated_names_warn_skip_or_fire_when_enabled(tokens):
    model = make_transformer(seed=1)
    gated = "blocks.0.hook_mlp_in"
    with pytest.warns(UserWarning, match=r"blocks\.0\.hook_mlp_in.*use_hook_mlp_in=True"):
        wb.run_with_cache(model, tokens, names=[gated, "blocks.0.hook_resid_post"])
    with pytest.raises(wb.HookNotFiredError, match="use_hook_mlp_in"):
        wb.run_with_cache(model, tokens, names=gated, strict=True)
    with warnings.catch_warnings():  # a pattern skips gated names quietly, and says so in the cache
        warnings.simplefilter("error", UserWarning)
        _, cache = wb.run_with_cache(model, tokens, names="blocks.0.*")
    assert "use_hook_mlp_in" in cache.skipped[gated]
    model.set_use_hook_mlp_in(True)
    _, cache = wb.run_with_cache(model, tokens, names=gated, strict=True)
    _, ref = model.run_with_cache(tokens, names_filter=gated)
    torch.testing.assert_close(cache[gated], ref[gated], rtol=0, atol=0)


def test_intervene_matches_transformer_lens_hooks(model, tokens):
    def ablate_head_0(q, hook_or_name):
        q = q.clone()
        q[:, :, 0] = 0
        return q

    before = hook_state(model)
    with wb.intervene(model, {"blocks.0.attn.hook_q": ablate_head_0}):
        ours = model(tokens)
    theirs = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_q", lambda q, hook: ablate_head_0(q, hook))])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(ours, model(tokens))
    assert hook_state(model) == before


def test_stop_at_and_hygiene_with_transformer_lens_hooks(model, tokens):
    seen = []
    model.add_hook("blocks.0.hook_resid_post", lambda act, hook: seen.append(act.shape))
    try:
        out, cache = wb.run_with_cache(model, tokens, names="blocks.0.hook_resid_post", stop_at=True)
        assert out is None and cache.names == ["blocks.0.hook_resid_post"]  # (its aliases are keys too)
        with pytest.raises(RuntimeError, match="boom"):
            with wb.capture(model, names=None):
                raise RuntimeError("boom")
        model(tokens)
        assert len(seen) == 2  # TransformerLens's own hook survived both
    finally:
        model.reset_hooks()
    assert all(len(hp._forward_hooks) == 0 for hp in model.hook_dict.values())


def test_budget_on_a_transformer(model, tokens):
    with pytest.raises(wb.CacheBudgetError, match="needs"):
        wb.run_with_cache(model, tokens, budget="4KB")


def test_transformer_lens_is_imported_lazily():
    import subprocess
    import sys

    code = "import sys, workbench; print('transformer_lens' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
