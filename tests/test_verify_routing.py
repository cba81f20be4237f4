"""verify on a mixture of experts whose router meets ties (symmetry/_verify_routing.py).

A top-k router's choice is discontinuous in its logits: where two experts' logits are equal, or closer than the
rounding a transform changes them by, an exact symmetry's new model may pick the other expert, and its outputs then
differ by the two experts' difference. The models here make such ties on purpose: two rows of every router equal (an
exact tie for every token), or one a rounding apart (a near tie). The tests check, computed here and not by verify,
that the ties really flip choices and move the outputs (what verify FAILed before), that verify now PASSes those
exact transforms (evaluating the original with the new model's choice at each tie) and counts them, and that every
transform which is not a symmetry still FAILs with ties present: a wrong expert that only wins at ties (which making
the new model choose as the original would have hidden), a wrong router row, a stream map outside the stream's group,
experts moved without their router columns. Forcing a non-permutation on a site that moves whole units (the experts' order,
attention heads) is refused: it used to be pushed as its permutation alone, and verify passed that "negative control".
"""
import copy

import pytest
import torch

import workbench as wb
from test_hf_families import IDS, TOL, rel
from test_hf_mixtral import build, logp as mixtral_logp

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

X = torch.randint(1, 49, (4, 12), generator=torch.Generator().manual_seed(1))


def tied(seed=3, k=1, near=0.0):
    """A float32 Mixtral (4 experts, top ``k``) whose routers give experts 0 and 1 the same logit for every token
    (``near``: expert 1's row scaled by 1 + near, a tie within rounding), expert 0's row raised so that they lead."""
    model = build(seed=seed, num_experts_per_tok=k).float()
    return tie(model, near)


def tie(model, near=0.0):
    """``model`` with experts 0 and 1 of every router given the same logit (``near``: within rounding), leading."""
    with torch.no_grad():
        for mlp in sparse(model):
            w = mlp.gate.weight
            w[0] += 0.5 * w[0].abs()
            w[1] = w[0] * (1 + near)
    return model


def sparse(model) -> list:
    """The mixtures of ``model``'s layers (a Qwen model's dense layers have none)."""
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def choices(model, x):
    """Each router's chosen experts on ``x``, read here from the routers' own outputs."""
    seen, handles = [], []
    for mlp in sparse(model):
        handles.append(mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].clone())))
    try:
        with torch.no_grad():
            logp = model(x).logits.double().log_softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return seen, logp


def expert_order(model, new):
    """Per layer, the original expert at each of the new model's experts, read from the weights: the new model's expert
    j holds an original expert's gate rows up to permutations of its hidden units and signed ones of the stream (its up
    rows and down columns also take the expert's scales), so the gate rows' sorted magnitudes match."""
    out = []
    for a, b in zip(model.model.layers, new.model.layers):
        n = a.mlp.experts.gate_up_proj.shape[1] // 2
        old, mov = ((m.mlp.experts.gate_up_proj[:, :n].detach().double().abs().flatten(1).sort(1).values) for m in (a, b))
        out.append(torch.cdist(mov, old).argmin(1))
    return out


def changed_expert_fails(model, new, t) -> None:
    """The first mixture's most chosen expert in ``new`` (what ``t`` made of ``model``), changed after the transform:
    the function moves (computed here) and verify FAILs, ties or not."""
    chosen, _ = choices(new, X)
    _, old_logp = choices(model, X)
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        sparse(wrong)[0].experts.down_proj[int(chosen[0].flatten().mode().values)] *= 1.5
    assert (choices(wrong, X)[1] - old_logp).abs().max() > 1e-2
    assert not wb.verify(model, wrong, X, t).passed


def test_tied_routers_flip_choices_of_exact_transforms_and_verify_evaluates_the_original_with_them():
    model = tied()
    old_choice, old_logp = choices(model, X)
    flipped_total = ties_total = 0
    for seed in range(5):
        new, t = wb.random_intertwiner(model, seed=seed)
        new_choice, new_logp = choices(new, X)
        labels = expert_order(model, new)
        # computed here: the first router's choices differ only between the tied experts 0 and 1
        mapped = labels[0][new_choice[0]]
        differ = (mapped != old_choice[0]).any(-1)
        assert set(old_choice[0][differ].flatten().tolist()) | set(mapped[differ].flatten().tolist()) <= {0, 1}
        flipped_total += int(differ.sum())
        if differ.any():  # and the outputs move by far more than rounding: what verify FAILed before
            assert (new_logp - old_logp).abs().max() > 1e-2
        report = wb.verify(model, new, X, t)
        assert report.passed, report.summary()
        ties_total += report.routing_ties
        if report.routing_ties:
            assert "the original was evaluated with the new model's choice" in report.summary()
        assert "top-k expert tie within rounding" in report.rule
    assert flipped_total > 0 and ties_total >= flipped_total  # (later layers' ties come on top of the first's)
    # the routers' hooks (recording, and forcing the original's choices) are gone, and the models are unchanged
    assert all(not mlp.gate._forward_hooks for m in (model, new) for mlp in sparse(m))
    assert torch.equal(choices(model, X)[1], old_logp)


def passes_with_ties(model, seeds) -> None:
    """Every exact transform of ``model`` (seeds ``seeds``) passes verify, and some of them met ties."""
    counted = 0
    for seed in seeds:
        new, t = wb.random_intertwiner(model, seed=seed)
        report = wb.verify(model, new, X, t)
        assert report.passed, report.summary()
        counted += report.routing_ties
    assert counted > 0


def test_near_ties_within_rounding_pass_and_top2_routing_too():
    passes_with_ties(tied(near=2.0 ** -22), range(4))
    passes_with_ties(tied(seed=4, k=2), range(4))


def test_transforms_that_are_not_symmetries_fail_with_ties_present():
    model = tied()
    _, old_logp = choices(model, X)
    new, t = wb.random_intertwiner(model, seed=0)
    assert wb.verify(model, new, X, t).routing_ties > 0
    chosen, _ = choices(new, X)
    used = int(chosen[0].flatten().mode().values)  # the new model's most chosen expert in the first layer

    def fails(wrong, transform=t):
        _, logp = choices(wrong, X)
        assert (logp - old_logp).abs().max() > 1e-2  # computed here: the function changed
        assert not wb.verify(model, wrong, X, transform).passed

    # that expert's down projection changed after the transform
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.model.layers[0].mlp.experts.down_proj[used] *= 1.5
    fails(wrong)
    # that expert swapped with another without their router rows
    wrong = copy.deepcopy(new)
    other = (used + 2) % 4
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(wrong.model.layers[0].mlp.experts, name)
            p[[used, other]] = p[[other, used]].clone()
    fails(wrong)
    # that expert's router row moved off the stream's element: its logits disagree beyond rounding (nothing forced)
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.model.layers[0].mlp.gate.weight[used] -= 0.5 * wrong.model.layers[0].mlp.gate.weight[used].abs()
    fails(wrong)
    # a stream map outside the stream's group
    bad, bt = wb.random_intertwiner(model, seed=1, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    fails(bad, bt)
    # the first layer's experts' hidden units by dense maps (not observed: only the outputs can tell)
    hidden = [f"blocks.0.mlp.hidden.{e}" for e in range(4)]
    bad, bt = wb.random_intertwiner(model, seed=1, sites=hidden, group="gl", allow_non_symmetry=True)
    fails(bad, bt)


def test_a_bridge_over_tied_routers_passes(tmp_path):
    from test_hf_families import bridge

    passes_with_ties(bridge(tied().double(), tmp_path).float(), range(3))


def test_a_routed_models_floor_from_a_copy_that_chose_other_experts_is_not_used():
    # float32 against its float64 copy: near ties flip between the two precisions, so the "floor" such a copy measures
    # is the experts' difference; taken as rounding it raised the tolerance to ~1 and passed a transform that is no
    # symmetry. Here the stream by a small rotation (not in its group) moves the outputs by ~1e-3, computed directly.
    model = tied(near=2.0 ** -23)
    bad, bt = wb.random_intertwiner(model, seed=2, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    report = wb.verify(model, bad, X, bt)
    assert not report.passed
    assert report.tolerance < 1e-2, report.rule


@pytest.mark.parametrize("site, group", [("blocks.0.mlp.experts", "signed_permutation"),
                                         ("blocks.0.mlp.experts", "scaled_permutation"),
                                         ("blocks.0.attn.heads", "signed_permutation")])
def test_a_non_permutation_forced_on_whole_units_is_refused(site, group):
    model = build(seed=0).float()
    assert site in [s.name for s in wb.symmetry_map(model)]
    with pytest.raises(wb.InvalidOptionError, match="moves whole units"):
        wb.random_intertwiner(model, seed=0, sites=[site], group=group, allow_non_symmetry=True)
    # a transform made by hand is refused the same way
    _, t = wb.random_intertwiner(model, seed=0, sites=[site])
    element = t.elements[site]
    signed = type(element)(element.perm, -torch.ones(element.n, dtype=torch.float64), element.phi_kind, group)
    forged = type(t)({site: signed}, {site: group}, [site], t.seed, t.model, t.affine)
    with pytest.raises(wb.InvalidOptionError, match="moves whole units"):
        wb.apply_transform(model, forged)
    # the permutation itself still goes through, exact (the routing is unchanged by it)
    new, t = wb.random_intertwiner(model, seed=0, sites=[site])
    assert wb.verify(model, new, IDS, t).passed


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "qwen3_moe"])
def test_the_other_mixtures_routers_meet_ties_the_same_way(family):
    """OLMoE's, Qwen2-MoE's and Qwen3-MoE's routers are found and their ties handled as Mixtral's: exact transforms of
    a float32 model with two equal router rows per layer pass (some choices made at ties), and the most chosen expert of
    the first layer changed after the transform fails (the function moved, computed here)."""
    import importlib

    model = tie(importlib.import_module(f"test_hf_{family}").build(seed=3, num_experts_per_tok=1).float())
    passes_with_ties(model, range(3))
    changed_expert_fails(model, *wb.random_intertwiner(model, seed=0))


def test_a_float64_model_with_float32_routers_and_norms():
    """In a float64 Mixtral the router still chooses on float32 probabilities and the norms compute in float32, so the
    routers' logits at ties are ~1e-7 apart (not 1e-16): ties are judged at float32's tolerance at least, and the floor
    run of the original (its float32 parts rounded) meets the ties as the comparison's original did. Every exact
    transform FAILed here before; a changed expert still FAILs (the function moved, computed here)."""
    model = tied().double()
    passes_with_ties(model, range(3))
    new, t = wb.random_intertwiner(model, seed=0)
    assert wb.verify(model, new, X, t, dtype=torch.float64).passed  # (the float64 replay of a float64 model's transform)
    changed_expert_fails(model, new, t)


def test_large_scales_raise_a_routed_models_floor_honestly():
    """scale_sigma 3 on a float32 Mixtral without ties: the draw is exact (float64, computed here) but its float32
    rounding is 2-4e-4, so verify's floor carries the verdict; the floor's copies route as the model did. A fixed 1e-4
    cap on routed models' floors (this module's first answer to flips in the floor) FAILed these."""
    model = build(seed=3, num_experts_per_tok=1).float()
    new, t = wb.random_intertwiner(model, seed=0, scale_sigma=3.0)
    model64 = copy.deepcopy(model).double()  # (this file's float64 forward: norms and softmax in float64 too)
    assert rel(mixtral_logp(wb.apply_transform(model64, t)), mixtral_logp(model64)) <= TOL
    report = wb.verify(model.float(), new, X, t)
    assert report.passed and report.floor > 1e-4, report.summary()
