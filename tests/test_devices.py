"""Models across devices: every tensor stays with the module that owns it.

This machine has no GPU, so "several devices" is a model dispatched by Hugging Face ``accelerate``
with part of it offloaded to disk and to CPU memory (its parameters then sit on the ``meta`` device
and a hook loads them for each forward). Answers are checked directly, in float64, against the same
model in memory; the offloaded files must be left as they were.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench.hooks._fingerprint import model_fingerprint

accelerate = pytest.importorskip("accelerate")

F64 = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()


@pytest.fixture
def dispatched(tmp_path):
    """(the model in memory, the same model dispatched: "2" offloaded to disk, "4" to CPU memory)."""
    from accelerate import dispatch_model

    model = mlp()
    device_map = {"0": "cpu", "1": "cpu", "2": "disk", "3": "cpu", "4": "disk"}
    return model, dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(tmp_path / "offload"))


def offloaded_values(model):
    """What the offload hooks serve, by parameter name (the files on disk, read through accelerate)."""
    out = {}
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        if getattr(hook, "offload", False):
            for key in ("weight", "bias"):
                out[f"{name}.{key}"] = torch.as_tensor(hook.weights_map[key]).clone()
    return out


def test_the_fixture_really_offloads(dispatched):
    _, model = dispatched
    assert {n for n, p in model.named_parameters() if p.device.type == "meta"} == {"2.weight", "2.bias", "4.weight", "4.bias"}


def test_capture_of_an_offloaded_model_is_exact(dispatched):
    model, moved = dispatched
    x = torch.randn(5, 6, dtype=F64)
    out, cache = wb.run_with_cache(model, x, names=None)
    moved_out, moved_cache = wb.run_with_cache(moved, x, names=None)
    assert torch.equal(out, moved_out) and sorted(cache) == sorted(moved_cache)
    for name in cache:
        assert torch.equal(cache[name], moved_cache[name])
    _, kept = wb.run_with_cache(moved, x, names=None, device=None)  # where they were computed: the execution device
    assert all(kept[n].device.type == "cpu" for n in kept)


def test_a_transform_of_an_offloaded_model_is_offloaded_alike_and_preserves_the_function(dispatched):
    model, moved = dispatched
    before = offloaded_values(moved)
    x = torch.randn(7, 6, dtype=F64)
    new, transform = wb.random_intertwiner(moved, seed=3)
    # Same layout: the offloaded modules of the copy are offloaded too, and their hooks serve new weights.
    assert {n for n, p in new.named_parameters() if p.device.type == "meta"} == {"2.weight", "2.bias", "4.weight", "4.bias"}
    served = offloaded_values(new)
    assert not torch.allclose(served["2.weight"], before["2.weight"])  # the transformed weights, not the files
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() < 1e-12  # the function, checked directly in float64
    # Nothing of the original moved: its files and its meta parameters are as they were.
    after = offloaded_values(moved)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n for n, p in moved.named_parameters() if p.device.type == "meta"} == set(before)
    # The same element pushed into the in-memory model gives the same weights (the offload changes nothing).
    reference = wb.apply_transform(model, transform)
    ref = dict(reference.named_parameters())
    assert torch.allclose(served["2.weight"], ref["2.weight"], atol=1e-14, rtol=0)
    assert torch.equal(dict(new.named_parameters())["0.weight"], ref["0.weight"])
    assert wb.verify(moved, new, x, transform=transform).passed


def test_a_negative_control_through_the_offload_changes_the_function(dispatched):
    """If the copy's hooks still served the original files, a non-symmetry would go unnoticed."""
    model, moved = dispatched
    x = torch.randn(7, 6, dtype=F64)
    broken, _ = wb.random_intertwiner(moved, seed=1, group="orthogonal", allow_non_symmetry=True)
    with torch.no_grad():
        assert (broken(x) - model(x)).abs().max() > 1e-3


def test_inplace_on_offloaded_weights_is_refused_and_dtype_copies_too(dispatched):
    _, moved = dispatched
    with pytest.raises(InvalidOptionError, match=r"inplace=True cannot transform weights accelerate offloaded"):
        wb.random_intertwiner(moved, inplace=True)
    new, t = wb.random_intertwiner(moved, seed=0)
    with pytest.raises(InvalidOptionError, match=r"offloaded"):
        wb.verify(moved, new, torch.randn(2, 6, dtype=F64), transform=t, dtype=torch.float32)


def test_a_fingerprint_reads_offloaded_weights(dispatched, tmp_path):
    model, moved = dispatched
    assert model_fingerprint(moved) == model_fingerprint(model)
    hook = moved[2]._hf_hook  # another value behind the hook: another fingerprint (a resume would be refused)
    hook.weights_map = {k: torch.as_tensor(hook.weights_map[k]).clone() + (k == "bias") for k in ("weight", "bias")}
    assert model_fingerprint(moved)["parameters"] != model_fingerprint(model)["parameters"]


def test_harvest_of_an_offloaded_model_equals_the_in_memory_one(dispatched, tmp_path):
    model, moved = dispatched
    batches = [torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    a = wb.harvest(model, batches, names=["1", "3"], path=tmp_path / "a", progress=False)
    b = wb.harvest(moved, batches, names=["1", "3"], path=tmp_path / "b", progress=False)
    for name in ("1", "3"):
        np.testing.assert_array_equal(a.array(name), b.array(name))
    assert a.fingerprint["model"] == b.fingerprint["model"]


def test_capture_keeps_values_where_they_were_computed_or_moves_them_where_asked():
    model, x = mlp(), torch.randn(3, 6, dtype=F64)
    with wb.capture(model, names="1", device=None) as kept:
        out = model(x)
    assert kept["1"].device == out.device
    with wb.capture(model, names="1", device="meta") as moved:
        model(x)
    assert moved["1"].device.type == "meta" and moved["1"].shape == (3, 16)
    with wb.capture(model, names="1", dtype=torch.float32) as cast:
        model(x)
    assert cast["1"].dtype == torch.float32 and torch.equal(cast["1"], kept["1"].float())


# ------------------------------------------------------------------ a raw Hugging Face model dispatched by accelerate
# What ``from_pretrained(..., device_map=...)`` gives a user whose model does not fit one device: its layout is read
# and pushed as the in-memory model's (the same map, the same weights), and the transformed copy is dispatched alike.
HF_FAMILIES = ["gpt2", "llama", "opt"]  # LayerNorm, tied; RMSNorm, rotary, gated; ReLU, learned positions offset


def hf_device_map(model, offloaded: str = "disk") -> dict:
    """Every top-level piece on the CPU, the first block ``offloaded``."""
    blocks = next(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
    out = {}

    def walk(prefix, module):
        for n, child in module.named_children():
            full = f"{prefix}.{n}" if prefix else n
            if full == blocks:
                out.update({f"{full}.{i}": offloaded if i == 0 else "cpu" for i in range(len(child))})
            elif blocks.startswith(full + "."):
                walk(full, child)
            else:
                out[full] = "cpu"
    walk("", model)
    return out


def hf_dispatched(family, how, tmp_path):
    """(the tiny float64 model of ``family`` in memory, a copy dispatched by accelerate: its first block offloaded to
    disk (``how="disk"``), or every weight offloaded to CPU memory (``how="cpu_offload"``))."""
    import test_hf_families as fam

    model = fam.build(family)
    if how == "disk":
        moved = accelerate.dispatch_model(copy.deepcopy(model), device_map=hf_device_map(model),
                                          offload_dir=str(tmp_path / "offload"))
    else:
        moved = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    return model, moved


def served(model) -> dict:
    """Every parameter's value, an offloaded one read from what accelerate's hook serves."""
    from workbench._offload import offloaded_tensor

    return {n: torch.as_tensor(offloaded_tensor(model, n, p)).clone()
            for n, p in model.named_parameters(remove_duplicate=False)}


def in_memory(model, weights):
    """A plain copy of the raw Hugging Face ``model``'s class holding ``weights``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = type(model)(copy.deepcopy(model.config)).double().eval()
    plain.load_state_dict(weights, strict=False)
    plain.tie_weights()
    return plain


@pytest.mark.parametrize("how", ["disk", "cpu_offload"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_a_dispatched_hugging_face_model_is_transformed_as_in_memory_and_stays_dispatched(family, how, tmp_path):
    """The map is the in-memory model's; the transform writes the weights the in-memory transform writes, bit for bit;
    the copy's offloaded modules are offloaded (their hooks serve the new weights, the original's files untouched);
    the function is preserved, computed here in float64 from the weights the copy serves (RMSNorm exact), and the
    dispatched copy's own forward computes what those weights compute; verify passes."""
    import test_hf_families as fam

    model, moved = hf_dispatched(family, how, tmp_path)
    meta = {n for n, p in moved.named_parameters() if p.device.type == "meta"}
    assert meta  # the fixture offloads
    assert fam.kinds(wb.symmetry_map(moved)) == fam.kinds(wb.symmetry_map(model))
    before = served(moved)
    new, t = wb.random_intertwiner(moved, seed=3)
    reference, _ = wb.random_intertwiner(model, seed=3)
    assert {n for n, p in new.named_parameters() if p.device.type == "meta"} == meta
    weights, ref = served(new), dict(reference.named_parameters(remove_duplicate=False))
    assert weights.keys() == ref.keys() and all(torch.equal(weights[n], ref[n]) for n in ref)
    assert not torch.equal(weights[sorted(meta)[0]], before[sorted(meta)[0]])  # new weights, not the files
    after = served(moved)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the original's offload is untouched
    assert {n for n, p in moved.named_parameters() if p.device.type == "meta"} == meta
    assert fam.rel(fam.logp(in_memory(model, weights)), fam.logp(model)) <= fam.TOL
    with torch.no_grad():
        assert torch.equal(new(input_ids=fam.IDS).logits, reference(input_ids=fam.IDS).logits)
    assert wb.verify(moved, new, fam.IDS, transform=t).passed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_bridge_around_a_dispatched_model_is_transformed_as_in_memory(family, tmp_path):
    """A TransformerLens bridge booted around a dispatched Hugging Face model: the in-memory bridge's map; the
    transformed bridge's model stays dispatched alike and serves the in-memory bridge transform's weights, bit for bit;
    the function is unchanged (computed here in float64 from the weights served); verify passes, and asked for a
    float64 copy of this float64 model, says so instead of copying."""
    import test_hf_families as fam

    model, moved = hf_dispatched(family, "disk", tmp_path)
    bridged, reference = fam.bridge(moved, tmp_path), fam.bridge(model, tmp_path)
    meta = {n for n, p in bridged.original_model.named_parameters() if p.device.type == "meta"}
    assert meta  # the copy fam.bridge boots around is dispatched too
    assert fam.kinds(wb.symmetry_map(bridged)) == fam.kinds(wb.symmetry_map(reference)) == fam.kinds(wb.symmetry_map(model))
    new, t = wb.random_intertwiner(bridged, seed=3)
    ref, _ = wb.random_intertwiner(reference, seed=3)
    assert {n for n, p in new.original_model.named_parameters() if p.device.type == "meta"} == meta
    weights = served(new.original_model)
    want = dict(ref.original_model.named_parameters(remove_duplicate=False))
    assert weights.keys() == want.keys() and all(torch.equal(weights[n], want[n]) for n in want)
    # The Hugging Face model's own names (the bridge wraps its modules, and adds aliases such as self_attn.o)
    names = dict(model.named_parameters(remove_duplicate=False)).keys()
    plain = {n.replace("._original_component", ""): w for n, w in weights.items()}
    assert names <= plain.keys()
    plain = {n: plain[n] for n in names}
    assert fam.rel(fam.logp(in_memory(model, plain)), fam.logp(model)) <= fam.TOL
    assert wb.verify(bridged, new, fam.IDS, transform=t).passed
    with pytest.raises(InvalidOptionError, match="already torch.float64: dtype=None"):
        wb.verify(bridged, new, fam.IDS, transform=t, dtype=F64)


def test_verify_reads_what_a_dispatched_copy_serves(tmp_path):
    """The negative control: one offloaded weight of the transformed copy altered behind its hook (a column swap of
    the MLP's input projection) changes the function, and verify FAILs it."""
    import test_hf_families as fam

    model, moved = hf_dispatched("gpt2", "disk", tmp_path)
    new, t = wb.random_intertwiner(moved, seed=3)
    hook = new.get_submodule("transformer.h.0.mlp.c_fc")._hf_hook
    w = hook.weights_map["weight"]
    hook.weights_map["weight"] = w[:, [1, 0] + list(range(2, w.shape[1]))].clone()
    assert fam.rel(fam.logp(in_memory(model, served(new))), fam.logp(model)) > 1e-3  # checked here
    assert not wb.verify(moved, new, fam.IDS, transform=t).passed


def test_a_forward_set_on_the_instance_stays_refused_under_accelerate(tmp_path):
    """accelerate's own wrapper around a module's class forward is read through; a forward the user set on an instance
    before dispatching is not the class's computation, and is refused by name."""
    import test_hf_families as fam

    model = fam.build("gpt2")
    block = model.transformer.h[1].mlp
    block.forward = lambda x, block=block: type(block).forward(block, x) * 1.0
    moved = accelerate.dispatch_model(model, device_map=hf_device_map(model), offload_dir=str(tmp_path / "offload"))
    smap = wb.symmetry_map(moved)
    assert len(smap) == 0 and "accelerate's hook around a forward set on the instance" in smap.skipped[0][1]
    assert "transformer.h.1.mlp" in smap.skipped[0][1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fold_layernorm_and_untie_of_a_dispatched_hugging_face_model(family, tmp_path):
    """fold_layernorm and untie_embeddings read a dispatched model's offloaded weights and give a model dispatched alike,
    holding the weights the in-memory model's fold / untie gives, bit for bit; the function is unchanged (computed here
    in float64 from the weights served)."""
    import test_hf_families as fam

    model, moved = hf_dispatched(family, "disk", tmp_path)
    meta = {n for n, p in moved.named_parameters() if p.device.type == "meta"}
    for verb in (wb.fold_layernorm, wb.untie_embeddings):
        new, reference = verb(moved), verb(model)
        assert {n for n, p in new.named_parameters() if p.device.type == "meta"} == meta
        weights, ref = served(new), dict(reference.named_parameters(remove_duplicate=False))
        assert weights.keys() == ref.keys() and all(torch.equal(weights[n], ref[n]) for n in ref)
        assert fam.rel(fam.logp(in_memory(reference, weights)), fam.logp(model)) <= fam.TOL
        if verb is wb.fold_layernorm:  # the offloaded block's norm gains are folded, not what the files hold
            gains = [n for n in meta if "norm" in n or ".ln_" in n]
            assert gains and all(torch.equal(weights[n], torch.ones_like(weights[n])) for n in gains if n.endswith("weight"))


def test_fold_layernorm_of_a_dispatched_module_is_folded_and_offloaded_alike(tmp_path):
    """A plain module whose LayerNorm and its reader accelerate offloaded to disk: the fold's plan reads the offloaded
    gain and bias (a zero gain would be refused), the copy is folded onloaded and offloaded again; its output is the
    original's, computed directly in float64, and its hooks serve the in-memory fold's weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        model[1].weight.mul_(2.5).add_(0.2 * torch.randn(8, dtype=F64))
        model[1].bias.add_(0.3)
    moved = accelerate.dispatch_model(copy.deepcopy(model), device_map={"0": "cpu", "1": "disk", "2": "disk", "3": "cpu",
                                                                        "4": "cpu"}, offload_dir=str(tmp_path / "off"))
    x = torch.randn(5, 6, dtype=F64)
    folded, reference = wb.fold_layernorm(moved, x), wb.fold_layernorm(model, x)
    assert {n for n, p in folded.named_parameters() if p.device.type == "meta"} == {"1.weight", "1.bias", "2.weight", "2.bias"}
    weights = served(folded)
    assert all(torch.equal(weights[n], p) for n, p in reference.named_parameters())
    assert torch.equal(weights["1.weight"], torch.ones(8, dtype=F64))  # folded, not the files
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-12 * model(x).abs().max()


# ------------------------------------------------------------------ traced models dispatched by accelerate
def vision_device_map(model) -> dict:
    """Alternate children on the CPU and on disk; a child holding most of the weights is split one level further
    (its blocks alternate), its own tensors on the CPU."""
    total = sum(p.numel() for p in model.parameters())
    pieces, own = [], [n for n, _ in list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False))]
    for name, child in model.named_children():
        if sum(p.numel() for p in child.parameters()) > total / 2 and len(list(child.children())) > 1:
            pieces += [f"{name}.{k}" for k, _ in child.named_children()]
            own += [f"{name}.{k}" for k, _ in list(child.named_parameters(recurse=False)) + list(child.named_buffers(recurse=False))]
        else:
            pieces.append(name)
    return {**{p: "disk" if i % 2 else "cpu" for i, p in enumerate(pieces)}, **{n: "cpu" for n in own}}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")  # (root parameters
# are named by themselves: accelerate checks them by prefix, and warns that they are not modules)
@pytest.mark.parametrize("name", ["convnext", "vit", "mobilenet_v3_small", "densenet"])
def test_a_dispatched_vision_model_has_the_in_memory_map_and_transform(name, tmp_path):
    """Traced models with blocks offloaded to disk. The trace reads a dispatched module's class forward, not
    accelerate's hook around it (traced through, the hook's device moves froze the residual streams of a ResNet and
    its control flow on devices made a ViT untraceable); the rules read offloaded LayerNorm gains and layer scales
    through the hooks. The map is the in-memory model's, the transform writes the in-memory transform's weights and
    preserves the function (float64, computed directly); the fold does too."""
    from test_vision_constructs import randomised, small_vision_models

    torch.manual_seed(0)
    model = randomised(small_vision_models()[name]())
    moved = accelerate.dispatch_model(copy.deepcopy(model), device_map=vision_device_map(model),
                                      offload_dir=str(tmp_path / "off"))
    assert any(p.device.type == "meta" for p in moved.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        assert torch.equal(moved(x), base)
    smap = wb.symmetry_map(moved, x)
    assert [(s.name, s.group.name) for s in smap] == [(s.name, s.group.name) for s in wb.symmetry_map(model, x)]
    new, t = wb.random_intertwiner(moved, seed=2, example=x)
    reference = wb.apply_transform(model, t)
    weights = served(new)
    assert all(torch.equal(weights[n], p) for n, p in reference.named_parameters())
    with torch.no_grad():
        assert (new(x) - base).abs().max() <= 1e-10 * base.abs().max()
    original = dict(model.named_parameters())
    offloaded = [n for n, p in new.named_parameters() if p.device.type == "meta"]
    assert any(not torch.equal(weights[n], original[n]) for n in offloaded)  # the offloaded weights moved too
    assert wb.verify(moved, new, x, transform=t).passed
    if name in ("convnext", "vit"):
        folded = wb.fold_layernorm(moved, x)
        with torch.no_grad():
            assert (folded(x) - base).abs().max() <= 1e-10 * base.abs().max()


class _Moves(nn.Module):
    """Two ReLU layers with a ``.to()`` of the hidden activations between them (a device move, or a dtype change)."""

    def __init__(self, dtype=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)
        self.dtype = dtype

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = h.to(x.device) if self.dtype is None else h.to(self.dtype)
        return self.fc2(h.to(x.dtype))


def test_a_device_move_inside_a_forward_keeps_the_site_and_a_dtype_change_does_not():
    """``x.to(device)`` copies values: every channel map commutes with it, so the hidden site is mapped (and exact);
    a cast to float16 rounds, so the site it touches is skipped, naming the method."""
    torch.manual_seed(0)
    model = _Moves().double().eval()
    x = torch.randn(5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert [(s.name, s.group.name) for s in smap] == [("act", "scaled_permutation")]
    new, _ = wb.random_intertwiner(model, seed=1, example=x)
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() <= 1e-12 * model(x).abs().max()
    cast = _Moves(torch.float16).double().eval()
    smap = wb.symmetry_map(cast, x)
    assert len(smap) == 0 and any(".to() is not understood" in why for _, why in smap.skipped), smap.skipped
