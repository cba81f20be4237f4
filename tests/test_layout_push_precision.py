"""The layout backend's push: float32 products only where ``_port_moves.dense_ok`` allows them, exact inverses
of rotary elements, and permutations on several axes in one gather pass — each checked against a float64
computation of our own, and a non-symmetry still fails at float32.
"""
import warnings

import pytest
import torch

import workbench as wb
import workbench.symmetry._layout_push as lp
import workbench.symmetry._port_moves as pm
from conftest import make_transformer
from workbench.groups import Dense, ScaledPermutation, get_group
from workbench.symmetry._layout_push import HeadPermutation, clone

pytestmark = [pytest.mark.transformer, pytest.mark.filterwarnings("ignore")]


def _model(**cfg):
    """A small float64 TransformerLens model with random norm gains (a fresh model's 1s are degenerate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_transformer(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in f".{name}" and name.rpartition(".")[2] in ("weight", "w"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return clone(model, torch.float64)


def _product_dtypes(monkeypatch) -> list:
    """The dtype of every dense (per-head or whole-axis GL) product the push runs, recorded."""
    seen, along = [], lp._along

    def spy(x, F, axis, out, casts):
        if isinstance(F, dict) or (isinstance(F, Dense) and not F.orthogonal):
            seen.append(x.dtype)
        return along(x, F, axis, out, casts)

    monkeypatch.setattr(lp, "_along", spy)
    return seen


def _tokens():
    return torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cond_max, expected", [(1e3, torch.float32), (0.5, torch.float64)])
def test_gl_products_run_in_float32_only_when_the_condition_number_allows(monkeypatch, cond_max, expected):
    """An attention-only model (its stream takes GL) in float32: every GL product runs in float32 under the
    policy's bound, and in float64 when no element's condition number is under it; both preserve the function
    to float32 accuracy, checked directly against the float64 original's outputs."""
    m64 = _model(attn_only=True, normalization_type=None)
    m32 = clone(m64, torch.float32)
    monkeypatch.setattr(pm, "COND_MAX", cond_max)
    seen = _product_dtypes(monkeypatch)
    new, t = wb.random_intertwiner(m32, seed=2)
    assert seen and set(seen) == {expected}
    assert all(e.cond is not None and e.cond > 1 for e in t.elements.values() if isinstance(e, Dense))
    with torch.no_grad():
        ref = m64(_tokens()).double()
        got = clone(new, torch.float64)(_tokens()).double()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert wb.verify(m32, new, _tokens(), transform=t).passed


def test_float64_models_keep_float64_products(monkeypatch):
    m64 = _model(attn_only=True, normalization_type=None)
    seen = _product_dtypes(monkeypatch)
    new, t = wb.random_intertwiner(m64, seed=2)
    assert seen and set(seen) == {torch.float64}
    report = wb.verify(m64, new, _tokens(), transform=t)
    assert report.passed and report.max_abs_diff <= 1e-9


def test_an_element_without_a_condition_number_is_pushed_in_float64(monkeypatch):
    """A GL element that does not know its condition number (one made by hand, or a transform from before
    ``cond`` existed) is not trusted to float32."""
    m32 = clone(_model(attn_only=True, normalization_type=None), torch.float32)
    _, t = wb.random_intertwiner(m32, seed=2)
    for name, e in t.elements.items():
        if isinstance(e, Dense):
            t.elements[name] = Dense(e.M, e.phi_kind, e.group)  # no inverse, no cond
    seen = _product_dtypes(monkeypatch)
    new = wb.apply_transform(m32, t)
    assert seen and set(seen) == {torch.float64}
    assert wb.verify(m32, new, _tokens(), transform=t).passed


def test_a_non_symmetry_still_fails_with_float32_products(monkeypatch):
    """Negative control: GL forced on the MLP's GELU neurons changes the function; the float32 path must not
    hide it (nor must verify)."""
    m32 = clone(_model(act_fn="gelu", normalization_type="LN"), torch.float32)
    seen = _product_dtypes(monkeypatch)
    site = next(s.name for s in wb.symmetry_map(m32) if s.name.endswith("mlp"))
    new, t = wb.random_intertwiner(m32, seed=0, sites=[site], group="gl", allow_non_symmetry=True)
    assert torch.float32 in seen
    with torch.no_grad():
        a, b = m32(_tokens()).double(), new(_tokens()).double()
    assert float((a - b).abs().max() / a.abs().max()) > 1e-2
    assert not wb.verify(m32, new, _tokens(), transform=t).passed


def _assert_exact_inverses(sites, elements, names, rel):
    """Each of ``names`` as drawn carries the matrix's inverse (from its blocks, ``groups._families.rotary_inverse``),
    and ``_with_inverses`` gives the same matrix without one (a user's element, a loaded transform) an inverse too:
    both checked against ``linalg.inv``, and their condition numbers against the singular values to ``rel``; the
    matrix unchanged."""
    bare = {n: Dense(e.M, e.phi_kind, e.group) if n in names else e for n, e in elements.items()}
    known = lp._with_inverses(sites, bare)
    for n in names:
        e = elements[n]
        for k in (e, known[n]):
            assert k.inv is not None and torch.equal(k.M, e.M)
            assert torch.allclose(k.inv, torch.linalg.inv(e.M), rtol=0, atol=1e-12 * float(k.inv.abs().max()))
            s = torch.linalg.svdvals(e.M)
            assert k.cond == pytest.approx(float(s.max() / s.min()), rel=rel)


def test_rotary_elements_get_their_exact_inverse_and_condition_number():
    model = _model(act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary")
    smap = wb.symmetry_map(model)
    _, t = wb.random_intertwiner(model, seed=5)
    sites = {s.name: s for s in smap}
    rotary = [n for n in t.elements if sites[n].group.name == "rotary"]
    assert rotary
    _assert_exact_inverses(sites, t.elements, rotary, rel=1e-12)
    # anything not of that structure is left alone: a GL draw at a rotary site (forced), a nudged element
    G = get_group("gl", t.elements[rotary[0]].n)
    forced = dict(t.elements, **{rotary[0]: G.sample(torch.Generator().manual_seed(0))})
    nudged = t.elements[rotary[1]].M.clone()
    nudged[0, 5] += 1e-9
    forced[rotary[1]] = Dense(nudged, "identity", "rotary")
    out = lp._with_inverses(sites, forced)
    assert out[rotary[0]] is forced[rotary[0]] and out[rotary[1]] is forced[rotary[1]]


def test_partial_rotary_elements_get_their_inverse_and_condition_number():
    """A partial rotary dimension leaves a GL block B on the free dimensions: the inverse is the pairs' exact
    one and B's LU inverse, the condition number max / min over the pairs' s and B's singular values — both
    checked against the whole matrix's inverse and singular values. An entry coupling a pair to a free
    dimension (outside the group) leaves the element alone."""
    model = _model(act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4)
    _, t = wb.random_intertwiner(model, seed=5)
    sites = {s.name: s for s in wb.symmetry_map(model)}
    rotary = [n for n in t.elements if sites[n].group.name == "rotary"]
    assert rotary and all(sites[n].group.free for n in rotary)
    _assert_exact_inverses(sites, t.elements, rotary, rel=1e-10)
    G = sites[rotary[0]].group
    coupled = t.elements[rotary[0]].M.clone()
    coupled[G.pairs[0][0], G.free[0]] = 1e-9
    out = lp._with_inverses(sites, dict(t.elements, **{rotary[0]: Dense(coupled, "identity", "rotary")}))
    assert out[rotary[0]].inv is None and out[rotary[0]].cond is None


@pytest.mark.parametrize("seed", range(6))
def test_permutations_on_several_axes_are_one_gather_equal_to_one_at_a_time(seed):
    """``_gathered`` against each move applied alone in float64 (torch's index_select and product), on
    tensors lying in a random memory order, with signed/scaled permutations and head permutations."""
    g = torch.Generator().manual_seed(seed)
    shape = [int(torch.randint(2, 7, (1,), generator=g)) * 2 for _ in range(3)]
    order = torch.randperm(3, generator=g).tolist()
    x = torch.randn([shape[d] for d in order], dtype=torch.float64, generator=g).permute(
        [order.index(d) for d in range(3)])
    assert list(x.shape) == shape
    run = []
    for axis in torch.randperm(3, generator=g)[:int(torch.randint(1, 4, (1,), generator=g))].tolist():
        n = shape[axis]
        if axis == 0 and seed % 2:  # head groups of 2 units
            run.append((axis, HeadPermutation(ScaledPermutation(torch.randperm(n // 2, generator=g)), block=2)))
        else:
            scale = None if seed % 3 == 0 else torch.randn(n, dtype=torch.float64, generator=g)
            run.append((axis, ScaledPermutation(torch.randperm(n, generator=g), scale)))
    expected = x
    for axis, F in run:
        expected = F.act(expected, axis)
    out = torch.empty_like(x)
    got = lp._gathered(x, run, out)
    assert got is out and torch.allclose(got, expected, rtol=1e-15, atol=0)
    assert torch.equal(lp._gathered(x, run, None), got)
