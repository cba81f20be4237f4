"""Stitching and the insertion test: exact cuts, recovery of a known intertwiner, controls, errors."""
import copy

import pytest
import torch
from torch import nn

import workbench as wb
from models import TinyResNet, randomise
from workbench.stitching import Cut

SITES = ["1", "3"]  # the two ReLU layers of the MLP below


def _digits():
    d = wb.data.digits(size=8)
    tr, te = d.split(0.7, seed=0)
    return (tr.inputs.flatten(1), tr.labels), (te.inputs.flatten(1), te.labels)


def _train_mlp(seed, data, width=16, steps=100):
    """A 64-16-16-10 ReLU MLP on 8×8 digits. Biases start at 0.5 so that every unit stays alive:
    a dead unit is never active, so which permutation moves it is unidentifiable from data."""
    x, y = data
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    with torch.no_grad():
        net[0].bias.fill_(0.5)
        net[2].bias.fill_(0.5)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def mlp_a(digits):
    return _train_mlp(1, digits[0])


@pytest.fixture(scope="module")
def mlp_b(digits):
    return _train_mlp(0, digits[0])


@pytest.fixture(scope="module")
def copy_pd(mlp_a, digits):
    """A's P·D₊-transformed copy (the same function, hidden units permuted and scaled)."""
    return wb.random_intertwiner(mlp_a, seed=3, example=digits[0][0][:1])


# ---------------------------------------------------------------------- the "done when"
@pytest.mark.slow
@pytest.mark.parametrize("site", SITES)
def test_relu_stitch_recovers_an_applied_intertwiner(mlp_a, copy_pd, digits, site):
    (x, y), test = digits
    b, transform = copy_pd
    with torch.no_grad():
        alive = (mlp_a[: int(site) + 1](x) > 0).any(0)
    assert bool(alive.all()), "precondition: every unit is active on some example"
    # Stated initialisation: the Hungarian matching of A's and B's units (init="match"), then 2 epochs.
    r = wb.stitching.stitch(mlp_a, b, site, "relu", (x, y), epochs=2, seed=0, eval_data=test, init="match")
    assert r.accuracy_a == pytest.approx(r.accuracy_b)  # the copy computes the same function
    assert abs(r.penalty) <= 0.5
    applied = transform.elements[site]
    assert torch.equal(r.element.perm, applied.perm)
    assert isinstance(r.element, wb.groups.ScaledPermutation) and bool((r.element.scale > 0).all())


def test_identity_stitch_on_transformed_copy_fails(mlp_a, copy_pd, digits):
    """Negative control: without the map, B reads A's units in the wrong order and scale."""
    (x, y), test = digits
    r = wb.stitching.stitch(mlp_a, copy_pd[0], "1", "identity", (x, y), epochs=0, eval_data=test)
    assert r.penalty > 30
    same = wb.stitching.stitch(mlp_a, mlp_a, "1", "trivial", (x, y), epochs=0, eval_data=test)
    assert same.penalty == 0 and same.stitched_accuracy == same.accuracy_a


@pytest.mark.slow
def test_rank_one_is_far_worse_than_full_linear(mlp_a, mlp_b, digits):
    (x, y), test = digits
    full = wb.stitching.stitch(mlp_a, mlp_b, "3", "gl", (x, y), epochs=3, eval_data=test, init="match")
    rank1 = wb.stitching.stitch(mlp_a, mlp_b, "3", "low_rank:1", (x, y), epochs=3, eval_data=test, init="match")
    assert full.penalty < 3 and rank1.penalty > full.penalty + 20
    assert torch.linalg.matrix_rank(rank1.weight) == 1 and rank1.element is None


# ---------------------------------------------------------------------- families keep their structure
@pytest.mark.parametrize("family", ["orthogonal", "relu", "permutation", "low_rank:2", "gl", "positive_diagonal",
                                    "signed_permutation"])
def test_learned_maps_stay_in_their_family(mlp_a, mlp_b, digits, family):
    (x, y), _ = digits
    r = wb.stitching.stitch(mlp_a, mlp_b, "1", family, (x[:256], y[:256]), epochs=1, seed=0)
    W = r.weight.double()
    if family == "orthogonal":
        assert torch.allclose(W @ W.T, torch.eye(16, dtype=W.dtype), atol=1e-5)
    elif family in ("relu", "permutation", "signed_permutation", "positive_diagonal"):
        e = r.element
        assert sorted(e.perm.tolist()) == list(range(16)) and torch.allclose(e.matrix().float(), r.weight)
        if family == "permutation":
            assert e.scale is None
        if family == "signed_permutation":
            assert set(e.scale.abs().tolist()) == {1.0}
        if family == "positive_diagonal":
            assert e.perm.tolist() == list(range(16)) and bool((e.scale > 0).all())
    elif family == "low_rank:2":
        assert torch.linalg.matrix_rank(r.weight) <= 2  # float32 tolerance
    assert r.bias is None or family in ("gl", "low_rank:2")
    assert len(r.curve) == 1 and r.to_frame().shape[0] == 1


def test_same_seed_same_stitch_different_seed_different(mlp_a, mlp_b, digits):
    (x, y), _ = digits
    run = lambda s: wb.stitching.stitch(mlp_a, mlp_b, "3", "low_rank:2", (x[:200], y[:200]), epochs=1, seed=s)  # noqa: E731
    r0, r0b, r1 = run(0), run(0), run(1)
    assert torch.equal(r0.weight, r0b.weight) and r0.seed == 0
    assert not torch.allclose(r0.weight, r1.weight)


def test_models_are_not_modified(mlp_a, mlp_b, digits):
    (x, y), _ = digits
    net_a = randomise(nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                                    nn.ReLU(), nn.Linear(8, 10)), seed=1).train()
    net_b = randomise(copy.deepcopy(net_a), seed=2).train()
    before = [copy.deepcopy(m.state_dict()) for m in (net_a, net_b)]
    wb.stitching.stitch(net_a, net_b, "2", "gl", (x[:128], y[:128]), epochs=1, bn="reestimate")
    wb.stitching.insertion_test(net_a, "2", "orthogonal", (x[:128], y[:128]), epochs=1, repeats=1)
    for m, sd in zip((net_a, net_b), before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
        assert m.training and all(p.requires_grad for p in m.parameters())


def test_batchnorm_reestimate_is_explicit_and_changes_only_the_stitch(digits):
    (x, y), _ = digits
    net = randomise(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, 10)), seed=1)
    y_self = net(x[:200]).argmax(1)
    frozen = wb.stitching.stitch(net, net, "1", "identity", (x[:200], y_self), epochs=0)
    moved = wb.stitching.stitch(net, net, "1", "identity", (x[:200], y_self), epochs=0, bn="reestimate")
    assert frozen.stitched_accuracy == 100.0 and frozen.bn == "frozen"
    assert moved.bn == "reestimate" and moved.stitched_accuracy < 100.0  # randomised statistics ≠ the data's
    assert moved.accuracy_b == 100.0  # endpoints are measured with B's own statistics


# ---------------------------------------------------------------------- cutting residual networks
@pytest.mark.parametrize("block, site", [("optionA", "layer1.1.act1"), ("optionA", "layer2.0.act1"),
                                         ("basic", "layer1.1.relu"), ("basic", "layer2.0.relu")])
def test_a_cut_inside_a_residual_branch_takes_the_skip_stream_from_a(block, site):
    a = randomise(TinyResNet(block), seed=0)
    b = copy.deepcopy(a)
    with torch.no_grad():  # B differs from A only before the cut (its stem)
        b.conv1.weight.copy_(torch.randn(b.conv1.weight.shape, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cut_a, cut_b = Cut(a, site, x[:1]), Cut(b, site, x[:1])
    assert len({c.site for c in cut_b.crossings}) == 2  # the branch and the skip stream cross
    with torch.no_grad():
        stitched = cut_b.tail(*cut_a.head(x))
        assert torch.equal(stitched, cut_b.tail(*cut_a.head(x)))  # in-place ops in the tail spare the inputs
        assert torch.allclose(stitched, a(x), atol=1e-6)
        if block == "optionA":  # (torchvision's block calls one ReLU module twice: no single hook name)
            # A single hook replacing only the site's tensor keeps B's own skip stream: wrong.
            branch = wb.run_with_cache(a, x, names=[cut_a.site.hook_name])[1][cut_a.site.hook_name]
            with wb.intervene(b, {cut_b.site.hook_name: lambda v, *_: branch.clone()}):
                hooked = b(x)
            assert not torch.allclose(hooked, a(x), atol=1e-3)
    y = a(x).argmax(1).detach()
    r = wb.stitching.stitch(a, b, site, "identity", (x, y), epochs=0)
    assert r.stitched_accuracy == 100.0 and r.accuracy_a == 100.0
    assert len(r.maps) == 2


def test_resnet_stitch_to_itself_with_identity_is_exact():
    net = randomise(TinyResNet("optionA"), seed=0)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(3))
    for site in wb.symmetry_map(net, x[:1]).names:
        r = wb.stitching.stitch(net, net, site, "identity", (x, y), epochs=0)
        assert r.stitched_accuracy == r.accuracy_a and r.penalty == 0


# ---------------------------------------------------------------------- the insertion test
def test_insertion_is_on_the_pre_activation(mlp_a, digits):
    """G_ReLU inserted before the ReLU is undone exactly by φ(M)⁻¹ on the next layer; a rotation is not."""
    (x, _), _ = digits
    cut = Cut(mlp_a, "3", x[:1], where="before")
    k = cut.primary
    assert cut.crossings[k].node == "_2"  # the second Linear's output: the pre-activation
    for group, exact in [("relu", True), ("orthogonal", False)]:
        M = wb.get_group(group, 16).sample(seed=0)
        tail = copy.deepcopy(cut.tail)
        with torch.no_grad():
            reader = dict(tail.named_modules())["4"]
            reader.weight.copy_((reader.weight.double() @ M.inverse().matrix()).float())  # W ↦ W φ(M)⁻¹
            vals = list(cut.head(x))
            vals[k] = M.act(vals[k], dim=1)
            out = tail(*vals)
        assert torch.allclose(out, mlp_a(x), atol=1e-4) == exact


def test_insertion_control_without_retraining_is_the_original(mlp_a, digits):
    (x, y), test = digits
    r = wb.stitching.insertion_test(mlp_a, "1", "orthogonal", (x, y), epochs=0, repeats=2, seed=0, eval_data=test,
                                    reinit=False)
    assert r.accuracy_control == r.accuracy_original
    assert min(r.penalties) > 5  # an unabsorbed rotation breaks the network
    assert len(r.to_frame()) == 2 and "penalty" in r._repr_html_()


@pytest.mark.slow
def test_rotations_cost_more_than_intertwiners_after_retraining(mlp_a, digits):
    (x, y), test = digits
    kw = dict(data=(x, y), epochs=6, repeats=2, seed=0, eval_data=test, lr=1e-2)  # tail re-initialised (default)
    relu = wb.stitching.insertion_test(mlp_a, "1", "relu", **kw)
    rot = wb.stitching.insertion_test(mlp_a, "1", "orthogonal", **kw)
    assert rot.penalty > relu.penalty + 3
    again = wb.stitching.insertion_test(mlp_a, "1", "relu", **kw)
    assert again.accuracies == relu.accuracies


# ---------------------------------------------------------------------- reports and errors
def test_one_name_per_group_and_the_old_identity_spelling():
    from workbench.stitching import Family, StitchSpec, parse_family, parse_stitch_group

    # The identity map is the trivial group; a stitch's old "identity" still means it (not the registry's GL).
    assert parse_stitch_group("identity") == parse_stitch_group("trivial") == StitchSpec("trivial", "identity")
    assert wb.groups.get_group("identity", 3).name == "gl"
    assert parse_stitch_group(wb.groups.Trivial(4)).name == "trivial"
    assert parse_stitch_group(" Low_Rank:3 ") == StitchSpec("low_rank:3", "linear", rank=3)
    assert Family is StitchSpec and parse_family is parse_stitch_group
    with pytest.raises(ValueError, match="low_rank:k"):
        parse_stitch_group("rotatoin")


def test_report_objects(mlp_a, mlp_b, digits):
    (x, y), _ = digits
    r = wb.stitching.stitch(mlp_a, mlp_b, "1", "relu", (x[:128], y[:128]), epochs=2)
    assert "penalty" in r.summary() and r.group == "scaled_permutation" and r.family == r.group  # old spelling kept
    assert r.to_frame().group.tolist() == ["scaled_permutation"]
    assert list(r.curve_frame().epoch) == [1, 2] and r.relaxed_accuracy is not None
    assert r.penalty == pytest.approx((r.accuracy_a + r.accuracy_b) / 2 - r.stitched_accuracy)
    assert "f32[16,16]" in r._repr_html_()
    ax = r.plot()
    assert ax.get_ylabel() == "accuracy (%)"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_clear_errors(mlp_a, mlp_b, digits):
    (x, y), _ = digits
    d = (x[:32], y[:32])
    stitch = wb.stitching.stitch
    with pytest.raises(wb.InvalidOptionError, match="'rotatoin' is not a valid option.*Stitching also accepts"):
        stitch(mlp_a, mlp_b, "1", "rotatoin", d)
    with pytest.raises(wb.InvalidOptionError, match="low_rank:k"):
        stitch(mlp_a, mlp_b, "1", "low_rank", d)
    with pytest.raises(ValueError, match="rank 17 exceeds the smaller width, 16"):
        stitch(mlp_a, mlp_b, "1", "low_rank:17", d)
    with pytest.raises(KeyError, match=r"no site named '2' in this symmetry map \(2 sites\)"):
        stitch(mlp_a, mlp_b, "2", "gl", d)
    with pytest.raises(ValueError, match="bn='eval' is not a valid option"):
        stitch(mlp_a, mlp_b, "1", "gl", d, bn="eval")
    with pytest.raises(ValueError, match=r"labels must be class indices of shape \[N\]"):
        stitch(mlp_a, mlp_b, "1", "gl", (x[:32], y[:32].float()))
    with pytest.raises(ValueError, match="epochs must be a whole number"):
        stitch(mlp_a, mlp_b, "1", "gl", d, epochs=-1)
    wide = _train_mlp(0, (x[:32], y[:32]), width=12, steps=1)
    with pytest.raises(ValueError, match="use group='gl' or 'low_rank:k' between different widths"):
        stitch(mlp_a, wide, "1", "relu", d)
    assert stitch(mlp_a, wide, "1", "gl", d, epochs=0).weight.shape == (12, 16)
    with pytest.raises(ValueError, match="repeats must be"):
        wb.stitching.insertion_test(mlp_a, "1", "relu", d, repeats=0)
    with pytest.raises(ValueError, match="reinit=True with epochs=0"):
        wb.stitching.insertion_test(mlp_a, "1", "relu", d, epochs=0)
    linear = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 10))
    with pytest.raises(ValueError, match="not an activation: there is no pre-activation"):
        wb.stitching.insertion_test(linear, "0", "relu", d)


# ---------------------------------------------------------------------- the paper's protocol (issue 18)
def test_birkhoff_projection_lands_on_the_polytope():
    from workbench.stitching._layers import birkhoff_projection

    A = torch.randn(12, 12, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    P = birkhoff_projection(A, iters=200).double()
    assert bool((P >= 0).all())
    assert torch.allclose(P.sum(0), torch.ones(12, dtype=P.dtype), atol=1e-6)
    assert torch.allclose(P.sum(1), torch.ones(12, dtype=P.dtype), atol=1e-6)
    vertex = torch.eye(12)[torch.randperm(12, generator=torch.Generator().manual_seed(1))]
    assert torch.allclose(birkhoff_projection(vertex), vertex, atol=1e-9)  # a permutation is a fixed point


def test_uniform_start_trains_p_by_projected_gradient(mlp_a, mlp_b, digits):
    """init="uniform": P itself is the parameter, starts near the barycentre, and stays doubly stochastic
    after every projected step; the scales stay positive; the evaluated map is an exact P·D₊."""
    (x, y), test = digits
    from workbench.stitching._layers import BirkhoffMap, make_layer, parse_family

    layer = make_layer(parse_family("relu"), 16, 16, bias=False, init="uniform", gen=torch.Generator().manual_seed(0))
    assert isinstance(layer, BirkhoffMap)
    P0 = layer.soft().detach().double()
    assert P0.max() < 0.25  # near the barycentre (entries 1/16 on average): no vertex (an entry of 1) preferred
    r = wb.stitching.stitch(mlp_a, mlp_b, "1", "relu", (x[:400], y[:400]), epochs=4, seed=0, eval_data=test,
                            init="uniform", optimizer="sgd", lr=0.05)
    e = r.element
    assert sorted(e.perm.tolist()) == list(range(16)) and bool((e.scale > 0).all())
    assert torch.allclose(e.matrix().float(), r.weight) and r.relaxed_accuracy is not None
    # The projection after each step keeps the relaxed P on the polytope: check it on a trained layer directly.
    layer.P.data.add_(0.3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(2)))
    layer.project()
    P = layer.soft().detach().double()
    assert bool((P >= 0).all()) and torch.allclose(P.sum(0), torch.ones(16, dtype=P.dtype), atol=1e-5)
    assert torch.allclose(P.sum(1), torch.ones(16, dtype=P.dtype), atol=1e-5)
    with pytest.raises(ValueError, match="init='uniform'.*permutation groups"):
        wb.stitching.stitch(mlp_a, mlp_b, "1", "gl", (x[:32], y[:32]), init="uniform")


def test_report_best_picks_the_epoch_on_validation_data(mlp_a, mlp_b, digits):
    (x, y), test = digits
    val = (x[400:600], y[400:600])
    r = wb.stitching.stitch(mlp_a, mlp_b, "3", "gl", (x[:400], y[:400]), epochs=4, seed=0, eval_data=test,
                            val_data=val, report="best", init="random", lr=1e-2)
    vals = [c["val_accuracy"] for c in r.curve]
    assert r.best_epoch == 1 + vals.index(max(vals)) and r.val_accuracy == max(vals)
    assert "best epoch" in r.summary() and "val_accuracy" in r.curve_frame().columns
    with pytest.raises(ValueError, match="report='best' picks the epoch.*pass val_data"):
        wb.stitching.stitch(mlp_a, mlp_b, "3", "gl", (x[:32], y[:32]), report="best")


def test_bn_train_runs_batch_statistics_while_training_and_reestimates_for_evaluation(digits):
    (x, y), _ = digits
    net = randomise(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, 10)), seed=1)
    y_self = net(x[:200]).argmax(1)
    calls = []  # (training, momentum, grad enabled) at every call of the BatchNorm after the cut
    hook = net[3].register_forward_pre_hook(lambda m, _: calls.append((m.training, m.momentum, torch.is_grad_enabled())))
    try:  # deep copies keep the hook, so it sees the stitch's own copy of the BatchNorm
        r = wb.stitching.stitch(net, net, "1", "gl", (x[:200], y_self), epochs=2, bn="train", lr=1e-2)
        training = [c for c in calls if c[2]]
        assert training and all(t and mom == 0.1 for t, mom, _ in training)  # batch statistics while the stitch trains
        assert any(t and mom is None for t, mom, g in calls if not g)  # re-estimated (cumulative) before evaluation
        assert not calls[-1][0]  # evaluated on the re-estimated running statistics
        calls.clear()
        wb.stitching.stitch(net, net, "1", "gl", (x[:200], y_self), epochs=2, bn="reestimate", lr=1e-2)
        assert not any(t and mom is not None for t, mom, _ in calls)  # "reestimate" never trains on batch statistics
    finally:
        hook.remove()
    assert r.bn == "train" and len(r.curve) == 2
    frozen = wb.stitching.stitch(net, net, "1", "identity", (x[:200], y_self), epochs=0)
    moved = wb.stitching.stitch(net, net, "1", "identity", (x[:200], y_self), epochs=0, bn="train")
    assert frozen.stitched_accuracy == 100.0 and moved.stitched_accuracy < 100.0  # randomised statistics ≠ the data's


def test_lasso_penalty_shrinks_the_linear_map(mlp_a, mlp_b, digits):
    (x, y), _ = digits
    kw = dict(data=(x, y), epochs=10, seed=0, init="match", lr=1e-2)
    plain = wb.stitching.stitch(mlp_a, mlp_b, "1", "gl", **kw)
    lasso = wb.stitching.stitch(mlp_a, mlp_b, "1", "gl", l1=0.05, **kw)
    assert lasso.weight.abs().sum() < 0.5 * plain.weight.abs().sum()
    assert (lasso.weight.abs() < 1e-2).float().mean() > (plain.weight.abs() < 1e-2).float().mean()
    with pytest.raises(ValueError, match="LASSO penalty is for linear stitches"):
        wb.stitching.stitch(mlp_a, mlp_b, "1", "orthogonal", (x[:32], y[:32]), l1=0.1)


def test_skip_unmapped_passes_the_skip_stream_from_a_as_it_is():
    """The paper's ResNet protocol: a branch cut maps only the branch; checked against the cut run by hand."""
    a = randomise(TinyResNet("optionA"), seed=0)
    b = randomise(TinyResNet("optionA"), seed=4)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    site, dummy = "layer1.1.act1", torch.zeros(64, dtype=torch.long)
    r0 = wb.stitching.stitch(a, b, site, "orthogonal", (x, dummy), epochs=0, init="random", skip="unmapped")
    assert list(r0.maps) == [site] and r0.skip == "unmapped"
    Q = r0.maps[site]

    def by_hand():
        cut_a, cut_b = Cut(a, site, x[:1]), Cut(b, site, x[:1])
        with torch.no_grad():
            vals = list(cut_a.head(x))
            k = cut_b.primary
            vals[k] = torch.einsum("dc,nc...->nd...", Q, vals[k])  # the branch through the stitch, the skip stream A's
            return cut_b.tail(*vals)

    with torch.no_grad():  # centre B's logits over x so that every class is predicted somewhere
        b.fc.bias.sub_(by_hand().mean(0))
    y = by_hand().argmax(1)
    assert len(set(y.tolist())) == 3  # precondition: labels that tell networks apart
    r = wb.stitching.stitch(a, b, site, "orthogonal", (x, y), epochs=0, init="random", skip="unmapped")
    assert r.stitched_accuracy == 100.0 and torch.equal(r.maps[site], Q)
    mapped = wb.stitching.stitch(a, b, site, "orthogonal", (x, y), epochs=0, init="random", skip="mapped")
    assert len(mapped.maps) == 2 and mapped.stitched_accuracy < 90.0  # ours maps the skip stream too: another network
    with pytest.raises(ValueError, match="skip='both' is not a valid option"):
        wb.stitching.stitch(a, b, site, "gl", (x, y), skip="both")


def test_a_cut_can_follow_any_activation_module_of_a_site():
    """A ResNet stage is one site observed after every block; cut after the second block's activation."""
    net = randomise(TinyResNet("optionA"), seed=0)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    cut = Cut(net, "layer1.1.act2", x[:1])
    assert cut.site.name == "relu" and cut.at == "layer1.1.act2"
    assert [c.node for c in cut.crossings] == ["layer1_1_act2"]
    with torch.no_grad():
        assert torch.allclose(cut.tail(*cut.head(x)), net(x), atol=1e-6)
        first = Cut(net, "relu", x[:1])  # the site's own name still cuts at its first activation
        assert first.at == "relu" and torch.allclose(first.tail(*first.head(x)), net(x), atol=1e-6)
    with pytest.raises(KeyError, match="no site named 'layer1.1.conv2'"):
        Cut(net, "layer1.1.conv2", x[:1])  # observed by the site, but not an activation


def test_insertion_without_control_and_with_the_papers_schedule(mlp_a, digits):
    (x, y), test = digits
    r = wb.stitching.insertion_test(mlp_a, "1", "relu", (x[:400], y[:400]), epochs=2, repeats=1, seed=0,
                                    eval_data=test, val_data=(x[400:600], y[400:600]), reinit=False, control=False,
                                    weight_decay=1e-4, lr_schedule="step", report="best")
    assert r.accuracy_control is None and r.baseline == r.accuracy_original
    assert r.penalties == [r.accuracy_original - r.accuracies[0]] and "no control" in r.summary()
    assert r.best_epochs[0] in (1, 2) and len(r.curves[0]) == 2 and "val_accuracy" in r.curves[0][0]
    with pytest.raises(ValueError, match="lr_schedule='cosine' is not a valid option"):
        wb.stitching.insertion_test(mlp_a, "1", "relu", (x[:32], y[:32]), epochs=1, lr_schedule="cosine")
    with pytest.raises(ValueError, match="report='best' picks the epoch"):
        wb.stitching.insertion_test(mlp_a, "1", "relu", (x[:32], y[:32]), epochs=1, report="best")
