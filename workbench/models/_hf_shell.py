"""A transform's new bridge around a Hugging Face model: a deep copy of a never-run template, not a boot.

Booting a ``TransformerBridge`` costs 1.5-2 deep copies of the whole bridge in CPU time even with the
work ``_hf_build.boot`` skips (two scans of every attribute of ~600 modules for hook points, the adapter's
block templates deep-copied per layer, ``train()`` over both trees: 80-150 ms at 40-55M parameters). A transform's new bridge differs from a boot around the pushed weights only in its
weights, so it is built like native bridges are (``_layout._TEMPLATES``): a *template* is booted once per
(class, config, dtype, model name, training mode) around a blank model, never run and never handed out,
its parameters then meta tensors; a new bridge is ``copy.deepcopy(template)`` with fresh uninitialised
parameters in the memo (the caller writes every one through ``canonical_views``), the model's own
buffers copied in as ``_hf_build.blank`` copies them, and the model's tokenizer configured as a boot would.

A bridge that has run is never copied: its hooks may be closures over its own hook points. The template
is copied only where the copy provably is a boot's equal sharing nothing with it; otherwise
:func:`shell` gives None and the caller boots:

- the template has no hooks but the placeholder MLP mirrors TransformerLens wires at boot (OPT's fc-split MLP,
  BERT's: ``blocks.{i}.mlp.hook_in``/``hook_out`` fired from ``fc1``/``fc2``'s hook points by permanent hooks,
  closures over the template's own components). Those are taken off the template and wired again on every
  copy by TransformerLens's own ``_wire_symbolic_hooks``, over the copy's components: any other hook (or a
  wire that is not exactly one of those) and the family is booted;
- every parameter is a Hugging Face parameter the layout reaches, or a fused q/k/v's split q, k, v (GPT-2,
  GPT-NeoX, BLOOM: its attention a subclass, accepted only as read, ``_split_classes``), which a boot derives
  from the pushed weights (views of GPT-2's ``c_attn``, copies of GPT-NeoX's and BLOOM's interleaved
  ``query_key_value``). A copy's split q, k, v are meta tensors until :func:`finish` runs the copy's own split
  function over its pushed fused weights, as a boot does (an unfinished copy fails loudly); the split function,
  which TransformerLens's ``JointQKVAttentionBridge.__deepcopy__`` shares, is re-bound to the copy's own adapter
  or attention (it would otherwise reach the template's);
- a trial copy, its mirrors wired and its split q, k, v derived, reaches no object of the template.
  ``copy.deepcopy`` shares what it treats as atomic — functions and their closures, weak references, bound
  built-in methods — so the check follows those on the copy too.
tests/test_hf_bridge_shell.py runs a bridge with hooks and a cache, transforms it and checks the new
bridge and the original against each other and against a plain boot, in float64;
tests/test_hf_bridge_shell_families.py does so for OPT, BERT, GPT-2, GPT-NeoX and BLOOM, checking the copy's hook
points (q, k, v, z, the mirrored MLP output) against the pushed weights directly.
"""
from __future__ import annotations

import enum
import gc
import types
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from .._errors import UnsupportedModelError
from ._quiet_build import as_template, fresh_copy

# Templates per key (see the module docstring); None records a configuration that is booted instead.
_TEMPLATES: "OrderedDict[tuple, object]" = OrderedDict()
_KEPT = 4
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def shell(model: nn.Module, dtype: torch.dtype) -> Optional[nn.Module]:
    """A bridge like ``model`` (a bridge around a Hugging Face model) in ``dtype`` whose parameters are
    uninitialised and its own, or None where a template cannot be copied safely (boot instead)."""
    from . import _hf

    key = _hf.config_key(model) + (str(dtype), str(model.cfg.model_name), bool(model.training))
    if key in _TEMPLATES:
        _TEMPLATES.move_to_end(key)
        entry = _TEMPLATES[key]
    else:
        entry = _TEMPLATES[key] = _template(model, dtype)
        while len(_TEMPLATES) > _KEPT:
            _TEMPLATES.popitem(last=False)
    return None if entry is None else _copy(entry, model)


def _params(bridge: nn.Module):
    """Every module of the bridge and of its Hugging Face model (not all of which the bridge's tree holds)."""
    seen = {}
    for root in (bridge, bridge.original_model):
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


def _template(model: nn.Module, dtype: torch.dtype):
    """``(template, devices, mirrored placeholders' names, split attentions' names, every split attention the
    template reaches, its modules)`` or None (see the module docstring)."""
    from . import _hf_build

    try:  # TransformerLens 4.x's boot, whose pieces this module reads; 3.9's early bridge is booted
        from transformer_lens.model_bridge.sources._bridge_builder import configure_tokenizer  # noqa: F401
    except ImportError:
        return None
    fresh = _hf_build.blank(model, dtype)
    T = _hf_build.boot(str(model.cfg.model_name), fresh, _hf_build.configured(model.tokenizer))
    modules = _params(T)
    wired = _unwire(T, modules)
    if wired is None:
        return None
    splits = {n: m for n, m in T.named_modules() if type(m) in _split_classes()}
    split = {id(p) for m in splits.values() for b in (m.q, m.k, m.v) for p in b.original_component.parameters()}
    if any(id(p) not in split for _, p in _derived(T)):
        return None
    # Every split attention the bridge reaches, the adapter's own block templates too: a deep copy of any of them
    # keeps the template's split function (see ``_copy``).
    classes = _split_classes()
    splitters = [o for o in _reach(T).values() if classes and isinstance(o, classes[0])]
    if any(type(o) not in classes or _split_fn(o) is None for o in splitters):
        return None
    T, devices = as_template(T, modules)  # meta parameters: any reference a copy kept to one would fail loudly
    entry = (T, devices, tuple(wired), tuple(splits), tuple(splitters), tuple(modules))
    trial = finish(_copy(entry, model))  # (its config's weak reference to its bridge must name the copy)
    ref = getattr(trial.cfg, "_bridge_ref", None)
    if _reaches(trial, T) or _tokenizers(trial) != {id(trial.tokenizer)} or (ref is not None and ref() is not trial):
        return None
    return entry


def _unwire(T: nn.Module, modules: list) -> Optional[list[str]]:
    """Names of the placeholder bridges of ``T`` whose hook_in/hook_out the boot mirrors from their ``in``/``out``
    subcomponents (``component_setup._wire_symbolic_hooks``), those wires taken off ``T``; None where ``T``
    carries a hook that is not exactly one such wire or a split attention's own state-dict hooks (which a deep
    copy carries correctly: a static method, and a ``_WrappedHook`` whose weak reference its pickling state
    re-makes to the copy), so the boot stays."""
    try:
        from transformer_lens.model_bridge.component_setup import _wire_symbolic_hooks
    except ImportError:  # another TransformerLens: nothing here is known to be a wire
        return [] if not any(_foreign(m, d) for m in modules for d in _HOOK_DICTS) else None
    codes = {c for c in _wire_symbolic_hooks.__code__.co_consts if isinstance(c, types.CodeType)}
    wired = [(n, m) for n, m in T.named_modules() if m.__dict__.get("_placeholder_hooks_wired")]
    expected = {}  # id of a hook point -> the placeholder whose wire it carries
    for _, m in wired:
        for key, point in (("in", "hook_in"), ("out", "hook_out")):
            if m.submodules.get(key) is not None:
                expected[id(getattr(m.submodules[key], point))] = m
    found = set()
    for m in modules:
        for d in _HOOK_DICTS:
            hooks = getattr(m, d, None)
            if not hooks or not _foreign(m, d):
                continue
            handles = getattr(m, "fwd_hooks", [])
            if (d != "_forward_hooks" or id(m) not in expected or len(hooks) != 1 or len(handles) != 1
                    or getattr(m, "bwd_hooks", None) or not _is_wire(handles[0], codes, expected[id(m)])):
                return None
            found.add(id(m))
    if found != set(expected):
        return None
    for m in modules:
        if id(m) in found:
            m.remove_hooks("fwd", including_permanent=True)
    for _, m in wired:
        object.__setattr__(m, "_placeholder_hooks_wired", False)  # as TransformerLens sets it
    return [n for n, _ in wired]


def _foreign(m: nn.Module, d: str) -> bool:
    """Whether the hook dict ``d`` of ``m`` holds anything but a split attention's own state-dict hooks."""
    hooks = getattr(m, d, None)
    if not hooks:
        return False
    if type(m) not in _split_classes() or len(hooks) != 1:
        return True
    (hook,) = hooks.values()
    if d == "_state_dict_hooks":
        return hook is not _split_classes()[0]._filter_qkv_state_dict
    if d == "_load_state_dict_pre_hooks":
        return not (getattr(hook, "hook", None) is _split_classes()[0]._restore_filtered_qkv_state_dict
                    and getattr(hook, "module", lambda: None)() is m)
    return True


def _is_wire(handle, codes: set, placeholder: nn.Module) -> bool:
    """Whether a TransformerLens hook handle is a permanent ``_wire_symbolic_hooks`` mirror of ``placeholder``."""
    fn = getattr(handle, "user_hook", None)
    cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or () if _filled(c)]
    return bool(handle.is_permanent) and getattr(fn, "__code__", None) in codes and cells == [placeholder]


# What TransformerLens 4.x's BloomAttentionBridge defines itself: an ``__init__`` that only calls its parent's
# (JointQKVAttentionBridge's) with the parent's defaults, and forward-time code (the ALiBi bias and the mask come in
# per call from the block; ``set_processed_weights`` is weight processing, which no boot runs). It inherits the
# boot-time split (``set_original_component``) and ``__deepcopy__``, so its state is the parent's.
_BLOOM_READ = frozenset({"__module__", "__doc__", "__init__", "forward", "_reconstruct_attention",
                         "set_processed_weights"})


def _split_classes() -> tuple:
    """The fused-q/k/v attention bridges whose boot-time split this module re-derives (read in TransformerLens
    4.x: the split q, k, v are the only state the boot derives from the weights), the parent first. Other subclasses
    are booted; BLOOM's is accepted only as read (``_BLOOM_READ``): one that defines anything more, names anything
    but ``super().__init__`` in its ``__init__`` (an attribute it sets) or derives from another class is booted."""
    try:
        from transformer_lens.model_bridge.generalized_components import (JointQKVAttentionBridge,
                                                                          JointQKVPositionEmbeddingsAttentionBridge)
    except ImportError:
        return ()
    classes = (JointQKVAttentionBridge, JointQKVPositionEmbeddingsAttentionBridge)
    try:
        from transformer_lens.model_bridge.generalized_components import BloomAttentionBridge as bloom
    except ImportError:
        return classes
    read = (bloom.__bases__ == (JointQKVAttentionBridge,) and set(vars(bloom)) == _BLOOM_READ
            and bloom.__init__.__code__.co_names == ("super", "__init__"))
    return classes + (bloom,) if read else classes


def _split_fn(attn: nn.Module):
    """The attention's split function as a bound method (of its adapter, or of an attention bridge), else None."""
    fn = getattr(attn, "split_qkv_matrix", None)
    return fn if isinstance(fn, types.MethodType) else None


def finish(new: nn.Module) -> nn.Module:
    """``new`` (a copy from :func:`shell` whose Hugging Face weights are written) with each fused q/k/v's split
    q, k, v derived from those weights by the copy's own split function, as a boot derives them (GPT-2: views
    of ``c_attn``; GPT-NeoX: copies). Anything else is returned as it is."""
    from ._kind import ModelKind, model_kind
    from ._quiet_build import _no_random_init

    if model_kind(new) != ModelKind.HF_BRIDGE:
        return new
    classes = _split_classes()
    for attn in new.modules():
        if type(attn) not in classes or not attn.q.original_component.weight.is_meta:
            continue
        with _no_random_init():  # the split builds nn.Linear layers whose initialisation it replaces at once
            made = attn.split_qkv_matrix(attn.original_component)
        for bridge, linear in zip((attn.q, attn.k, attn.v), made):
            own = bridge.original_component
            if set(own._parameters) != set(linear._parameters):
                raise UnsupportedModelError(
                    f"the installed TransformerLens's split of {type(attn).__name__} gives parameters "
                    f"{sorted(linear._parameters)} where the bridge's copy has {sorted(own._parameters)}: a copied "
                    f"bridge cannot be finished; its q, k and v must carry the same parameters as after a boot")
            own._parameters.update(linear._parameters)
    return new


def derived(bridge: nn.Module) -> list[str]:
    """Parameters of ``bridge`` that are not the Hugging Face parameters its layout reaches (which the
    transform writes): tensors derived from the weights at boot, such as a fused q/k/v's split copies
    or views. A copy would leave them unwritten, so a template with any but the split q, k, v that
    :func:`finish` re-derives is not copied."""
    return [name for name, _ in _derived(bridge)]


def _derived(bridge: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """:func:`derived`'s parameters, each with its name."""
    from . import _hf

    names = {e.param for e in _hf.layout(bridge).entries}
    own = {id(p) for k, p in bridge.original_model.named_parameters(remove_duplicate=False)
           if k.replace("._original_component", "") in names}
    out = []
    for m in _params(bridge):
        out += [(f"{type(m).__name__}.{k}", p) for k, p in m._parameters.items() if p is not None and id(p) not in own]
    return out


# Families whose adapter's ``prepare_model`` sets each module's ``forward`` to a closure over that module (Falcon's: its
# linear layers and decoder layers, to avoid in-place ops under backward hooks). A deep copy keeps those closures, so
# the copy would compute with the template's modules; the adapter's own ``prepare_model`` is run again on the copy's
# Hugging Face model, which binds them to the copy's (what a boot does). ``_template``'s trial still refuses a copy
# that reaches any object of the template.
_PREPARED_AGAIN = frozenset({"falcon"})


def _copy(entry, model: nn.Module) -> nn.Module:
    from . import _hf, _hf_build
    from transformer_lens.model_bridge.sources._bridge_builder import configure_tokenizer

    T, devices, wired, splits, splitters, modules = entry
    memo = {}
    if T.tokenizer is not None:  # the model's tokenizer, configured as a boot configures it (cfg's BOS flags)
        memo[id(T.tokenizer)] = configure_tokenizer(_hf_build.configured(model.tokenizer), T.cfg)
    for name in splits:  # split q, k, v: meta until ``finish`` derives them from the written weights
        attn = T.get_submodule(name)
        for p in (p for b in (attn.q, attn.k, attn.v) for p in b.original_component.parameters()):
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
    copies = {}
    new = fresh_copy(T, devices, modules, memo, copies=copies)
    for o in splitters:  # JointQKVAttentionBridge.__deepcopy__ shares the split function: bind it to the copy's own
        fn = _split_fn(o)  # (its adapter's, or its block template's; one the copy does not hold stays shared and
        if id(o) in copies:  # ``_template``'s trial finds it)
            copies[id(o)].split_qkv_matrix = types.MethodType(fn.__func__, copies.get(id(fn.__self__), fn.__self__))
    if wired:
        from transformer_lens.model_bridge.component_setup import _wire_symbolic_hooks

        for name in wired:  # the boot's placeholder mirrors, over the copy's own components
            _wire_symbolic_hooks(new.get_submodule(name))
    if _hf.hf_model(model).config.model_type in _PREPARED_AGAIN:  # the adapter's patched forwards, over the copy's modules
        new.adapter.prepare_model(new.original_model)
    buffers = {k.replace("._original_component", ""): b for k, b in _hf.hf_model(model).named_buffers()}
    with torch.no_grad():  # the model's own buffers, as ``_hf_build.blank`` copies them
        for name, b in new.original_model.named_buffers():
            own = buffers.get(name.replace("._original_component", ""))
            if own is not None and own.shape == b.shape:
                b.copy_(own)
    _hf_build.copy_rope_state(_hf.hf_model(model), new.original_model)  # and a dynamic rotary embedding's state beside them
    return new


_ATOMIC = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType, types.CodeType, torch.dtype,
           torch.device, torch.layout, torch.memory_format)


def _reach(root) -> dict[int, object]:
    """Every object reachable from ``root``, following what ``copy.deepcopy`` shares rather than copies:
    function closures and defaults, weak references' referents, built-in methods' ``__self__``."""
    seen, todo = {}, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen[id(obj)] = obj
        if isinstance(obj, types.FunctionType):
            todo += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            todo += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        elif isinstance(obj, weakref.ref):
            target = obj()
            if target is not None:
                todo.append(target)
        elif isinstance(obj, types.BuiltinMethodType):
            todo.append(obj.__self__)
        else:
            todo += gc.get_referents(obj)
    return seen


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _reaches(new: nn.Module, T: nn.Module) -> bool:
    """Whether ``new`` reaches any object of the template ``T`` (shared functions are fine: their
    closures are followed)."""
    own = _reach(T)
    for i in _reach(T.tokenizer) if T.tokenizer is not None else ():  # the user's tokenizer's state: a shallow
        own.pop(i, None)  # copy of it is what a boot gets too (``_hf_build.configured``)
    return any(i in own and not _immutable(o) for i, o in _reach(new).items())


def _immutable(o) -> bool:
    """What ``copy.deepcopy`` may share because nothing can change it: functions (their closures are
    followed by ``_reach``), descriptors, and tuples and frozensets of immutable things."""
    if isinstance(o, (tuple, frozenset)):
        return all(isinstance(x, _ATOMIC) or _immutable(x) for x in o)
    return isinstance(o, _ATOMIC + (enum.Enum, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                                    types.WrapperDescriptorType, types.GetSetDescriptorType, property))


def _tokenizers(bridge: nn.Module) -> set[int]:
    """Ids of the tokenizers the bridge and its driver hold."""
    out = {id(bridge.tokenizer)}
    driver = getattr(bridge, "_driver", None)
    if getattr(driver, "tokenizer", None) is not None:
        out.add(id(driver.tokenizer))
    return out
