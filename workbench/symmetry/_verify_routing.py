"""verify and top-k routing: a mixture of experts' choice made at a tie within rounding.

A router picks each token's k experts by the top k of its probabilities (``MixtralTopKRouter`` and the other
Hugging Face ``…TopKRouter`` modules: ``(logits, scores, indices)``). The choice is a discontinuous function of the
logits: where the k-th and the (k+1)-th logits are equal, or closer than the rounding by which a transform's
arithmetic changes them (a stream element's rows summed in another order, a float32 softmax of float64 logits), the
transformed model may choose the other expert. That is the same function evaluated on the other side of its
discontinuity, but it changes the token's output by the difference of the two experts (0.16-0.20 relative on a float32
Mixtral with two tied router rows, 5 of 6 exact transforms FAILed, measured) and, through attention, every later
position's. Both choices are correct evaluations of the original model, so verify evaluates the original with the new model's
choice at such a tie (in the original's labels, through the transform's experts' order), runs both models again, and
reports how many choices it made so (``InvarianceReport.routing_ties``). Not the other way round: making the new model
choose as the original would never run the expert it chose, and a wrong expert there (one that only ever wins at ties,
as the twin of a duplicated router row does) would pass unseen. A token's choice counts as a tie only when

- the new router's logits at that token agree with the original's moved by the experts' order within 10× the dtype's
  tolerance, float32's at least (``TIE_MARGIN``, ``ROUTER_TOL``; relative to the token's largest |logit|): the router
  read the same stream up to rounding, so the transform is right up to that token; and
- every expert the new model dropped or added is within ``2δ + 8·eps32·s`` of the other's logit (δ: the token's largest
  logit difference, s: its largest |logit|, eps32: float32's, the precision of every such router's softmax): only
  such a pair can change order under a difference of δ and the softmax's rounding.

Any other difference in the chosen experts is left to the comparison, which then FAILs. Forcing keeps the original
router's own weights (scores) for the positions it changes: at a tie they equal the other expert's within the same
rounding.
A floor is measured by running the model again (its float32 outputs against a float64 copy's, or its float32 parts
rounded): a run that chose another expert at a near tie measured the two experts' difference, a tolerance of ~1 that
passed a stream rotation. Every such run now makes every choice the compared run made (``following``), so a floor is the
rounding of one function.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

#: rounds of "force the ties found, run the new model again": a forced choice moves later tokens back by rounding only,
#: so a second round is needed only where that rounding meets another tie
MAX_ROUNDS = 3

_EPS32 = torch.finfo(torch.float32).eps

#: how far (in units of the dtype's tolerance, relative to the token's largest |logit|) the new router's logits may be
#: from the original's for a flip there to count as rounding: the margin verify gives a measured floor (10×), since the
#: floor itself is measured only after these forwards. Measured: a float32 OLMoE's router logits, two layers deep,
#: 1.2e-5 off at a tie, against a tolerance of 1e-5; a transform that moves the stream is ~1e-1 off there.
TIE_MARGIN = 10
#: the tolerance a router's logits are held to at least, whatever the model's dtype: every such router chooses on float32
#: probabilities, and a float64 model's norms compute in float32 too (its routers' logits 1e-7 apart at ties, measured
#: on a float64 Mixtral, where verify in float64 FAILed every exact transform of a tied model before)
ROUTER_TOL = 1e-5


def _parts(output) -> Optional[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(position of the indices, logits, indices)`` of a router's output ``(logits, scores, indices)``; None for any
    other output."""
    if not isinstance(output, (tuple, list)) or len(output) < 2:
        return None
    logits = output[0]
    where = next((i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and not t.is_floating_point()
                  and not t.is_complex() and t.ndim == 2), None)
    if where is None or not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        return None
    return where, logits, output[where]


class Choices:
    """Forward hooks on routers (``[(experts-order site, router module), ...]``) while the block runs: ``seen[(site,
    call)] = (logits, indices)`` of each call (after forcing; calls counted per number of tokens), and the choices in
    ``force`` (``{(site, call): (tokens, indices, tokens in that call)}``) written over the router's own before the
    experts read them, in calls of that size only."""

    def __init__(self, routers: list, force: Optional[dict] = None):
        self.routers, self.force = routers, force or {}
        self.seen: dict = {}
        self._handles: list = []

    def __enter__(self) -> "Choices":
        try:
            for site, module in self.routers:
                # first of the module's hooks: Hugging Face's output recorder (router_logits, read by its aux_loss) sees
                # the forced output (_as_chosen)
                self._handles.append(module.register_forward_hook(self._hook(site), prepend=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, site: str):
        calls: dict[int, int] = {}  # tokens -> calls seen with that many: a measurement's probe on fewer rows (the
        # bridge floor's one-row look at its attention pattern) is another count, and is neither forced nor a key's

        def hook(module, args, output):
            parts = _parts(output)
            if parts is None:
                return None
            where, logits, indices = parts
            n = indices.shape[0]
            call = calls[n] = calls.get(n, -1) + 1
            forced = self.force.get((site, call))
            if forced is not None and forced[2] != n:
                forced = None  # (a call of another size than the one the choices were made on)
            if forced is not None:
                tokens, chosen, _ = forced
                tokens, chosen = tokens.to(indices.device), chosen.to(device=indices.device, dtype=indices.dtype)
                was = indices
                indices = indices.clone()
                indices[tokens] = chosen
                returned = _as_chosen(logits, tokens, was[tokens], chosen)
                output = type(output)([returned, *output[1:where], indices, *output[where + 1:]])
            self.seen[(site, call)] = (logits.detach().clone(), indices.detach().clone())
            return output if forced is not None else None
        return hook


def _as_chosen(logits: torch.Tensor, tokens: torch.Tensor, was: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The router's logits as returned where its choice was forced: at each forced token, every expert chosen in place of
    another takes the larger of the two logits raised by 8 eps(dtype)·max|logit| (the other the smaller), so that
    whatever reads the returned logits chooses the forced experts too. Hugging Face's load-balancing loss (``aux_loss``,
    ``output_router_logits=True``) takes its own top k of these logits: it counted the original's own choice at a tie
    while the experts ran the new model's, and verify FAILed an exact stream symmetry of a float32 Mixtral with one
    router tied within rounding on that loss (0.998 against 1.004, tests/test_verify_adversary2.py). Within a tie the
    two logits are within 2δ + 8·eps32·s (module docstring): a change of rounding's size. The logits recorded for
    :func:`ties` are the router's own."""
    out = logits.clone()
    bump = 8 * torch.finfo(logits.dtype).eps
    for row, t in enumerate(tokens.tolist()):
        old_set, new_set = set(was[row].tolist()), set(chosen[row].tolist())
        dropped, added = sorted(old_set - new_set), sorted(new_set - old_set)
        top = out[t].abs().max()
        for d, a in zip(dropped, added):
            hi, lo = torch.maximum(out[t, d], out[t, a]), torch.minimum(out[t, d], out[t, a])
            out[t, a], out[t, d] = hi + bump * top, lo
    return out


def labels(backend, smap, transform, routers: list) -> dict:
    """Per experts-order site of the transform: ``labels[j]`` = the original's expert at the new model's expert j,
    found by moving index-valued logits as the site moves the router's (the transform's own convention, not assumed)."""
    out = {}
    for site, _ in routers:
        element = transform.elements.get(site)
        if element is None:
            continue
        s = smap[site]
        obs = next(o for o in s.observed)
        index = torch.arange(s.n, dtype=torch.float64)[None]
        moved = backend.observe(s, element, obs, index, site in transform.forced)
        out[site] = moved[0].round().long()
    return out


def ties(old: dict, new: dict, labels: dict, tol: float) -> tuple[dict, int]:
    """The choices to make in the original model, ``{(site, call): (tokens, indices in the original's labels, tokens in
    the call)}``, and how many tokens that is: the tokens whose chosen experts differ (the new model's mapped through
    ``labels``) at a tie within rounding (module docstring), where the original is to choose what the new model chose."""
    force, count = {}, 0
    for key, (logits, chosen) in old.items():
        if key not in new:
            continue
        new_logits, new_chosen = new[key]
        if chosen.shape != new_chosen.shape or logits.shape != new_logits.shape:
            continue
        lab = labels.get(key[0])
        lab = torch.arange(logits.shape[1], device=chosen.device) if lab is None else lab.to(chosen.device)
        mapped = lab[new_chosen]
        differ = (chosen.sort(-1).values != mapped.sort(-1).values).any(-1).nonzero().flatten().tolist()
        if not differ:
            continue
        L, L_new = logits.double(), new_logits.double()
        expected = L[:, lab]  # the new model's column j holds the original's column lab[j]
        tokens, rows = [], []
        for t in differ:
            s = L[t].abs().max().item()
            delta = (L_new[t] - expected[t]).abs().max().item()
            if not delta <= TIE_MARGIN * max(tol, ROUTER_TOL) * max(s, torch.finfo(torch.float64).tiny):
                continue  # the router read another stream there: not rounding (the comparison FAILs)
            was, now = set(chosen[t].tolist()), set(mapped[t].tolist())
            dropped, added = sorted(was - now), sorted(now - was)
            slack = 2 * delta + 8 * _EPS32 * s
            if not all(abs(L[t, e].item() - L[t, f].item()) <= slack for e in dropped for f in added):
                continue
            row = chosen[t].clone()
            extra = iter(added)
            for pos in range(len(row)):
                if row[pos].item() not in now:
                    row[pos] = next(extra)
            tokens.append(t)
            rows.append(row)
        if tokens:
            force[key] = (torch.tensor(tokens), torch.stack(rows), len(chosen))
            count += len(tokens)
    return force, count


def following(seen: dict):
    """``choose(model, run)``: ``run()`` with ``model``'s routers making every choice ``seen`` recorded (each call's every
    token), for a run that must route as that one did: a floor's copy of the model (``_verify_floor._own_rounding``),
    the float64 branch's rounded run of the original."""
    force = {key: (torch.arange(len(chosen)), chosen, len(chosen)) for key, (_, chosen) in seen.items()}

    def choose(model: nn.Module, run):
        with Choices(routers_of(model), force):
            return run()
    return choose


def merged(force: dict, more: dict) -> dict:
    """``force`` with the choices of ``more`` added (a later round's ties: other tokens of the same calls)."""
    out = dict(force)
    for key, (tokens, rows, n) in more.items():
        if key in out:
            tokens, rows = torch.cat([out[key][0], tokens]), torch.cat([out[key][1], rows])
        out[key] = (tokens, rows, n)
    return out


def routers_of(model: nn.Module) -> list:
    """``[(experts-order site name, router module), ...]`` of a Hugging Face mixture of experts read through the
    layout (raw, or in a TransformerLens bridge, whose router wrapper returns the router's output); [] otherwise."""
    from .._errors import UnsupportedModelError
    from ..models import ModelKind, has_layout, hf, model_kind

    if model_kind(model) not in (ModelKind.HF, ModelKind.HF_BRIDGE) or not has_layout(model):  # (a traced CNN: no layout)
        return []
    try:
        paths = hf.layout(model).paths
    except UnsupportedModelError:
        return []
    root = hf.hf_model(model)
    out = []
    for key, path in paths.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2:] == ["mlp", "router"]:
            out.append((f"blocks.{parts[1]}.mlp.experts", root.get_submodule(path)))
    return out
