"""OPT, GPT-2, GPT-NeoX, BLOOM and BERT bridges copied from a never-run template (``models/_hf_shell``), not booted.

Their boots make what ties a bridge to its weights: OPT's and BERT's placeholder MLP (``blocks.{i}.mlp``) gets
permanent hooks, closures over the booted components, that mirror ``fc1``/``fc2``'s hook points into its own;
GPT-2's, GPT-NeoX's and BLOOM's fused q/k/v are split into q, k, v at boot (views of GPT-2's ``c_attn``, copies of
GPT-NeoX's and BLOOM's interleaved ``query_key_value``; BLOOM's attention is a subclass, its ALiBi bias made per
call). A copy gets the mirrors wired over its own components and its split q, k, v derived from its pushed
weights. The adversary: the original bridge has run, with a cache and a live hook of the user's on the very hook
point the mirror fires; it is transformed twice. Everything is
checked directly in float64: the new bridge against the pushed Hugging Face model run on its own, the
cached q, k, v and z against a matrix product of the new weights, the placeholder's hook against the
Hugging Face ``fc2`` output; the original and the template are hashed before and after; and the new
bridge's weights are changed in place to show nothing else moves.
"""
import hashlib
import math
import warnings

import pytest
import torch

import workbench as wb

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

from test_hf_bridge_boot import _plain  # noqa: E402
from test_hf_bridge_shell import _hooked, _reference  # noqa: E402
from test_hf_bloom import build as _bloom, logp as _bloom_logp  # noqa: E402
from test_hf_families import IDS, as_raw, build, logp, rel  # noqa: E402

from workbench.models import _hf_shell  # noqa: E402

F64, TOL = torch.float64, 1e-10
FAMILIES = ["opt", "opt350", "bert", "gpt2", "gpt_neox", "bloom"]
SPLIT = ("gpt2", "gpt_neox", "bloom")  # a fused q/k/v split at boot
# Hugging Face modules of layer {i}: the q/k/v projection(s) (one name: fused), the output projection (its input
# is z) and the module whose output the MLP's hook_out sees (the placeholder's mirror: its output projection; BLOOM's
# MLP adds the residual itself, so its whole MLP).
SPEC = {
    "opt": ("model.decoder.layers.{i}.self_attn.", ("q_proj", "k_proj", "v_proj"), "out_proj", "model.decoder.layers.{i}.fc2"),
    "bert": ("bert.encoder.layer.{i}.attention.", ("self.query", "self.key", "self.value"), "output.dense",
             "bert.encoder.layer.{i}.output.dense"),
    "gpt2": ("transformer.h.{i}.attn.", ("c_attn",), "c_proj", "transformer.h.{i}.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.{i}.attention.", ("query_key_value",), "dense", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
    "bloom": ("transformer.h.{i}.self_attention.", ("query_key_value",), "dense", "transformer.h.{i}.mlp"),
}
SPEC["opt350"] = SPEC["opt"]
# The attention the bridge computes: OPT's and BERT's run Hugging Face's own module, in the eager implementation
# their config names (its softmax rounds through float32: a plain boot differs from SDPA by ~6e-8 too); GPT-2's
# and GPT-NeoX's split attention is TransformerLens's own reconstruction, exact in float64 like SDPA. BLOOM's has one
# implementation, its softmax through float32 as TransformerLens's BLOOM reconstruction's is.
IMPL = {"opt": "eager", "opt350": "eager", "bert": "eager", "gpt2": "sdpa", "gpt_neox": "sdpa", "bloom": "eager"}


def _bert():
    """A tiny BertForMaskedLM, every parameter random in float64 (as ``test_hf_families.build`` makes its models:
    a fresh model's unit gains and zero biases would let a wrong transform of the norms pass)."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                                     intermediate_size=48, max_position_embeddings=16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BertForMaskedLM(config).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1 if "LayerNorm.weight" in name else 0) + 0.3 * torch.randn(p.shape, generator=g, dtype=F64))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[1]))
    return model


def _model(family):
    if family == "bloom":
        model = _bloom()
        model.config.architectures = ["BloomForCausalLM"]  # (what a boot picks its adapter by)
        return model
    return _bert() if family == "bert" else build(family)


def _close(got, want) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


def _digest(bridge) -> str:
    """A hash of every parameter and buffer of ``bridge`` and its Hugging Face model, by name and bits."""
    h = hashlib.sha256()
    for root in (bridge, bridge.original_model):
        for name, t in list(root.named_parameters(remove_duplicate=False)) + list(root.named_buffers()):
            h.update(name.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _template_state(T) -> tuple:
    """What must never change on a template: its parameters (ids, all meta) and that it has no hook but a split
    attention's own state-dict hooks (``_unwire`` is read-only when it finds no mirror to take off)."""
    params = [p for m in _hf_shell._params(T) for p in m._parameters.values() if p is not None]
    assert all(p.is_meta for p in params)
    assert _hf_shell._unwire(T, _hf_shell._params(T)) == []
    return tuple(id(p) for p in params)


def _direct(raw, family, n_heads, d_head) -> dict:
    """q, k, v, z of every layer of ``raw`` (a plain Hugging Face model), [batch, pos, head, d_head], and the MLP's
    output: the inputs of the projections captured, q, k, v computed here from the weights."""
    prefix, qkv, out, mlp = SPEC[family]
    seen, handles = {}, []
    for i in range(raw.config.num_hidden_layers):
        first = raw.get_submodule(prefix.format(i=i) + qkv[0])
        handles.append(first.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("x", i), a[0])))
        handles.append(raw.get_submodule(prefix.format(i=i) + out).register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(("z", i), a[0])))
        handles.append(raw.get_submodule(mlp.format(i=i)).register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(("mlp", i), o)))
    with torch.no_grad():
        raw(input_ids=IDS)
    for h in handles:
        h.remove()
    shape = IDS.shape + (n_heads, d_head)
    out_ = {}
    for i in range(raw.config.num_hidden_layers):
        x = seen["x", i]
        mods = [raw.get_submodule(prefix.format(i=i) + n) for n in qkv]
        if family == "gpt2":  # Conv1D: x W + b, columns [q | k | v]
            q, k, v = (x @ mods[0].weight + mods[0].bias).split(n_heads * d_head, -1)
        elif family in ("gpt_neox", "bloom"):  # rows interleaved per head: [head, (q | k | v), d_head]
            y = (x @ mods[0].weight.T + mods[0].bias).view(*IDS.shape, n_heads, 3, d_head)
            q, k, v = y[..., 0, :], y[..., 1, :], y[..., 2, :]
        else:
            q, k, v = (x @ m.weight.T + m.bias for m in mods)
        out_.update({(i, "q"): q.reshape(shape), (i, "k"): k.reshape(shape), (i, "v"): v.reshape(shape),
                     (i, "z"): seen["z", i].reshape(shape), (i, "mlp"): seen["mlp", i].reshape(*IDS.shape, -1)})
    return out_


def _aliases(bridge) -> list[bool]:
    """For each split q/k/v parameter, whether it shares its fused parameter's storage (a boot's GPT-2: views)."""
    out = []
    for m in bridge.modules():
        if type(m) in _hf_shell._split_classes():
            fused = {p.untyped_storage().data_ptr() for p in m.original_component.parameters(recurse=True)
                     if p.untyped_storage().data_ptr() and not any(p is q for b in (m.q, m.k, m.v)
                                                                    for q in b.original_component.parameters())}
            out += [p.untyped_storage().data_ptr() in fused for b in (m.q, m.k, m.v) for p in b.original_component.parameters()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_copy_of_a_template_sees_only_its_own_weights_and_hooks(family):
    B = _plain(_model(family))
    names = [f"blocks.{i}.{n}" for i in range(B.cfg.n_layers)
             for n in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "mlp.hook_out")]
    if family != "opt350":  # (TransformerLens's own run_with_cache fails on a post-LN OPT bridge, booted or not)
        B.run_with_cache(IDS)  # it has run, with a cache
    wb.run_with_cache(B, IDS, names=names)
    calls = []  # the user's live hook on the very hook point OPT's and BERT's mirror fires
    B.blocks[0].mlp.hook_out.add_hook(lambda x, hook: calls.append(hook.name))
    with pytest.raises(wb.UnsupportedModelError, match="forward hooks"):
        wb.random_intertwiner(B, seed=3)  # a hook may change what its module computes: refused (put back below)
    B.reset_hooks()
    with torch.no_grad():
        logits = B(IDS)
    before = _digest(B)

    first = _hf_shell.shell(B, F64)  # this family takes the copy: never finished, it fails loudly if split
    assert first is not None
    T = next(reversed(_hf_shell._TEMPLATES.values()))[0]
    template = _template_state(T)
    if family in SPLIT:
        with pytest.raises(Exception):
            first(IDS)
    new, _ = wb.random_intertwiner(B, seed=3)
    other, _ = wb.random_intertwiner(B, seed=4)
    B.blocks[0].mlp.hook_out.add_hook(lambda x, hook: calls.append(hook.name))  # on again: the copies never run it
    n = len(calls)
    hooks = _hooked(new)  # before it runs (a bridge's first forward pass wires hooks of its own)
    raw, raw_other = as_raw(new), as_raw(other)
    raw.config._attn_implementation = raw_other.config._attn_implementation = IMPL[family]

    # (a) the new bridge computes what the pushed Hugging Face model computes on its own, and preserves the function
    with torch.no_grad():
        assert rel(new(IDS).double(), raw(input_ids=IDS).logits) <= TOL
        assert rel(other(IDS).double(), raw_other(input_ids=IDS).logits) <= TOL
    lp = _bloom_logp if family == "bloom" else logp  # (BLOOM's: its softmax in float64)
    assert rel(lp(new), lp(B)) <= TOL and rel(lp(other), lp(B)) <= TOL
    ref = _reference(new)  # and is a plain boot around its weights, down to which split tensors are views
    assert hooks == _hooked(ref) and _aliases(new) == _aliases(ref)
    with torch.no_grad():
        assert torch.equal(ref(IDS), new(IDS)) and _hooked(new) == _hooked(ref)
    assert not any(p.is_meta for p in new.parameters())

    # (b) its hook points see its own weights: q, k, v, z and the placeholder MLP's hook_out, computed directly
    mine = []
    new.blocks[0].mlp.hook_out.add_hook(lambda x, hook: mine.append(x.detach().clone()))
    _, cache = wb.run_with_cache(new, IDS, names=names)
    if family != "opt350":
        _, full = new.run_with_cache(IDS)
        assert all(torch.equal(full[k], cache[k]) for k in names)
    want = _direct(raw, family, new.cfg.n_heads, new.cfg.d_head)
    for i in range(new.cfg.n_layers):
        for what in ("q", "k", "v", "z"):
            assert _close(cache[f"blocks.{i}.attn.hook_{what}"], want[i, what]) <= TOL, (i, what)
        assert _close(cache[f"blocks.{i}.mlp.hook_out"], want[i, "mlp"]) <= TOL, i
    assert len(mine) == 1 + (family != "opt350") and _close(mine[0], want[0, "mlp"]) <= TOL  # the user's hook fires
    assert len(calls) == n  # and the original's never did

    # (c) the original and the template are as they were
    assert _digest(B) == before and _template_state(T) == template

    # (d) the new bridge's weights changed in place move nothing else
    with torch.no_grad():
        out_other = other(IDS)
        for p in list(new.parameters()) + list(new.original_model.parameters()):
            p.add_(0.5)
        assert not torch.equal(new(IDS), out_other)
        assert torch.equal(other(IDS), out_other) and torch.equal(B(IDS), logits)
    assert _digest(B) == before and _template_state(T) == template and len(mine) == 2 + (family != "opt350") and len(calls) == n + 1


def test_only_the_boots_own_mirrors_are_taken_off_a_template():
    """Negative controls for ``_unwire``: a boot's OPT bridge carries exactly the placeholder mirrors (taken off, the
    bridge has no hook left); one more permanent hook of anyone's, or a mirror's closure over another module, and
    the template is refused (booted instead); a GPT-2 attention's state-dict hooks are its own, one more is not."""
    B = _plain(build("opt"))
    assert len(_hooked(B)) == 4
    assert _hf_shell._unwire(B, _hf_shell._params(B)) == ["blocks.0.mlp", "blocks.1.mlp"] and _hooked(B) == []

    B = _plain(build("opt"))
    B.blocks[0].hook_in.add_hook(lambda x, hook: None, is_permanent=True)
    assert _hf_shell._unwire(B, _hf_shell._params(B)) is None
    B = _plain(build("opt"))
    B.blocks[1].mlp.submodules["in"].hook_in.add_hook(lambda x, hook: None, is_permanent=True)  # beside a mirror
    assert _hf_shell._unwire(B, _hf_shell._params(B)) is None
    B = _plain(build("opt"))
    handle = B.blocks[0].mlp.submodules["in"].hook_in.fwd_hooks[0]
    mirror = handle.user_hook  # the same code, closing over another placeholder
    handle.user_hook = type(mirror)(mirror.__code__, mirror.__globals__, None, None,
                                    (type(mirror.__closure__[0])(B.blocks[1].mlp),))
    assert _hf_shell._unwire(B, _hf_shell._params(B)) is None

    G = _plain(build("gpt2"))
    assert _hf_shell._unwire(G, _hf_shell._params(G)) == []
    G.blocks[0].attn._register_state_dict_hook(lambda *a: None)
    assert _hf_shell._unwire(G, _hf_shell._params(G)) is None


def test_a_bloom_attention_other_than_the_one_read_is_booted(monkeypatch):
    """Negative control for ``_split_classes``: BLOOM's attention, a subclass, is copied only as read in TransformerLens
    4.x (nothing of its own but ``__init__`` and forward-time code); one that defines its own copy, or sets an
    attribute in its ``__init__``, is no split class and its template is refused (booted instead)."""
    from transformer_lens.model_bridge.generalized_components import BloomAttentionBridge

    B = _plain(_model("bloom"))
    assert BloomAttentionBridge in _hf_shell._split_classes() and _hf_shell._template(B, F64) is not None
    monkeypatch.setattr(BloomAttentionBridge, "__deepcopy__", lambda self, memo: self, raising=False)
    assert BloomAttentionBridge not in _hf_shell._split_classes() and _hf_shell._template(B, F64) is None
    monkeypatch.delattr(BloomAttentionBridge, "__deepcopy__")
    own = BloomAttentionBridge.__init__

    def __init__(self, *args, **kwargs):
        own(self, *args, **kwargs)
        self.slopes = None

    monkeypatch.setattr(BloomAttentionBridge, "__init__", __init__)
    assert BloomAttentionBridge not in _hf_shell._split_classes()


def test_a_falcon_bridge_is_copied_with_the_adapters_patches_bound_to_the_copy(monkeypatch):
    """Falcon's adapter sets every FalconLinear's and decoder layer's ``forward`` to a closure over that module at boot.
    A deep copy keeps the template's closures, so without ``_PREPARED_AGAIN`` the trial copy reaches the template and
    Falcon is booted for every transform; the copy now runs the adapter's ``prepare_model`` on its own modules. It
    computes what a plain boot around the same weights computes, bit for bit, every patched forward closes over the
    copy's own module, the function is preserved (computed in float64 on the plain models), and the original is as
    it was."""
    from collections import OrderedDict

    from test_hf_config_hunt import build as hunt, outputs

    raw = hunt("falcon")
    raw.config.architectures = ["FalconForCausalLM"]
    B = _plain(raw)
    before = _digest(B)
    monkeypatch.setattr(_hf_shell, "_TEMPLATES", OrderedDict())  # templates of this test only
    assert _hf_shell.shell(B, F64) is not None
    new, _ = wb.random_intertwiner(B, seed=3)
    with torch.no_grad():
        assert torch.equal(_reference(new)(IDS), new(IDS))
    patched = [m for m in new.original_model.modules() if "forward" in m.__dict__]
    assert len(patched) == 2 * (2 + 2) + 2  # per layer: q/k/v, dense, two MLP linears; and each decoder layer
    for m in patched:
        f = m.__dict__["forward"]
        owners = [c.cell_contents for c in (getattr(f, "__closure__", None) or ())] + [getattr(f, "__self__", None)]
        assert any(o is m for o in owners), type(m).__name__
    assert rel(outputs(as_raw(new))["logits"], outputs(as_raw(B))["logits"]) <= TOL
    assert _digest(B) == before
    monkeypatch.setattr(_hf_shell, "_PREPARED_AGAIN", frozenset())  # the negative: the template's closures are reached
    monkeypatch.setattr(_hf_shell, "_TEMPLATES", OrderedDict())
    assert _hf_shell.shell(B, F64) is None
