"""Adversarial checks of stitching and the insertion test: every answer recomputed directly, in float64 where
it matters, on models built to fool the cut, the group constraints, the labels and the caller's state."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError, OutOfRangeError, UnsupportedModelError
from workbench.stitching import Cut, insertion_test, stitch


# ------------------------------------------------------------------------------------------ models
class SharedAct(nn.Module):
    """One ReLU module called twice: two sites, one hook name."""

    def __init__(self, w=6):
        super().__init__()
        self.l1, self.l2, self.l3, self.act = nn.Linear(4, w), nn.Linear(w, w), nn.Linear(w, 3), nn.ReLU()

    def forward(self, x):
        return self.l3(self.act(self.l2(self.act(self.l1(x)))))


class Residual(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.l1, self.a1, self.l2, self.a2, self.l3 = nn.Linear(4, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 3)

    def forward(self, x):
        h = self.a1(self.l1(x))
        return self.l3(h + self.a2(self.l2(h)))


class FunctionalLeaky(nn.Module):
    def __init__(self, w=6):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, w), nn.Linear(w, 3)

    def forward(self, x):
        return self.l2(F.leaky_relu(self.l1(x), 0.1))


def deep_seq(w=5, depth=6):
    """Twelve-plus modules: site "1" is a prefix of site "11"."""
    layers = []
    for i in range(depth):
        layers += [nn.Linear(w if i else 4, w), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(w, 3))


def _float64(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    return model.double().eval()


def _mlp(seed, x, y, width=12, dead=()):
    """A trained 4-width-width-3 ReLU MLP; units in ``dead`` of the first layer never fire (bias −100)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            for u in dead:
                net[0].bias[u] = -100.0
                net[0].weight[u] = 0.0
    return net.eval()


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 2
    y = torch.arange(240) % 3
    x = centres[y] + 0.7 * torch.randn(240, 8, generator=g)
    return x, y


@pytest.fixture(scope="module")
def pair(blobs):
    x, y = blobs
    return _mlp(1, x, y, dead=(2, 7)), _mlp(2, x, y)


# ------------------------------------------------------------------------------------------ cutting
CASES = [(SharedAct, ["act", "act#1"]), (Residual, ["a1", "a2"]), (lambda: deep_seq(), ["1", "11"])]


@pytest.mark.parametrize("make, sites", CASES)
@pytest.mark.parametrize("where", ["after", "before"])
def test_head_then_tail_is_the_model_bit_for_bit_in_float64(make, sites, where):
    model = _float64(make())
    x = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for site in sites:
        cut = Cut(model, site, x[:1], where)
        assert torch.equal(cut.tail(*cut.head(x)), model(x)), (site, where)


def test_a_shared_module_is_cut_at_the_call_the_site_names():
    model = _float64(SharedAct())
    x = torch.randn(30, 4, dtype=torch.float64)
    for site, want in [("act", F.relu(model.l1(x))), ("act#1", F.relu(model.l2(F.relu(model.l1(x)))))]:
        cut = Cut(model, site, x[:1], "after")
        assert torch.equal(cut.head(x)[cut.primary], want)
    pre = Cut(model, "act#1", x[:1], "before")
    assert torch.equal(pre.head(x)[pre.primary], model.l2(F.relu(model.l1(x))))


def test_a_prefix_site_is_not_confused_with_the_longer_name():
    model = _float64(deep_seq())
    x = torch.randn(30, 4, dtype=torch.float64)
    h = x
    for m in list(model)[:2]:
        h = m(h)
    assert torch.equal(Cut(model, "1", x[:1]).head(x)[0], h)


def test_a_cut_inside_a_residual_branch_carries_the_skip_stream():
    model = _float64(Residual())
    x = torch.randn(30, 4, dtype=torch.float64)
    cut = Cut(model, "a2", x[:1], "before")
    h = F.relu(model.l1(x))
    values = dict(zip([c.node for c in cut.crossings], cut.head(x)))
    assert torch.equal(values["a1"], h) and torch.equal(values["l2"], model.l2(h))


def test_a_hook_the_traced_cut_would_drop_is_refused(pair, blobs):
    """A forward hook on the root (or a container) runs in model(x) but not in the traced head and tail:
    without the check, an identity stitch of the model with itself scored −90 points."""
    a, _ = pair
    x, y = blobs
    hooked = copy.deepcopy(a)
    hooked.register_forward_hook(lambda m, i, o: o * 0 + torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(UnsupportedModelError, match="hooks on \\['Sequential'\\]"):
        stitch(hooked, hooked, "1", "trivial", (x, y), epochs=0)
    with pytest.raises(UnsupportedModelError, match="remove them"):
        insertion_test(hooked, "1", "relu", (x, y), epochs=0, repeats=1, reinit=False)


def test_a_hook_on_a_module_the_cut_calls_runs_on_both_paths(pair, blobs):
    a, _ = pair
    x, y = blobs
    hooked = copy.deepcopy(a)
    hooked[3].register_forward_hook(lambda m, i, o: o * torch.linspace(0, 2, o.shape[1]))
    with torch.no_grad():
        want = 100.0 * float((hooked(x).argmax(1) == y).double().mean())
    r = stitch(hooked, hooked, "1", "trivial", (x, y), epochs=0)
    assert r.accuracy_a == pytest.approx(want) and r.stitched_accuracy == pytest.approx(want) and r.penalty == 0


def test_a_functional_activation_site_stitches_at_its_pre_activation():
    model = _float64(FunctionalLeaky())
    x = torch.randn(30, 4, dtype=torch.float64)
    cut = Cut(model, "l1", x[:1], "after")
    assert torch.equal(cut.head(x)[0], model.l1(x)) and torch.equal(cut.tail(*cut.head(x)), model(x))


class OffsetRelu(FunctionalLeaky):
    def forward(self, x):
        return self.l2(F.relu(self.l1(x) + 1.0))


def test_insertion_at_a_functional_activation_is_on_its_input_and_not_past_an_offset():
    """F.leaky_relu(l1(x)): the pre-activation is l1's output (before: refused as 'not an activation').
    F.relu(l1(x) + 1): l1's output is not the pre-activation; inserting there would be M·z + 1, not M·(z + 1)."""
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    model = FunctionalLeaky().eval()
    y = model(x).argmax(1)
    r = insertion_test(model, "l1", "orthogonal", (x, y), epochs=0, repeats=2, reinit=False)
    with torch.no_grad():
        for M, got in zip(r.elements, r.accuracies):
            out = model.l2(F.leaky_relu(model.l1(x).double() @ M.matrix().T, 0.1).float())
            assert got == pytest.approx(100.0 * float((out.argmax(1) == y).double().mean()))
    offset = OffsetRelu().eval()
    with pytest.raises(InvalidOptionError, match="no activation function takes its output directly"):
        insertion_test(offset, "l1", "orthogonal", (x, offset(x).argmax(1)), epochs=0, repeats=1, reinit=False)


# ------------------------------------------------------------------------------------------ group constraints
def _one_nonzero_per_row_and_column(W):
    nz = W != 0
    return bool((nz.sum(0) == 1).all() and (nz.sum(1) == 1).all())


def _in_group(group, W, bias):
    """Membership checked on the reported matrix itself, in float64."""
    W = W.double()
    n = W.shape[0]
    if group == "permutation":
        return bool(((W == 0) | (W == 1)).all()) and _one_nonzero_per_row_and_column(W)
    if group == "relu":
        return _one_nonzero_per_row_and_column(W) and bool((W[W != 0] > 0).all())
    if group == "signed_permutation":
        return _one_nonzero_per_row_and_column(W) and bool((W[W != 0].abs() == 1).all())
    if group == "positive_diagonal":
        return bool((W == torch.diag(torch.diagonal(W))).all() and (torch.diagonal(W) > 0).all())
    if group in ("orthogonal", "special_orthogonal"):
        ok = float((W.T @ W - torch.eye(n, dtype=W.dtype)).abs().max()) < 1e-5
        return ok and (group == "orthogonal" or abs(float(torch.linalg.det(W)) - 1) < 1e-5)
    if group == "gl":
        return float(torch.linalg.svdvals(W).min()) > 1e-6 * float(torch.linalg.svdvals(W).max())
    if group.startswith("low_rank"):
        k = int(group.split(":")[1])
        return int(torch.linalg.matrix_rank(W.float())) <= k
    raise AssertionError(group)


GROUPS = ["permutation", "relu", "signed_permutation", "positive_diagonal", "orthogonal", "special_orthogonal",
          "gl", "low_rank:3"]


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("init", [None, "match"])
def test_a_trained_stitch_is_in_its_group(pair, blobs, group, init):
    """A has two units that never fire: a fitted start must not put a 0 where the group allows none."""
    a, b = pair
    x, y = blobs
    r = stitch(a, b, "1", group, (x, y), epochs=2, init=init, seed=3)
    assert _in_group(group, r.weight, r.bias), (group, init, r.weight)
    if r.element is not None:  # the element is the same map, and in the group it names
        assert torch.allclose(r.element.matrix(), r.weight.double(), atol=1e-6)
        atol = 1e-5 if group in ("orthogonal", "special_orthogonal", "gl") else 1e-9  # float32 rounding of dense maps
        assert wb.groups.get_group(r.element.group, r.weight.shape[0]).contains(r.element, atol=atol)
    # the reported map is the one that was evaluated
    ca, cb = Cut(a, "1", x[:1]), Cut(b, "1", x[:1])
    with torch.no_grad():
        z = ca.head(x)[0] @ r.weight.T + (0 if r.bias is None else r.bias)
        acc = 100.0 * float((cb.tail(z).argmax(1) == y).double().mean())
    assert r.stitched_accuracy == pytest.approx(acc)


def test_a_signed_permutation_fitted_on_a_dead_unit_has_no_zero_row(pair, blobs):
    """The Hungarian fit gives a never-active unit the scale 0, and sign(0) = 0 left a zero row in a
    'signed permutation' (its element claimed the group with a scale of 0)."""
    a, b = pair
    x, y = blobs
    r = stitch(a, b, "1", "signed_permutation", (x, y), epochs=1, init="match")
    assert _one_nonzero_per_row_and_column(r.weight) and bool((r.weight.abs().sum(1) == 1).all())
    assert bool((r.element.scale.abs() == 1).all())


def test_a_singular_gl_fit_is_not_reported_as_a_gl_element(pair, blobs):
    """Least squares sends A's dead units to 0 columns: the map is singular, so it is no element of GL."""
    a, b = pair
    x, y = blobs
    r = stitch(a, b, "1", "gl", (x, y), epochs=0, init="match")
    sv = torch.linalg.svdvals(r.weight.double())
    assert r.element is None or float(sv.min()) > 1e-6 * float(sv.max())


@pytest.mark.parametrize("group", ["trivial", "permutation", "relu", "orthogonal", "gl"])
def test_identity_stitch_of_a_model_with_itself_costs_nothing_and_of_two_models_does(pair, blobs, group):
    a, b = pair
    x, y = blobs
    init = None if group == "trivial" else "identity"
    same = stitch(a, a, "3", group, (x, y), epochs=0, init=init)
    with torch.no_grad():
        want = 100.0 * float((a(x).argmax(1) == y).double().mean())
    assert same.accuracy_a == same.stitched_accuracy == pytest.approx(want) and same.penalty == 0
    other = stitch(a, b, "3", group, (x, y), epochs=0, init=init)  # negative control: independent models
    assert other.penalty > 5


def test_the_callers_models_are_untouched(pair, blobs):
    a, b = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    x, y = blobs
    a.train()
    a[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    modes, grads = [m.training for m in a.modules()], [p.requires_grad for p in a.parameters()]
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    stitch(a, b, "1", "relu", (x, y), epochs=1)
    insertion_test(a, "1", "orthogonal", (x, y), epochs=1, repeats=1)
    assert torch.equal(torch.rand(3), want)  # the global generator too: insertion seeded it and left it seeded
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert [m.training for m in a.modules()] == modes and [p.requires_grad for p in a.parameters()] == grads
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in a.modules())


# ------------------------------------------------------------------------------------------ insertion
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act, self.drop = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5)
        self.conv2, self.act2, self.fc = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Linear(6, 4)

    def forward(self, x):
        h = self.drop(self.act(self.bn(self.conv1(x))))
        return self.fc(self.act2(self.conv2(h)).mean((2, 3)))


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    y = net.eval()(x).argmax(1)
    y[::5] = (y[::5] + 1) % 4  # not every label is the model's own answer
    return net, x, y


@pytest.mark.parametrize("group", ["relu", "orthogonal", "permutation"])
def test_the_inserted_element_acts_on_the_pre_activation_channels(conv, group):
    """reinit=False, no retraining: the reported accuracy is the network with M z in place of z, computed here
    by hand with M's float64 matrix on the channel axis of BatchNorm's output (in eval mode)."""
    net, x, y = conv
    net = copy.deepcopy(net).train()  # the caller's mode must not leak into the evaluation
    r = insertion_test(net, "act", group, (x, y), epochs=0, repeats=2, reinit=False, seed=4)
    ref = copy.deepcopy(net).eval().double()
    with torch.no_grad():
        z = ref.bn(ref.conv1(x.double()))
        want_original = 100.0 * float((ref(x.double()).argmax(1) == y).double().mean())
        for M, got in zip(r.elements, r.accuracies):
            zm = torch.einsum("ij,njhw->nihw", M.matrix(), z)
            out = ref.fc(ref.act2(ref.conv2(F.relu(zm))).mean((2, 3)))
            assert got == pytest.approx(100.0 * float((out.argmax(1) == y).double().mean()))
    assert r.accuracy_original == pytest.approx(want_original) == r.accuracy_control
    assert net.training and all(m.training for m in net.modules())


def test_an_intertwiner_passes_the_relu_and_a_rotation_does_not(conv):
    """With no retraining, P·D₊ inserted and its inverse folded into the next layer is the network itself;
    the same with a rotation is not. The tool's reported accuracy with the bare element is checked above;
    here the premise: what retraining could at best recover."""
    net, x, y = conv
    ref = copy.deepcopy(net).eval().double()
    g = torch.Generator().manual_seed(0)
    z = ref.bn(ref.conv1(x.double()))
    for name, expect_same in [("relu", True), ("orthogonal", False)]:
        M = wb.groups.get_group(name, 6).sample(g)
        h = F.relu(torch.einsum("ij,njhw->nihw", M.matrix(), z))
        h = torch.einsum("ij,njhw->nihw", torch.linalg.inv(M.matrix()), h)  # fold M⁻¹ into what follows
        out = ref.fc(ref.act2(ref.conv2(h)).mean((2, 3)))
        assert torch.allclose(out, ref(x.double()), atol=1e-9) == expect_same


def test_insertion_with_dropout_is_reproducible_from_its_seed(conv):
    net, x, y = conv
    runs = []
    for global_seed in (0, 1):  # whatever the caller's generator holds
        torch.manual_seed(global_seed)
        r = insertion_test(net, "act", "orthogonal", (x, y), epochs=3, repeats=1, reinit=False, seed=5, lr=0.05,
                           batch_size=16)
        runs.append([c["loss"] for c in r.curves[0]])
    assert runs[0] == runs[1]


# ------------------------------------------------------------------------------------------ bad input
def test_labels_outside_the_models_classes_are_refused(pair, blobs):
    """Before: with epochs=0 a label ≥ the class count was silently counted wrong (0% endpoints); with
    training, torch's IndexError from inside the loss."""
    a, b = pair
    x, y = blobs
    for bad in (y + 3, y - 1):
        with pytest.raises(OutOfRangeError, match=r"\[0, 3\)"):
            stitch(a, b, "1", "gl", (x, bad), epochs=0)
        with pytest.raises(OutOfRangeError, match=r"\[0, 3\)"):
            insertion_test(a, "1", "relu", (x, bad), epochs=1, repeats=1)
    with pytest.raises(OutOfRangeError, match="eval_data"):
        stitch(a, b, "1", "gl", (x, y), epochs=0, eval_data=(x, y + 3))


def test_eval_and_val_data_of_another_shape_or_dtype_are_refused(pair, blobs):
    a, b = pair
    x, y = blobs
    with pytest.raises(InvalidOptionError, match="eval_data.*float32\\[5\\]"):
        stitch(a, b, "1", "gl", (x, y), epochs=1, eval_data=(x[:, :5], y))
    with pytest.raises(InvalidOptionError, match="val_data.*float64"):
        stitch(a, b, "1", "gl", (x, y), epochs=1, val_data=(x.double(), y), report="best")
    with pytest.raises(InvalidOptionError, match="eval_data"):
        insertion_test(a, "1", "relu", (x, y), epochs=1, repeats=1, eval_data=(x[:, :5], y))


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"),
                                           ({"lr": float("nan")}, "lr"), ({"site": ("1", "3", "1")}, "pair")])
def test_bad_settings_are_our_error(pair, blobs, kwargs, match):
    a, b = pair
    kw = {"site": "1", **kwargs}
    with pytest.raises(InvalidOptionError, match=match):
        stitch(a, b, group="gl", data=blobs, epochs=1, **kw)


def test_bad_insertion_settings_are_our_error(pair, blobs):
    a, _ = pair
    for kwargs in ({"repeats": True}, {"batch_size": 0}, {"lr": -1.0}):
        with pytest.raises(InvalidOptionError):
            insertion_test(a, "1", "relu", blobs, epochs=1, **{"repeats": 1, **kwargs})


@pytest.mark.parametrize("data", [lambda x, y: (x, y, y), lambda x, y: {"x": x, "y": y},
                                  lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y)),
                                  lambda x, y: (x, y.float()), lambda x, y: (x, y[:, None])])
def test_data_of_the_wrong_kind_is_our_error(pair, blobs, data):
    a, b = pair
    with pytest.raises(InvalidOptionError):
        stitch(a, b, "1", "gl", data(*blobs), epochs=1)
    with pytest.raises(InvalidOptionError):
        insertion_test(a, "1", "relu", data(*blobs), epochs=1, repeats=1)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 9), batch=st.integers(1, 300))
def test_any_data_size_and_batch_counts_every_example_once(pair, blobs, n, batch):
    """Accuracy over fewer examples than a batch, or a ragged last batch: recomputed directly."""
    a, b = pair
    x, y = blobs[0][:n], blobs[1][:n]
    r = stitch(a, a, "3", "trivial", (x, y), epochs=0, batch_size=batch)
    with torch.no_grad():
        want = 100.0 * float((a(x).argmax(1) == y).double().mean())
    assert r.stitched_accuracy == pytest.approx(want) == r.accuracy_a and r.n_eval == n


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 9), dead=st.sets(st.integers(0, 8), max_size=4), rows=st.integers(3, 60), seed=st.integers(0, 99))
def test_a_gl_fit_is_invertible_and_fits_as_least_squares(n, dead, rows, seed):
    """Units that never vary (dead, or constant) leave least squares singular; the start keeps every fitted
    value of numpy's least squares (with a bias) and is invertible."""
    from workbench.stitching import parse_stitch_group
    from workbench.stitching._init import fit

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=g, dtype=torch.float64).clamp_min(0)
    for u in dead:
        if u < n:
            X[:, u] = 0.0 if u % 2 else 1.5
    Y = X @ torch.randn(n, n, generator=g, dtype=torch.float64) + 0.1 * torch.randn(rows, n, generator=g, dtype=torch.float64)
    f = fit(parse_stitch_group("gl"), X, Y)
    design = np.c_[X.numpy(), np.ones(rows)]
    want = design @ np.linalg.lstsq(design, Y.numpy(), rcond=None)[0]
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs((X @ f.weight.T + f.bias).numpy() - want).max() < 1e-8 * scale
    if rows > n + 1:  # the data's own directions are identified: the map on them is injective (generic Y)
        sv = np.linalg.svd(f.weight.numpy(), compute_uv=False)
        assert sv.min() > 1e-8 * sv.max()


def test_a_gl_fit_over_many_rows_never_forms_a_rows_by_rows_matrix():
    """A conv site gives one row per image and position (the tour: 512 images × 16 × 16 = 131,072 rows). The
    invertible start's SVD once asked for the full [rows, rows] U: 137 GB, and the tour died. 200,000 rows of 3
    channels (one dead) would need 320 GB that way."""
    from workbench.stitching import parse_stitch_group
    from workbench.stitching._init import fit

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200_000, 3, generator=g).clamp_min(0)
    X[:, 1] = 0.0
    Y = X @ torch.randn(3, 3, generator=g) + 0.1 * torch.randn(200_000, 3, generator=g)
    f = fit(parse_stitch_group("gl"), X, Y)
    sv = torch.linalg.svdvals(f.weight.double())
    assert sv.min() > 1e-6 * sv.max()  # invertible despite the dead unit


def test_two_cuts_in_one_site_are_told_apart_in_the_report():
    """A site observed at two activations (a residual stream: a1, and a2 after the add) — cut at either by
    its hook name. Before, both results read 'inserted at a1' (penalties +12.00 and +4.00 on one model)."""
    torch.manual_seed(0)
    m = Residual().eval()
    x = torch.randn(50, 4)
    y = m(x).argmax(1)
    first = insertion_test(m, "a1", "orthogonal", (x, y), epochs=0, repeats=1, reinit=False, seed=1)
    second = insertion_test(m, "a2", "orthogonal", (x, y), epochs=0, repeats=1, reinit=False, seed=1)
    assert "(before a2)" in second.summary() and "(before" not in first.summary()
    assert list(second.to_frame()["hook"]) == ["a2"] and list(first.to_frame()["hook"]) == ["a1"]
    s = stitch(m, m, "a2", "trivial", (x, y), epochs=0)
    assert "(after a2)" in s.summary() and s.to_frame()["hook"].item() == "a2"


@pytest.mark.parametrize("n", [129, 130])
def test_a_last_batch_of_one_example_does_not_break_batchnorm_on_batch_statistics(n):
    """129 examples in batches of 128 left one example for a BatchNorm1d in train mode: torch's 'Expected more
    than 1 value per channel when training' from stitch(bn='train'/'reestimate') and insertion_test."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(n, 4)
    y = net(x).argmax(1)
    for bn in ("train", "reestimate"):
        r = stitch(net, net, "1", "gl", (x, y), epochs=1, bn=bn)
        assert r.n_train == n and len(r.curve) == 1
    r = insertion_test(net, "1", "relu", (x, y), epochs=1, repeats=1, reinit=False)
    assert r.n_train == n and r.accuracy_original == 100.0


class _Gain(nn.Module):
    """A learned per-channel gain with no reset_parameters()."""

    def __init__(self, n):
        super().__init__()
        self.g = nn.Parameter(torch.full((n,), 3.0))

    def forward(self, x):
        return x * self.g


def test_reinit_refuses_a_parameter_it_cannot_reset():
    """reinit=True reset every module with reset_parameters() and silently retrained the rest from their trained
    values (here the gain stayed at 3.0 while the Linear layers started fresh)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), _Gain(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(100, 4)
    y = net(x).argmax(1)
    with pytest.raises(InvalidOptionError, match=r"cannot re-initialise \['3.g'\].*reinit=False"):
        insertion_test(net, "1", "relu", (x, y), epochs=1, repeats=1)
    assert insertion_test(net, "1", "relu", (x, y), epochs=1, repeats=1, reinit=False).accuracy_original == 100.0


@pytest.mark.parametrize("site", ["1", "3"])
def test_a_fitted_stitch_undoes_a_known_intertwiner_exactly(pair, blobs, site):
    """B = A with its hidden units permuted and positively scaled (dead units included): the closed-form G_ReLU
    and GL fits recover it with no training; a permutation without scales cannot (negative control)."""
    a, _ = pair
    x, y = blobs
    b, _ = wb.random_intertwiner(a, seed=3, example=x[:1])
    with torch.no_grad():
        want = 100.0 * float((a(x).argmax(1) == y).double().mean())
    ha, hb = Cut(a, site, x[:1]).head(x)[0].double(), Cut(b, site, x[:1]).head(x)[0].double()

    def maps_a_onto_b(r):
        z = ha @ r.weight.double().T + (0 if r.bias is None else r.bias.double())
        return torch.allclose(z, hb, atol=1e-4 * float(hb.abs().max()))

    for group in ("relu", "gl"):
        r = stitch(a, b, site, group, (x, y), epochs=0, init="match")
        assert r.stitched_accuracy == pytest.approx(want) and r.penalty == 0, group
        assert maps_a_onto_b(r), group
    assert not maps_a_onto_b(stitch(a, b, site, "permutation", (x, y), epochs=0, init="match"))


def test_the_faithfulness_check_does_not_refuse_a_nan_example():
    """The check compares model(x1) with tail(head(x1)); NaN inputs give NaN on both, which is not a difference."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.full((3, 4), float("nan"))
    cut = Cut(net, "1", x[:1])
    assert torch.isnan(cut.tail(*cut.head(x))).all()


def test_insertion_refuses_the_ambiguous_identity_group(pair, blobs):
    """stitch(group='identity') is the identity map, but insertion_test(group='identity') drew a random GL matrix
    (the identity activation's group in the registry) — the same word, opposite experiments."""
    a, _ = pair
    with pytest.raises(InvalidOptionError, match="'gl'.*'trivial'"):
        insertion_test(a, "1", "identity", blobs, epochs=1, repeats=1)
    assert insertion_test(a, "1", "trivial", blobs, epochs=0, repeats=1, reinit=False).penalty == 0


def test_an_integer_site_is_refused_not_read_as_a_position(pair, blobs):
    """Sequential's module "1" is the first ReLU, but the symmetry map indexes by position: site=1 silently cut
    at its second site, "3" (both stitch and insertion reported site '3')."""
    a, b = pair
    with pytest.raises(InvalidOptionError, match="the module named '1'"):
        stitch(a, b, 1, "gl", blobs, epochs=0)
    with pytest.raises(InvalidOptionError, match="site must be a site name"):
        insertion_test(a, 1, "relu", blobs, epochs=0, repeats=1, reinit=False)
    with pytest.raises(InvalidOptionError, match="site must be a site name"):
        stitch(a, b, (1, "3"), "gl", blobs, epochs=0)


def test_training_bars_follow_the_progress_convention(capsys):
    # Epoch bars used to be shown whenever epochs >= 2, in scripts and under `workbench reproduce --quiet` too.
    # Now: None (the default) shows one in a Jupyter notebook only, True always, False never; a bad value is refused.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 4)
    y = net(x).argmax(1).detach()
    for verb, desc in ((lambda **kw: wb.stitching.stitch(net, net, "1", "relu", (x, y), epochs=2, **kw), "stitch "),
                       (lambda **kw: wb.stitching.insertion_test(net, "1", "relu", (x, y), epochs=2, repeats=1, **kw),
                        "retrain after 1")):
        verb()
        assert desc not in capsys.readouterr().err
        verb(progress=True)
        assert desc in capsys.readouterr().err
        with pytest.raises(InvalidOptionError, match="progress="):
            verb(progress="yes")
