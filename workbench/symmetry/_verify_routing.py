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
A load-balancing loss (Hugging Face's ``aux_loss``, ``output_router_logits=True``) makes a second choice of its own: the
top k of the softmax of the router's returned logits in their own dtype (``counted``), while the router chose on float32
probabilities. In a float32 model the two are the same computation; in a float64 model they are not, and at a tie the
router may run one expert while the loss counts the other (a float64 Mixtral: the new model's router ran expert 1 where
its loss counted expert 0, logits 3.5e-8 apart). That choice is a tie of its own, found and made the same way: where
the two models' counted experts differ at a tie within rounding, the original's returned logits are moved by rounding's
size so that its loss counts what the new model's counted (``_counting``), whichever expert either router ran.
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
#: the key suffix of a call's counted choices in a ``force`` dict (``(site, call, COUNTED)``; a router's: ``(site, call)``)
COUNTED = "counted"


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
    call)] = (logits, indices, counted)`` of each call (the router's own logits; its indices after forcing; the experts a
    load-balancing loss counts from the logits as returned, :func:`counted`; calls counted per number of tokens). The
    choices in ``force`` are made in calls of the size they were found in only: ``force[(site, call)] = (tokens, indices,
    tokens in that call)`` written over the router's own indices before the experts read them, and ``force[(site, call,
    COUNTED)]`` (the same form) the experts the returned logits' top k must count at those tokens (:func:`_counting`)."""

    def __init__(self, routers: list, force: Optional[dict] = None):
        self.routers, self.force = routers, force or {}
        self.seen: dict = {}
        self._handles: list = []

    def __enter__(self) -> "Choices":
        try:
            for site, module in self.routers:
                # first of the module's hooks: Hugging Face's output recorder (router_logits, read by its aux_loss) sees
                # the returned logits as made to count (_counting)
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

        def made(key, n: int):
            forced = self.force.get(key)
            return None if forced is None or forced[2] != n else forced  # (a call of another size: not this one's)

        def hook(module, args, output):
            parts = _parts(output)
            if parts is None:
                return None
            where, logits, indices = parts
            n = indices.shape[0]
            call = calls[n] = calls.get(n, -1) + 1
            forced, counting = made((site, call), n), made((site, call, COUNTED), n)
            returned = logits
            if forced is not None:
                tokens, chosen, _ = forced
                indices = indices.clone()
                indices[tokens.to(indices.device)] = chosen.to(device=indices.device, dtype=indices.dtype)
            if counting is not None:
                returned = _counting(logits, counting[0], counting[1])
            self.seen[(site, call)] = (logits.detach().clone(), indices.detach().clone(),
                                       counted(returned.detach(), indices.shape[1]))
            if forced is None and counting is None:
                return None
            return type(output)([returned, *output[1:where], indices, *output[where + 1:]])
        return hook


def counted(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[tokens, k]``: the experts a load-balancing loss counts for each token from a router's returned logits: the top k
    of their softmax in their own dtype (Hugging Face's ``load_balancing_loss_func``, Mixtral's, OLMoE's, Qwen2-MoE's and
    Qwen3-MoE's alike), not the router's own choice, which it makes on float32 probabilities."""
    return torch.softmax(logits, -1).topk(k, -1).indices


#: doublings of the step by which ``_counting`` moves a logit before it stops (its first step, 8 eps·max(|logit|, 1),
#: is enough unless a softmax rounds two probabilities equal)
_STEPS = 8


def _counting(logits: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The router's logits as returned where a load-balancing loss must count other experts (``rows``, at ``tokens``):
    every expert counted in place of another takes the larger of the two logits raised by a step of rounding's size, 8
    eps(dtype)·max(|logit|, 1) (the other the smaller), doubled until the top k of their softmax (:func:`counted`) is
    ``rows``. Hugging Face's loss takes its own top k of these logits: it counted the original's own choice at a tie
    while the new model's counted the other, and verify FAILed exact stream symmetries on ``aux_loss`` (a float32
    Mixtral: 0.998 against 1.004; a float64 one: 2.0065 against 2.0106). Within a tie the two logits are within
    2δ + 8·eps32·s (module docstring). The logits recorded for :func:`ties` are the router's own."""
    out = logits.clone()
    k = rows.shape[1]
    rows = rows.to(device=out.device)
    tokens = tokens.to(out.device)
    have = counted(out[tokens], k)
    differ = (have.sort(-1).values != rows.sort(-1).values).any(-1).nonzero().flatten().tolist()
    eps = torch.finfo(out.dtype).eps
    for i in differ:
        t, want = int(tokens[i]), set(rows[i].tolist())
        step = 8 * eps * max(out[t].abs().max().item(), 1.0)
        for _ in range(_STEPS):
            now = set(counted(out[t:t + 1], k)[0].tolist())
            if now == want:
                break
            for d, a in zip(sorted(now - want), sorted(want - now)):
                hi, lo = torch.maximum(out[t, d], out[t, a]), torch.minimum(out[t, d], out[t, a])
                out[t, a], out[t, d] = hi + step, lo
            step *= 2
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
    """The choices to make in the original model and how many tokens that is: the tokens whose chosen experts differ (the
    new model's mapped through ``labels``) at a tie within rounding (module docstring), where the original is to choose
    what the new model chose: ``{(site, call): (tokens, indices in the original's labels, tokens in the call)}`` for the
    router's choice, and ``{(site, call, COUNTED): ...}`` for the experts a load-balancing loss counts (:func:`counted`)."""
    force, count = {}, 0
    for key, (logits, chosen, kept) in old.items():
        if key not in new:
            continue
        new_logits, new_chosen, new_kept = new[key]
        if chosen.shape != new_chosen.shape or logits.shape != new_logits.shape:
            continue
        lab = labels.get(key[0])
        lab = torch.arange(logits.shape[1], device=chosen.device) if lab is None else lab.to(chosen.device)
        made = set()
        for where, mine, theirs in ((key, chosen, new_chosen), ((*key, COUNTED), kept, new_kept)):
            tokens, rows = _tied(logits, new_logits, lab, mine, lab[theirs.to(lab.device)], tol)
            if tokens:
                force[where] = (torch.tensor(tokens), torch.stack(rows), len(chosen))
                made.update(tokens)
        count += len(made)
    return force, count


def _tied(logits: torch.Tensor, new_logits: torch.Tensor, lab: torch.Tensor, chosen: torch.Tensor,
          mapped: torch.Tensor, tol: float) -> tuple[list, list]:
    """The tokens of one call where the original's experts ``chosen`` differ from the new model's (``mapped`` into the
    original's labels) at a tie within rounding, and the rows the original is to take there (``chosen`` with the dropped
    experts replaced by the added, in place)."""
    differ = (chosen.sort(-1).values != mapped.sort(-1).values).any(-1).nonzero().flatten().tolist()
    tokens, rows = [], []
    if not differ:
        return tokens, rows
    L, L_new = logits.double(), new_logits.double()
    expected = L[:, lab]  # the new model's column j holds the original's column lab[j]
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
    return tokens, rows


def following(seen: dict):
    """``choose(model, run)``: ``run()`` with ``model``'s routers making every choice ``seen`` recorded (each call's every
    token: the router's, and what its returned logits count), for a run that must route as that one did: a floor's copy
    of the model (``_verify_floor._own_rounding``), the float64 branch's rounded run of the original."""
    force = {}
    for key, (_, chosen, kept) in seen.items():
        every = torch.arange(len(chosen))
        force[key], force[(*key, COUNTED)] = (every, chosen, len(chosen)), (every, kept, len(chosen))

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
