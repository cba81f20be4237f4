"""``wb.hook_names``: every capturable name of a model, with aliases and which names fire."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .._repr import html_table
from ..models import unrunnable_explained
from ._points import container_reason, hook_points


class HookNames(list):
    """The canonical hook names of a model (a ``list`` of str), plus what a researcher needs to use them.

    Attributes:
        aliases: ``{alias: canonical}`` — other names of the same activation
            (``"blocks.0.hook_in" → "blocks.0.hook_resid_pre"``); every alias is accepted by the verbs.
        unfired: ``{name: reason}`` for names that do not fire on a default forward pass (e.g.
            ``"fires only with model.cfg.use_attn_result=True"``); None when unknown (a plain module
            with no ``example`` given).
        family: ``"module"`` (``named_modules()`` paths) or ``"transformer_lens"``.
    """

    def __init__(self, names, aliases: dict, unfired: Optional[dict], family: str):
        super().__init__(names)
        self.aliases = dict(aliases)
        self.unfired = None if unfired is None else dict(unfired)
        self.family = family

    @property
    def firing(self) -> list[str]:
        """The names that fire on a default forward (all of them when that is unknown)."""
        return [n for n in self if not self.unfired or n not in self.unfired]

    def to_frame(self):
        import pandas as pd

        by_canon: dict[str, list[str]] = {}
        for a, c in self.aliases.items():
            by_canon.setdefault(c, []).append(a)
        rows = [
            (n, ", ".join(by_canon.get(n, [])),
             None if self.unfired is None else n not in self.unfired,
             (self.unfired or {}).get(n, ""))
            for n in self
        ]
        return pd.DataFrame(rows, columns=["name", "aliases", "fires", "note"])

    def __repr__(self) -> str:
        fires = "" if self.unfired is None else f", {len(self.firing)} fire by default"
        return f"HookNames({len(self)} names{fires}, {len(self.aliases)} aliases)"

    def _repr_html_(self) -> str:
        df = self.to_frame()
        return html_table(list(df.columns), df.itertuples(index=False), caption=repr(self))


def hook_names(model: nn.Module, example: Any = None) -> HookNames:
    """Every capturable hook name of ``model``.

    Plain modules: the module paths of ``named_modules()`` (a module registered under two paths gives
    an alias). TransformerLens models: TransformerLens's own hook names; a two-token probe forward
    finds the names that do not fire unless the model is configured for them. For a plain module,
    pass ``example`` (an input) to learn which modules fire.

    Example:
        >>> import torch, workbench as wb
        >>> wb.hook_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        HookNames(2 names, 0 aliases)
    """
    points = hook_points(model, probe=True)
    unfired = points.unfired
    if example is not None:
        unfired = _probe(model, points, example)
    return HookNames(points.modules, points.aliases, unfired, points.family)


def _probe(model: nn.Module, points, example) -> dict[str, str]:
    fired: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, a, o: fired.add(id(mod))) for m in points.modules.values()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), unrunnable_explained(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return {n: container_reason(m) or "not called on the example input"
            for n, m in points.modules.items() if id(m) not in fired}
