"""Matching neurons across two representations, and how neuron-level interpretations shift."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .._errors import InvalidOptionError, UnsupportedModelError
from .._progress import ProgressLike, progress_bar
from .._report import Report, new_axes
from ..groups import Group, ScaledPermutation, get_group
from ..hooks import first_tensor, run_with_cache
from ._map import symmetry_map
from ._sites import Site
from ..models import eval_mode, has_layout, no_grad_analysis


def _units(acts: torch.Tensor) -> torch.Tensor:
    """[N, C, *rest] -> [C, N·prod(rest)]: one row of values per unit."""
    a = torch.as_tensor(acts).double()
    if a.ndim < 2:
        raise InvalidOptionError(f"activations need shape [examples, units, ...]; got {tuple(a.shape)}.")
    return a.transpose(0, 1).reshape(a.shape[1], -1)


@dataclass(repr=False)
class NeuronMatching(Report):
    """``acts_b[:, i] ≈ scale[i] · acts_a[:, perm[i]]``, found by Hungarian matching of cosines."""

    perm: torch.Tensor  # [C]
    scale: torch.Tensor  # [C] least-squares scale of each match
    quality: torch.Tensor  # [C] cosine similarity of each matched pair (1 = exact up to scale)
    similarity: torch.Tensor  # [C, C] cosine between unit i of b and unit j of a

    @property
    def element(self) -> ScaledPermutation:
        """The matching as a group element M with acts_b ≈ M acts_a along the unit axis (P·D₊, or a permutation
        times a nonzero diagonal where a signed matching found sign flips)."""
        group = "diagonal_permutation" if bool((self.scale < 0).any()) else "scaled_permutation"
        return ScaledPermutation(self.perm, self.scale, group=group)

    def summary(self) -> str:
        q = self.quality
        return f"{len(q)} units, mean matched cosine {q.mean():.4f}, worst {q.min():.4f}"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"unit_b": np.arange(len(self.perm)), "unit_a": self.perm.numpy(),
                             "scale": self.scale.numpy(), "cosine": self.quality.numpy()})

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax, figsize=(4.5, 4))
        sns.heatmap(self.similarity[:, self.perm].numpy(), cmap="vlag", center=0, vmin=-1, vmax=1, ax=ax, square=True)
        ax.set_xlabel("unit of a (matched order)")
        ax.set_ylabel("unit of b")
        ax.set_title("cosine similarity after matching")
        return ax


def _normalised(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows over their norms, rows over their largest |value|, those largest values)``; a zero row stays
    zero. Dividing by the largest value first handles a unit of size 10⁻²⁰⁰ as exactly as one of size 1
    (its squares would underflow)."""
    peak = X.abs().amax(dim=1)
    Y = X / torch.where(peak > 0, peak, 1.0).unsqueeze(1)
    norm = Y.norm(dim=1)
    return Y / torch.where(norm > 0, norm, 1.0).unsqueeze(1), Y, peak


def match_neurons(acts_a: torch.Tensor, acts_b: torch.Tensor, *, signed: bool = False,
                  centred: bool = False) -> NeuronMatching:
    """Match the units of two activation sets (``[N, C, ...]`` each) by a scale-invariant similarity.

    The similarity is the cosine between units (each unit's values over examples and positions, not
    centred, so a positive scaling leaves it unchanged); the Hungarian algorithm maximises the total.
    ``signed=True`` matches on |cosine| so sign flips are recovered too. An applied P·D₊ is recovered
    exactly: ``matching.element`` maps ``acts_a`` onto ``acts_b``. A unit that is zero on every example
    (a dead ReLU) has cosine 0 with every unit and scale 1 (no scale fits it; 1 keeps the element
    invertible). ``centred=True`` matches on correlations (each unit's mean removed first), which also
    sees an affine sign flip a ↦ c − a (a sigmoid unit under σ(−x) = 1 − σ(x)) as the same unit, negated;
    ``scale`` stays the uncentred least-squares fit.
    """
    from scipy.optimize import linear_sum_assignment

    A, B = _units(acts_a), _units(acts_b)
    if A.shape != B.shape:
        raise InvalidOptionError(f"both activation sets need the same shape; got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}.")
    if A.shape[1] == 0:
        raise InvalidOptionError(f"matching needs at least one example; got shape {tuple(acts_a.shape)}.")
    for name, X in (("acts_a", A), ("acts_b", B)):
        if not bool(torch.isfinite(X).all()):
            bad = torch.nonzero(~torch.isfinite(X).all(dim=1)).flatten().tolist()
            raise InvalidOptionError(f"{name} has non-finite values (inf or NaN) in units {bad[:10]}; a unit's cosine "
                                     f"with another needs finite activations.")
    (An, Ya, pa), (Bn, Yb, pb) = _normalised(A), _normalised(B)
    if centred:  # (on rows over their largest values: the means of tiny units do not underflow either)
        An, Bn = (_normalised(Y - Y.mean(dim=1, keepdim=True))[0] for Y in (Ya, Yb))
    sim = Bn @ An.T  # [C_b, C_a]
    score = sim.abs() if signed else sim
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    quality = sim[torch.arange(len(perm)), perm]
    # the least-squares scale ⟨b, a⟩/⟨a, a⟩, on rows over their largest values: no square of a tiny unit
    # underflows, and b = a gives exactly 1
    Ya, pa = Ya[perm], pa[perm]
    aa = (Ya * Ya).sum(1)
    scale = torch.where(aa > 0, (pb / torch.where(pa > 0, pa, 1.0)) * (Yb * Ya).sum(1) / torch.where(aa > 0, aa, 1.0), 0.0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a dead unit on either side: no scale fits
    return NeuronMatching(perm, scale, quality.abs() if signed else quality, sim)


@dataclass(repr=False)
class InterpretationShift(Report):
    """Top-k activating examples per unit before and after a transform, with and without matching."""

    site: str
    k: int
    top_before: torch.Tensor  # [C, k] example indices per unit of the original model
    top_after: torch.Tensor  # [C, k] per unit of the new model
    perm: torch.Tensor  # [C] unit of the original matched to each unit of the new model
    overlap_same_index: torch.Tensor  # [C] |top_before[u] ∩ top_after[u]| / k
    overlap_matched: torch.Tensor  # [C] |top_before[perm[u]] ∩ top_after[u]| / k

    @classmethod
    def from_scores(cls, site: str, before: torch.Tensor, after: torch.Tensor, perm: torch.Tensor,
                    k: int) -> "InterpretationShift":
        """From per-example unit scores already computed (``[N, C]`` each) and a matching ``perm``
        (``perm[u]``: the unit before matched to unit ``u`` after)."""
        k = min(k, len(before))
        top_a = before.topk(k, dim=0).indices.T  # [C, k]
        top_b = after.topk(k, dim=0).indices.T

        def overlap(x, y):  # [C, k] each -> fraction of y's examples that are also in x, per unit
            return (x.unsqueeze(2) == y.unsqueeze(1)).any(dim=1).sum(dim=1).double() / k

        return cls(site, k, top_a, top_b, perm, overlap(top_a, top_b), overlap(top_a[perm], top_b))

    def summary(self) -> str:
        return (f"site {self.site}: top-{self.k} overlap {self.overlap_matched.mean():.3f} after matching, "
                f"{self.overlap_same_index.mean():.3f} at the same unit index")

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"unit": np.arange(len(self.perm)), "matched_unit_before": self.perm.numpy(),
                             "overlap_same_index": self.overlap_same_index.numpy(),
                             "overlap_matched": self.overlap_matched.numpy()})

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax)
        frame = self.to_frame().melt(id_vars="unit", value_vars=["overlap_same_index", "overlap_matched"],
                                     var_name="comparison", value_name=f"top-{self.k} overlap")
        sns.histplot(data=frame, x=f"top-{self.k} overlap", hue="comparison", bins=np.linspace(0, 1, 11),
                     multiple="dodge", ax=ax)
        ax.set_title(self.summary())
        return ax


def site_units(h: torch.Tensor, site: Site, hook, transformer: bool) -> torch.Tensor:
    """An activation at a site's hook -> ``[batch, C, rest]``: units second, everything else flattened.

    ``transformer``: units last, as TransformerLens and raw Hugging Face activations keep them (``[batch, pos, d]``,
    per head ``[batch, pos, head, d_head]``, or a raw projection's ``[batch, pos, heads·d_head]``: a per-head site
    reads its first head; a site of whole heads puts the head axis second). Otherwise grouped units
    (``hook.block > 1``: features per channel, flattened channel-major) are split.
    """
    if transformer:
        if hook.level == "heads":  # units are whole heads (or key/value groups of them) on the head axis
            ax = hook.axis
            if ax == -1:  # a raw projection's output [..., heads·d_head]: one unit is ``block`` features
                h, ax = h.unflatten(-1, (-1, hook.block)), -2
            if hook.heads:
                h = h.index_select(ax, torch.tensor(hook.heads, device=h.device))
            h = h.movedim(ax, 1)
        else:
            if hook.block > 1:  # a raw Hugging Face projection's output [..., heads·d_head]
                h = h.unflatten(-1, (-1, hook.block))
            h = (h[..., hook.heads[0], :] if hook.heads else h).movedim(-1, 1)
    return h.reshape(h.shape[0], site.n, -1)


def site_observation(site: Site):
    """The observation at ``site.hook_name``; an ``UnsupportedModelError`` where the model shows none (a raw GPT-2's
    fused q/k/v projection has no output per head space)."""
    found = next((o for o in site.observed if o.name == site.hook_name), None)
    if found is None:
        raise UnsupportedModelError(f"site {site.name!r} has no activation this model shows (it is moved by its weights "
                                    f"alone: a fused q/k/v projection's parts are no module's output); per-unit reads "
                                    f"(top examples, traces, probes) need one.")
    return found


def unit_activations(model: nn.Module, sites, inputs: torch.Tensor, *, per_sequence: bool = False, batch_size: int = 256,
                check=None, bar=None) -> dict[str, torch.Tensor]:
    """Per example and unit, the activation at each site's hook: ``{site name: float64 [N, C]}``.

    Images: the largest value over pixels. Token inputs: every (sequence, position) is an example — a
    token in its context — in row-major order (example i is sequence i // seq_len, position i %
    seq_len); ``per_sequence=True`` keeps one row per sequence instead (its largest value over
    positions: what the explorer shows). The forward stops once every site's hook fired. ``check``
    is called before each batch (the widgets' cancel point); ``bar`` (a progress bar) advances by one per
    batch. The model runs in eval mode, restored.
    """
    return _unit_scores(model, sites, inputs, per_sequence=per_sequence, batch_size=batch_size, check=check,
                        bar=bar)[0]


def unit_extremes(model: nn.Module, sites, inputs: torch.Tensor, *, per_sequence: bool = False, batch_size: int = 256,
                  check=None, bar=None) -> tuple[dict, Optional[dict]]:
    """:func:`unit_activations`, and where values are pooled over positions (images; token inputs with
    ``per_sequence``) each example's smallest value per unit too, else None: a sign flip turns a unit's
    largest values into the negated smallest ones (:func:`match_site_units` reads both)."""
    return _unit_scores(model, sites, inputs, per_sequence=per_sequence, batch_size=batch_size, check=check, bar=bar,
                        lowest=True)


def _unit_scores(model: nn.Module, sites, inputs: torch.Tensor, *, per_sequence: bool = False, batch_size: int = 256,
                 check=None, bar=None, lowest: bool = False) -> tuple[dict, Optional[dict]]:
    """:func:`unit_activations`, and with ``lowest`` (where values are pooled over positions) the smallest value
    per example and unit too: a sign flip turns a unit's largest values into the negated smallest ones."""
    tl = has_layout(model)  # units last: TransformerLens and raw Hugging Face activations
    hooks = {s.name: site_observation(s) for s in sites}
    names = sorted({o.name for o in hooks.values()})
    stop = all(o.call == 0 for o in hooks.values())  # stop_at stops at a name's first call
    parts: dict[str, list] = {s.name: [] for s in sites}
    pooled = not (tl and not per_sequence)
    lows: Optional[dict[str, list]] = {s.name: [] for s in sites} if lowest and pooled else None
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            if check is not None:
                check(None)
            _, cache = run_with_cache(model, inputs[start:start + batch_size], names=names, stop_at=stop, budget=None,
                                      reduce=first_tensor)  # a Hugging Face layer may return (hidden_states, ...)
            for s in sites:
                o = hooks[s.name]
                h = site_units(cache.calls(o.name)[o.call], s, o, tl)  # [batch, C, rest]
                if tl and not per_sequence:  # [batch, C, pos] -> [batch·pos, C]
                    parts[s.name].append(h.transpose(1, 2).flatten(0, 1).double())
                else:
                    parts[s.name].append(h.amax(dim=2).double())
                    if lows is not None:
                        lows[s.name].append(h.amin(dim=2).double())
            if bar is not None:
                bar.update()
    low = None if lows is None else {name: torch.cat(p) for name, p in lows.items()}
    return {name: torch.cat(p) for name, p in parts.items()}, low


def may_flip(site: Site, group: Union[None, str, Group] = None) -> bool:
    """Whether a transform drawn from ``group`` can flip the sign of a unit as read at the site's hook: what the group
    says of the level the hook reads (``Group.flips_signs``: a P·D₊ never, a tanh site's P·D± before and after its
    activation, abs's P·D only before it, a GroupNorm's input signs on the writer's output it normalises). ``group``:
    the site's own (None), or the one a transform of it drew from instead (a registry name or a Group: a negative
    control's, an affine extension's)."""
    level = next((o.level for o in site.observed if o.name == site.hook_name), "pre")
    return (site.group if group is None else get_group(group, site.n)).flips_signs(level)


def match_site_units(before: torch.Tensor, after: torch.Tensor, site: Site, *, before_min: Optional[torch.Tensor] = None,
                     after_min: Optional[torch.Tensor] = None, group: Union[None, str, Group] = None) -> NeuronMatching:
    """The units of a site after a transform matched to those before (``[N, C]`` each), as far as the site's
    group lets them move: where no element can flip a unit's sign (:func:`may_flip`: P·D₊, permutations) it matches
    on cosines; elsewhere signs may have flipped, linearly (tanh: a ↦ −a) or affinely (sigmoid: a ↦ 1 − a), so it
    matches on |correlation|.

    Scores pooled over positions (an image's largest value per unit) do not flip with the unit: the new
    largest value is the old smallest, negated. With the smallest values too (``before_min``, ``after_min``),
    a unit is compared on (largest, smallest) both as it is and flipped, (−smallest, −largest), and the
    better of the two counts. ``group``: the group the transform drew from, where not the site's own (see
    :func:`may_flip`)."""
    signed = may_flip(site, group)
    if not signed or before_min is None or after_min is None:
        return match_neurons(before, after, signed=signed, centred=signed)
    from scipy.optimize import linear_sum_assignment

    B = torch.cat([after, after_min])  # [2N, C]
    kept = match_neurons(torch.cat([before, before_min]), B, signed=True, centred=True)
    flipped = match_neurons(torch.cat([before_min, before]), B, signed=True, centred=True)
    flip = flipped.similarity.abs() > kept.similarity.abs()  # [C_b, C_a]
    sim = torch.where(flip, flipped.similarity, kept.similarity)
    rows, cols = linear_sum_assignment(sim.abs().numpy(), maximize=True)
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    units = torch.arange(len(perm))
    quality = sim[units, perm]
    # ±1: whether the unit flipped. The flipped comparison already pairs (largest, smallest) after with
    # (smallest, largest) before, so an exact flip a ↦ −a (or 1 − a) is r = −1 there: r's sign alone says it.
    scale = quality.sign()
    return NeuronMatching(perm, torch.where(scale == 0, 1.0, scale), quality.abs(), sim)


@no_grad_analysis
def interpretation_shift(model: nn.Module, new_model: nn.Module, data: torch.Tensor, site: Union[str, Site],
                         k: int = 10, *, batch_size: int = 256, example: Optional[torch.Tensor] = None,
                         progress: ProgressLike = None) -> InterpretationShift:
    """For each unit of ``site``, its top-``k`` examples of ``data`` in both models, compared.

    Units of the new model are matched to the original's by :func:`match_site_units` on their
    activations (at a site whose group can flip signs, on |correlation|, and on images also on each
    unit's smallest value per image, which a flip makes the largest). Under P·D₊ the top examples are
    the same sets, relabelled (matched overlap 1); a flipped unit's top examples are the old unit's
    bottom ones; under a rotation they change. ``progress``: a bar of the batches of ``data`` run through both
    models: True, False, or None (the default) for a bar in a Jupyter notebook only.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # k = 0 gave NaN overlaps
        raise InvalidOptionError(f"k is the number of top examples per unit, an integer ≥ 1; got {k!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size is an integer ≥ 1; got {batch_size!r}.")
    if len(data) == 0:
        raise InvalidOptionError("interpretation_shift needs at least one example in data; got none.")
    batches = -(-len(data) // batch_size)
    with progress_bar(total=2 * batches, desc="interpretation_shift", unit="batch", progress=progress) as bar:
        smap = symmetry_map(model, example)
        site = smap[site] if isinstance(site, str) else site
        # new_model may come from the affine extension (wb.random_intertwiner(..., affine=True): a sigmoid unit's
        # a ↦ 1 − a), whose group holds the site's own: matching allows the flips either allows
        extended = symmetry_map(model, example, affine=True)
        group = extended[site.name].group if site.name in extended.names and may_flip(extended[site.name]) else None
        lowest = may_flip(site, group)  # pooled scores of a unit that may flip: see match_site_units
        a, a_low = _unit_scores(model, [site], data, batch_size=batch_size, bar=bar, lowest=lowest)
        try:
            b, b_low = _unit_scores(new_model, [site], data, batch_size=batch_size, bar=bar, lowest=lowest)
        except (RuntimeError, UnsupportedModelError) as exc:  # e.g. a reshape to the site's n units failed
            raise InvalidOptionError(f"new_model's activation at site {site.name!r} could not be read as the original's "
                                     f"{site.n} units ({exc}); interpretation_shift compares a model with a transformed "
                                     f"copy of it (wb.random_intertwiner, wb.apply_transform).") from exc
    a, b = a[site.name], b[site.name]
    low = {} if a_low is None else {"before_min": a_low[site.name], "after_min": b_low[site.name]}
    perm = match_site_units(a, b, site, **low, group=group).perm
    return InterpretationShift.from_scores(site.name, a, b, perm, k)

