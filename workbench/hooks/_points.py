"""Hook points of a model: which names can be captured, what module each lives on, which are aliases.

One naming scheme per model family, never a third: a plain ``nn.Module`` is named by the module paths
of ``named_modules()``; a TransformerLens model (``TransformerBridge`` in 4.x, ``HookedTransformer`` in
3.x) by TransformerLens's own hook names.
"""
from __future__ import annotations

import fnmatch
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Pattern, Sequence, Union

import torch
from torch import nn

from .._errors import InvalidOptionError, UnknownNameError, nearest
from ..models import hf_build, is_transformer_lens

NameFilter = Union[None, str, Pattern, Callable[[str], bool], Sequence[Union[str, Pattern, Callable]]]

# TransformerLens flags that switch hook points on, keyed by the end of the hook name. Both 3.x and
# the 4.x bridge gate the same hooks behind the same config flags.
_GATES = (
    ("attn.hook_result", "use_attn_result"),
    ("hook_q_input", "use_split_qkv_input"),
    ("hook_k_input", "use_split_qkv_input"),
    ("hook_v_input", "use_split_qkv_input"),
    ("mlp_in", "use_hook_mlp_in"),
    ("attn_in", "use_attn_in"),
    ("hook_tokens", "use_hook_tokens"),
)
_GLOB_CHARS = set("*?[")


@dataclass
class HookPoints:
    """The capturable places of one model.

    ``modules`` maps each canonical hook name to the module whose forward output is the activation;
    ``aliases`` maps every other name of the same module to its canonical name; ``unfired`` maps
    names known not to fire on a default forward to the reason (``None`` when not probed).
    """

    family: str  # "module" or "transformer_lens"
    modules: dict[str, nn.Module]
    aliases: dict[str, str] = field(default_factory=dict)
    unfired: Optional[dict[str, str]] = None
    probed: bool = False

    @property
    def all_names(self) -> list[str]:
        return list(self.modules) + list(self.aliases)

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    # ------------------------------------------------------------------ name filters
    def resolve(self, names: NameFilter, *, param: str = "names") -> list[str]:
        """The hook names selected by a filter, in model order, aliases kept only where asked for.

        ``names`` is None (every canonical name), an exact name, a glob pattern, a compiled regex
        (``search`` semantics), a callable ``name -> bool``, or a list mixing them. An exact name or a
        pattern that selects nothing raises :class:`UnknownNameError` with the nearest valid names.
        """
        return self.resolve_with_matches(names, param=param)[0]

    def resolve_with_matches(self, names: NameFilter, *, param: str = "names") -> tuple[list[str], Optional[list[str]]]:
        """``(resolve(names), every name the filter matched, aliases included)``; the second is None for
        ``names=None`` (everything). A capture lists the matched aliases, as TransformerLens's cache does."""
        if names is None:
            return list(self.modules), None
        items = _items(names)
        if not items:
            raise UnknownNameError(f"{param}=[] selects no hook name; pass None to select every name.")
        chosen = list(dict.fromkeys(n for item in items for n in self._match(item, param)))  # ordered, no repeats
        # An alias picked up by a pattern is dropped when its canonical name was picked too.
        canon_chosen = {n for n in chosen if n in self.modules}
        exact = self.exact_names(items)
        kept = [n for n in chosen if n in self.modules or n in exact or self.aliases[n] not in canon_chosen]
        return kept, chosen

    def is_exact(self, item) -> bool:
        """Whether ``item`` is an exact hook name (not a pattern): a string without glob characters, or the name of a
        hook point itself (``ModuleDict`` keys may hold ``[``, ``*`` or ``?``: ``"heads.a[1]"`` names that module, never
        the glob that would match ``"heads.a1"``)."""
        return isinstance(item, str) and (item in self.modules or item in self.aliases or not (_GLOB_CHARS & set(item)))

    def exact_names(self, names: NameFilter) -> set[str]:
        """The exact hook names a filter holds (:meth:`is_exact`), not its patterns."""
        return {i for i in _items(names) if self.is_exact(i)}

    def _match(self, item, param: str) -> list[str]:
        every = self.all_names
        if isinstance(item, str):
            if item in self.modules or item in self.aliases:
                return [item]
            if _GLOB_CHARS & set(item):
                hits = [n for n in every if fnmatch.fnmatchcase(n, item)]
                kind = "glob pattern"
            else:
                raise UnknownNameError(self._unknown_message(item, param, "name"))
        elif isinstance(item, re.Pattern):
            hits = [n for n in every if item.search(n)]
            kind = "regex"
        elif callable(item):
            hits = [n for n in every if item(n)]
            kind = "filter function"
        else:
            raise UnknownNameError(
                f"{param} takes hook names, glob patterns, compiled regexes or callables; "
                f"got {type(item).__name__} {item!r}."
            )
        if not hits:
            shown = getattr(item, "pattern", None) or getattr(item, "__name__", None) or str(item)
            raise UnknownNameError(self._unknown_message(str(shown), param, kind))
        return hits

    def _unknown_message(self, item: str, param: str, kind: str) -> str:
        close = nearest(item, self.all_names)
        hint = f" Nearest valid names: {close}." if close else ""
        return (
            f"{param}: the {kind} {item!r} matches no hook name of this "
            f"{'TransformerLens model' if self.family == 'transformer_lens' else 'model'} "
            f"({len(self.modules)} names; see wb.hook_names(model)).{hint}"
        )


def _items(names: NameFilter) -> list:
    """A name filter's items: a list, tuple or set as its items, anything else as one item."""
    return list(names) if isinstance(names, (list, tuple, set, frozenset)) else [names]


# Hook points depend only on the model's structure; the TransformerLens probe forward is not free,
# so results are memoised per model object, keyed on the module tree: every path with its module (the objects
# alone missed a module re-registered under another name in the same order, and a second name added for one
# already there) and, on a TransformerLens model, the config flags that switch hook points on (which fire).
_MEMO: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, HookPoints]]" = weakref.WeakKeyDictionary()


def hook_points(model: nn.Module, *, probe: bool = True) -> HookPoints:
    """Find the hook points of ``model`` (memoised while its module tree is unchanged)."""
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"expected a torch.nn.Module (a plain module or a TransformerLens model), got {type(model).__name__}.")
    key = tuple((n, id(m)) for n, m in model.named_modules(remove_duplicate=False))
    if is_transformer_lens(model):
        cfg = getattr(model, "cfg", None)
        key += tuple(getattr(cfg, flag, None) for _, flag in _GATES)
    hit = _MEMO.get(model)
    if hit is not None and hit[0] == key and (hit[1].probed or not probe):
        return hit[1]
    points = _transformer_lens_points(model, probe) if is_transformer_lens(model) else _module_points(model)
    _MEMO[model] = (key, points)
    return points


def _group_by_module(named: Iterable[tuple[str, nn.Module]], prefer=lambda name: False) -> tuple[dict, dict]:
    """Split names into canonical ones (one per module object) and aliases of them.

    The canonical name of a module is its first name for which ``prefer`` holds, else its first name.
    """
    by_module: dict[int, list[str]] = {}
    objects: dict[int, nn.Module] = {}
    for name, mod in named:
        by_module.setdefault(id(mod), []).append(name)
        objects[id(mod)] = mod
    modules: dict[str, nn.Module] = {}
    aliases: dict[str, str] = {}
    for key, names in by_module.items():
        canon = next((n for n in names if prefer(n)), names[0])
        modules[canon] = objects[key]
        aliases.update({n: canon for n in names if n != canon})
    return modules, aliases


def _module_points(model: nn.Module) -> HookPoints:
    # remove_duplicate=False: a module registered under two paths (tied or shared) gets both names.
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
    modules, aliases = _group_by_module(named)
    return HookPoints("module", modules, aliases, unfired=None)


def _transformer_lens_points(model: nn.Module, probe: bool) -> HookPoints:
    # TransformerLens's classic names (hook_resid_pre over the bridge's hook_in) are canonical: they
    # are the names researchers know and the ones HookedTransformer 3.x uses.
    modules, aliases = _group_by_module(model.hook_dict.items(), prefer=_is_classic)
    unfired = _probe_transformer_lens(model, modules) if probe else None
    return HookPoints("transformer_lens", modules, aliases, unfired, probed=probe)


_CLASSIC = re.compile(r"(^|\.)hook_(embed|pos_embed|resid_pre|resid_mid|resid_post|attn_out|mlp_out|q|k|v|z|pattern|attn_scores)$")


def _is_classic(name: str) -> bool:
    return bool(_CLASSIC.search(name))


def gate_reason(model: nn.Module, name: str) -> Optional[str]:
    """The TransformerLens config flag that must be True for ``name`` to fire, if any is off."""
    cfg = getattr(model, "cfg", None)
    for suffix, flag in _GATES:
        if name.endswith(suffix) and not getattr(cfg, flag, True):
            return f"fires only with model.cfg.{flag}=True"
    return None


def unfired_reason(model: nn.Module, name: str, points: HookPoints) -> str:
    """Why a requested hook name of ``model`` (whose places are ``points``) got no call during a forward that ran."""
    module = points.modules.get(points.canonical(name))
    return gate_reason(model, name) or container_reason(module) or "its module was not called during the forward pass"


def container_reason(module: Optional[nn.Module]) -> Optional[str]:
    """Why a module with no forward of its own never fires (``ModuleList``, ``ModuleDict``, ``ParameterList``,
    ``ParameterDict``: ``named_modules()`` lists them, so their paths are hook names), or None."""
    if module is None or type(module).forward is not nn.Module.forward:
        return None
    held = ("the modules that read its parameters" if isinstance(module, (nn.ParameterList, nn.ParameterDict))
            else "the modules it holds")
    return f"it is a {type(module).__name__}, a container with no forward of its own, so it never fires; capture {held}"


def _probe_transformer_lens(model: nn.Module, modules: dict[str, nn.Module]) -> Optional[dict[str, str]]:
    """Run a two-token forward to learn which hook points fire by default."""
    fired: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, a, o: fired.add(id(mod))) for m in modules.values()]
    try:
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", 2) or 2
        tokens = torch.zeros((1, min(2, n_ctx)), dtype=torch.long, device=_device_of(model))
        with torch.no_grad(), torch.random.fork_rng(devices=[]), hf_build.rope_state_kept(model):
            model(tokens)  # (a dynamic rotary embedding's growth kept)
    except Exception:  # a model we cannot probe still gets its names; which fire stays unknown
        return None
    finally:
        for h in handles:
            h.remove()
    return {
        name: gate_reason(model, name) or "did not fire on a default forward pass"
        for name, mod in modules.items()
        if id(mod) not in fired
    }


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
