"""Adversarial tests of transforms as objects and of verify's use of them: ``random_intertwiner``, the
``Transform`` it returns (to_dict/from_dict, save/load), ``apply_transform`` and ``verify(..., transform=...)``.

Researchers cite "the function is preserved" and "this transform is that one". Every case here is a way those
could be silently wrong: a transform replayed on a model whose map differs, a record edited by hand, a verify
that speaks about a model it never ran. Each answer is checked directly, in float64, by running the models
here (never by asking the function under test): a case is exact, or a clear refusal naming what differs."""
import copy
import json

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError, WorkbenchError
from workbench.symmetry import Transform

F64 = torch.float64


def _mlp(act: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 3)).double().eval()


def _x(n: int = 16, d: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _max_change(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


class _Square(nn.Module):
    """Linear → x² → Linear: the site's group is P·D (nonzero) with φ(M) = M^{⊙2}."""

    def __init__(self, act=torch.square):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 8), nn.Linear(8, 3), act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class _LN(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.ln, self.l2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(self.ln(self.l1(x)))


# ---------------------------------------------------------------------- apply_transform on another model
def test_a_relu_transform_on_a_gelu_model_is_refused_not_a_different_function():
    relu, gelu, x = _mlp(nn.ReLU()), _mlp(nn.GELU()), _x()
    _, t = wb.random_intertwiner(relu, seed=0)
    # what a silent replay would do: the GELU model's function moves (checked here, by hand)
    forced = Transform(t.elements, t.groups, forced=list(t.elements), seed=t.seed, model=t.model)
    assert _max_change(gelu, wb.apply_transform(gelu, forced), x) > 1e-3
    with pytest.raises(InvalidOptionError, match=r"site '1'.*not in .*permutation"):
        wb.apply_transform(gelu, t)


def test_a_transform_of_the_same_architecture_with_other_weights_is_exact():
    a, b, x = _mlp(nn.ReLU(), seed=0), _mlp(nn.ReLU(), seed=5), _x()
    _, t = wb.random_intertwiner(a, seed=3)
    new_b = wb.apply_transform(b, t)
    assert _max_change(b, new_b, x) < 1e-12
    assert not torch.equal(new_b[0].weight, b[0].weight)


def test_a_transform_on_a_float64_copy_of_a_float32_model_is_exact():
    a32 = _mlp(nn.ReLU()).float()
    _, t = wb.random_intertwiner(a32, seed=3)
    a64 = copy.deepcopy(a32).double()
    assert _max_change(a64, wb.apply_transform(a64, t), _x()) < 1e-12


def test_a_layernorm_with_unit_gain_gives_rotations_that_a_model_with_gains_refuses():
    x = _x()
    torch.manual_seed(0)
    ones = _LN().double().eval()
    gains = copy.deepcopy(ones)
    with torch.no_grad():
        gains.ln.weight.uniform_(0.5, 1.5)
    _, t = wb.random_intertwiner(ones, seed=0, example=x[:1])
    with pytest.raises(InvalidOptionError):
        wb.apply_transform(gains, t, example=x[:1])
    # the other way round (a signed permutation drawn where the gains allow only that) is a symmetry of both
    _, t2 = wb.random_intertwiner(gains, seed=0, example=x[:1])
    assert _max_change(ones, wb.apply_transform(ones, t2, example=x[:1]), x) < 1e-12


def test_a_transform_whose_homomorphism_is_not_the_sites_is_refused():
    """A ReLU transform (φ = identity) replayed on a model whose activation is x² (φ(M) = M²): the scaled
    permutation is in P·D, but the readers would undo M where the activation moved by M², a new function."""
    x = _x()
    torch.manual_seed(0)
    square = _Square().double().eval()
    relu = copy.deepcopy(square)
    relu.act = torch.relu
    _, t = wb.random_intertwiner(relu, seed=0, example=x[:1])
    with pytest.raises(InvalidOptionError, match=r"φ|homomorphism"):
        wb.apply_transform(square, t, example=x[:1])
    # its own draw is exact (the check refuses only what differs)
    new, t_sq = wb.random_intertwiner(square, seed=0, example=x[:1])
    assert _max_change(square, wb.apply_transform(square, t_sq, example=x[:1]), x) < 1e-12


def test_a_forced_element_is_replayed_as_a_negative_control():
    relu, x = _mlp(nn.ReLU()), _x()
    bad, t = wb.random_intertwiner(relu, group="orthogonal", sites=["1"], allow_non_symmetry=True, seed=0)
    assert t.forced == ["1"]
    again = wb.apply_transform(relu, Transform.from_dict(json.loads(json.dumps(t.to_dict()))))
    assert _max_change(relu, again, x) > 1e-3
    for p, q in zip(bad.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert wb.verify(relu, bad, x, transform=t).verdict == "FAIL"


# ---------------------------------------------------------------------- records edited by hand
def _record(seed: int = 0):
    relu = _mlp(nn.ReLU())
    _, t = wb.random_intertwiner(relu, seed=seed)
    return relu, t.to_dict()


def _edited(edit):
    relu, d = _record()
    edit(d, d["elements"]["1"])
    return relu, d


@pytest.mark.parametrize("what, edit, words", [
    ("a repeated index", lambda d, e: e["perm"].__setitem__(0, e["perm"][1]), r"not a permutation"),
    ("an index out of range", lambda d, e: e["perm"].__setitem__(0, 99), r"not a permutation"),
    ("a fractional index", lambda d, e: e["perm"].__setitem__(0, 0.5), r"not a permutation|integer"),
    ("a NaN scale", lambda d, e: e["scale"].__setitem__(0, float("nan")), r"finite"),
    ("a zero scale", lambda d, e: e["scale"].__setitem__(0, 0.0), r"zero|invertible"),
    ("an infinite scale", lambda d, e: e["scale"].__setitem__(0, float("inf")), r"finite"),
    ("a scale of another length", lambda d, e: e["scale"].pop(), r"shape|length"),
    ("a site without a group", lambda d, e: d["groups"].pop("1"), r"groups"),
    ("a group without an element", lambda d, e: d["groups"].__setitem__("9", "permutation"), r"groups"),
    ("a forced site that is not in the record", lambda d, e: d["forced"].append("9"), r"forced"),
])
def test_a_hand_edited_record_that_is_no_transform_is_refused_at_load(what, edit, words):
    _, d = _edited(edit)
    with pytest.raises(InvalidOptionError, match=words):
        Transform.from_dict(json.loads(json.dumps(d)))


def test_a_negative_scale_at_a_relu_site_is_refused_when_applied():
    relu, d = _edited(lambda d, e: e["scale"].__setitem__(0, -e["scale"][0]))
    t = Transform.from_dict(d)  # a valid element, just not of this site's group
    with pytest.raises(InvalidOptionError, match=r"site '1'.*not in"):
        wb.apply_transform(relu, t)


def _dense_record():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)).double().eval()
    _, t = wb.random_intertwiner(lin, seed=0, group="orthogonal")
    name = next(iter(t.elements))
    return lin, t.to_dict(), name


def test_a_dense_record_that_says_orthogonal_of_a_matrix_that_is_not_is_refused():
    lin, d, name = _dense_record()
    e = d["elements"][name]
    assert e["orthogonal"]
    e["M"][0][0] *= 2.0  # still invertible, no longer orthogonal: its inverse is not its transpose
    with pytest.raises(InvalidOptionError, match=r"orthogonal"):
        Transform.from_dict(d)


def test_a_dense_record_with_a_wrong_inverse_or_a_singular_matrix_is_refused():
    lin, d, name = _dense_record()
    gl = copy.deepcopy(d)
    gl["elements"][name]["orthogonal"] = False
    gl["elements"][name]["inverse"] = torch.eye(6, dtype=F64).tolist()
    with pytest.raises(InvalidOptionError, match=r"inverse"):
        Transform.from_dict(gl)
    singular = copy.deepcopy(d)
    singular["elements"][name]["orthogonal"] = False
    singular["elements"][name]["M"][0] = [0.0] * 6
    with pytest.raises(InvalidOptionError, match=r"singular|invertible"):
        Transform.from_dict(singular)
    nan = copy.deepcopy(d)
    nan["elements"][name]["M"][1][2] = float("nan")
    with pytest.raises(InvalidOptionError, match=r"finite"):
        Transform.from_dict(nan)


def test_an_extra_site_names_the_model_and_a_missing_site_is_a_smaller_transform():
    relu, d = _record()
    x = _x()
    extra = copy.deepcopy(d)
    extra["elements"]["bogus"] = extra["elements"]["1"]
    extra["groups"]["bogus"] = "scaled_permutation"
    with pytest.raises(WorkbenchError, match="bogus"):
        wb.apply_transform(relu, Transform.from_dict(extra))
    empty = copy.deepcopy(d)
    empty["elements"].clear()
    empty["groups"].clear()
    t = Transform.from_dict(empty)
    new = wb.apply_transform(relu, t)
    assert _max_change(relu, new, x) == 0.0
    assert wb.verify(relu, new, x, transform=t).verdict == "NOT CHECKED"


# ---------------------------------------------------------------------- verify's use of a transform
def test_verify_in_float64_speaks_about_the_new_model_it_was_given():
    """verify(dtype=float64) re-applies the transform to a float64 copy: a new model that is not the transform's
    (edited after, or made by another draw) must not get that copy's PASS."""
    model, x = _mlp(nn.ReLU()).float(), _x().float()
    new, t = wb.random_intertwiner(model, seed=0)
    edited = copy.deepcopy(new)
    with torch.no_grad():
        edited[2].bias.add_(5.0)
    assert _max_change(model, edited, x) > 1.0  # the function moved (checked here)
    with pytest.raises(InvalidOptionError, match=r"not what the transform makes"):
        wb.verify(model, edited, x, transform=t, dtype=F64)
    other, _ = wb.random_intertwiner(model, seed=1)
    with pytest.raises(InvalidOptionError, match=r"not what the transform makes"):
        wb.verify(model, other, x, transform=t, dtype=F64)
    # the new model the transform made passes
    assert wb.verify(model, new, x, transform=t, dtype=F64).verdict == "PASS"


def test_verify_with_another_draws_transform_fails():
    model, x = _mlp(nn.ReLU()), _x()
    new, _ = wb.random_intertwiner(model, seed=0)
    _, t1 = wb.random_intertwiner(model, seed=1)
    r = wb.verify(model, new, x, transform=t1)
    assert r.function_preserved and r.verdict == "FAIL"  # the sites did not move as t1 says
    with pytest.raises(InvalidOptionError, match="same"):  # the model against itself: refused (a verdict about nothing)
        wb.verify(model, model, x, transform=t1)


# ---------------------------------------------------------------------- weights a module computes
class _Abs(nn.Module):
    def forward(self, w):
        return w.abs()


def _parametrized(where: str, how: str) -> nn.Module:
    model = _mlp(nn.ReLU())
    i = {"writer": 0, "reader": 2}[where]
    if how == "parametrize":
        torch.nn.utils.parametrize.register_parametrization(model[i], "weight", _Abs())
    elif how == "weight_norm":
        model[i] = torch.nn.utils.parametrizations.weight_norm(model[i])
    elif how == "pruning":  # weight = weight_orig * weight_mask, recomputed by a pre-hook
        torch.nn.utils.prune.l1_unstructured(model[i], "weight", 0.3)
    else:  # the hook-based weight_norm: the weight is a plain attribute recomputed before each forward
        with pytest.warns(FutureWarning):
            model[i] = torch.nn.utils.weight_norm(model[i])
    return model


@pytest.mark.parametrize("where", ["writer", "reader"])
@pytest.mark.parametrize("how", ["parametrize", "weight_norm", "old_weight_norm", "pruning"])
def test_a_site_whose_weight_a_parametrization_computes_is_not_moved(where, how):
    """Writing a parametrized weight writes a tensor the next forward recomputes from its parameters: the other
    side of the site moves alone, and the function changes. Such a space is frozen, saying why."""
    model, x = _parametrized(where, how), _x()
    smap = wb.symmetry_map(model, x[:1])
    assert not smap.sites
    assert "computed" in str(smap.skipped)
    new, t = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert not t.elements
    assert _max_change(model, new, x) < 1e-12


def test_an_in_place_replay_of_a_refused_element_writes_nothing():
    relu, gelu = _mlp(nn.ReLU()), _mlp(nn.GELU())
    _, t = wb.random_intertwiner(relu, seed=0)
    before = {k: v.clone() for k, v in gelu.state_dict().items()}
    with pytest.raises(InvalidOptionError, match="not in the site's group"):
        wb.apply_transform(gelu, t, inplace=True)
    for k, v in gelu.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------- save / load round trips, bit for bit
class _Cat(nn.Module):
    """Two ReLU pieces concatenated along the features: a host site embedding both."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


def _grouped_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).double().eval()


def _cases():
    torch.manual_seed(0)
    x4 = _x()
    yield "permutation (GELU)", _mlp(nn.GELU()), x4, {}
    yield "scaled permutation (ReLU)", _mlp(nn.ReLU()), x4, {}
    yield "signed permutation (tanh)", _mlp(nn.Tanh()), x4, {}
    yield "GL (no activation)", _mlp(nn.Identity()), x4, {}
    yield "orthogonal forced at a ReLU", _mlp(nn.ReLU()), x4, dict(group="orthogonal", allow_non_symmetry=True)
    yield "rotations fixing 1 (LayerNorm, gain 1)", _LN().double().eval(), x4, {}
    yield "P·D with φ = M² (x²)", _Square().double().eval(), x4, {}
    yield "embedded sites and their host (cat)", _Cat().double().eval(), x4, {}
    yield "grouped permutations (grouped conv)", _grouped_cnn(), torch.randn(2, 3, 5, 5, dtype=F64), {}


def _same_element(a, b) -> bool:
    if type(a) is not type(b) or a.phi_kind != b.phi_kind or a.n != b.n:
        return False
    for attr in ("perm", "scale", "M", "inv", "signs"):
        u, v = getattr(a, attr, None), getattr(b, attr, None)
        if (u is None) != (v is None) or (u is not None and not torch.equal(u.double(), v.double())):
            return False
    return getattr(a, "orthogonal", None) == getattr(b, "orthogonal", None) and getattr(a, "cond", None) == getattr(b, "cond", None)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_a_saved_transform_loads_bit_for_bit_and_replays_the_same_weights(case, tmp_path):
    _, model, x, kw = case
    new, t = wb.random_intertwiner(model, seed=7, example=x[:1], **kw)
    assert t.elements
    t.save(tmp_path / "t.json")
    back = Transform.load(tmp_path / "t.json")
    assert back.groups == t.groups and back.forced == t.forced and back.seed == 7 and list(back.elements) == list(t.elements)
    for name in t.elements:
        assert _same_element(t.elements[name], back.elements[name]), name
    again = wb.apply_transform(model, back, example=x[:1])
    for (name, p), q in zip(new.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    if not kw:
        assert _max_change(model, again, x) < 1e-10 * max(1.0, model(x).abs().max().item())


def test_the_recorded_seed_gives_the_same_transform_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    g = torch.Generator().manual_seed(11)
    _, t = wb.random_intertwiner(_mlp(nn.Tanh()), seed=g)
    code = ("import json, sys, torch, workbench as wb\nfrom torch import nn\n"
            "torch.manual_seed(0)\n"
            "m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()\n"
            f"_, t = wb.random_intertwiner(m, seed={t.seed})\n"
            "sys.stdout.write(json.dumps(t.to_dict()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout) == json.loads(json.dumps(t.to_dict()))


def test_a_model_on_the_meta_device_is_refused_saying_it_has_no_values():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(InvalidOptionError, match="meta device"):
        wb.random_intertwiner(model, seed=0)
    _, t = wb.random_intertwiner(_mlp(nn.ReLU()).float(), seed=0)
    with pytest.raises(InvalidOptionError, match="meta device"):
        wb.apply_transform(model, t)


class _Tied(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.e, self.h, self.o = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
        if tied:
            self.o.weight = self.e.weight

    def forward(self, t):
        return self.o(torch.relu(self.h(self.e(t))))


def test_a_transform_of_an_untied_model_names_the_site_a_tied_twin_does_not_have():
    torch.manual_seed(0)
    untied = _Tied(False).double().eval()
    tied = _Tied(True).double().eval()
    tokens = torch.randint(0, 10, (8, 5), generator=torch.Generator().manual_seed(0))
    _, t = wb.random_intertwiner(untied, seed=0, example=tokens[:1])
    assert list(t.elements) == ["h"]
    with pytest.raises(WorkbenchError, match=r"site 'h'.*another model"):
        wb.apply_transform(tied, t, example=tokens[:1])
