"""``NeuronBasisProbe``: is a concept carried by single units more than random bases allow?

The computation (:class:`ProbeData`, :class:`ProbeReport`) is kept apart from the ipywidgets front
end so it can be timed, tested and reused headless. It is ``wb.probing.privileged_basis_test`` run
one family at a time with a cancel check between chunks of bases; the null of every concept comes
from the same projected activations (one sort per basis serves all concepts), so a null is cached
per (layer, n_bases, seed) and switching concepts only slices it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional, Sequence

import ipywidgets as widgets
import numpy as np
import torch
from torch import nn

from .._errors import InvalidOptionError, WorkbenchError, check_option
from .._progress import ProgressLike, progress_bar
from .._report import Report, new_axes
from ..hooks import first_tensor, run_with_cache
from ..models import has_layout
from ..probing import PrivilegedBasisTest, UnitScores, concept_matrix, concept_scores, privileged_basis_test, resolve_group
from ..symmetry import symmetry_map
from ..models import eval_mode
from ._base import BackgroundAction, Job, checked_int, int_control, render, show
from ._compute import Check, _no_check

OWN = "own group"
COLOURS = {"orthogonal": "#4c72b0", "gl": "#dd8452", OWN: "#55a868"}


@dataclass(repr=False)
class ProbeReport(Report):
    """One concept at one layer: the neuron basis's statistic against random bases, and the best units.

    Attributes:
        observed: the best unit's |AUROC − 0.5| in the neuron basis.
        null: ``{family: float64 [n_bases]}`` the same statistic in each random basis.
        roles: ``{family: "random" | "architecture"}`` (the layer's own group).
        auroc, mean_difference: float64 ``[d]`` per unit, for this concept.
    """

    layer: str
    concept: str
    n_bases: int
    seed: int
    observed: float
    null: dict[str, torch.Tensor]
    roles: dict[str, str]
    auroc: torch.Tensor
    mean_difference: torch.Tensor
    n_examples: int
    k: int = 10

    def _test(self) -> PrivilegedBasisTest:
        """This concept's slice of the layer's test, so its numbers come from the test's own rules."""
        return PrivilegedBasisTest(torch.tensor([self.observed], dtype=torch.float64),
                                   {f: v[:, None] for f, v in self.null.items()}, self.roles, [self.concept],
                                   "auroc", self.seed, 0.05, self.n_examples)

    def p_value(self, family: str) -> float:
        """``(1 + #{null ≥ observed}) / (n_bases + 1)`` against ``family``."""
        return float(self._test().p_values(family)[0])

    def z_score(self, family: str) -> float:
        """(observed − null mean) / null std; 0 when every basis gave the observed value (an invariant family)."""
        return float(self._test().z_scores(family)[0])

    @property
    def best_units(self) -> list[int]:
        """The ``k`` units with the largest |AUROC − 0.5|, strongest first."""
        return (self.auroc - 0.5).abs().argsort(descending=True, stable=True)[:self.k].tolist()

    def units_frame(self):
        """The best units: unit, AUROC, |AUROC − 0.5|, standardised mean difference."""
        import pandas as pd

        u = self.best_units
        return pd.DataFrame({"unit": u, "auroc": self.auroc[u].numpy(), "strength": (self.auroc[u] - 0.5).abs().numpy(),
                             "mean_difference": self.mean_difference[u].numpy()})

    def to_frame(self):
        """One row per basis family: observed, null mean/std, z, p."""
        import pandas as pd

        return pd.DataFrame([{"family": f, "role": self.roles[f], "observed": self.observed,
                              "null_mean": float(v.mean()), "null_std": float(v.std()) if len(v) > 1 else 0.0,
                              "z": self.z_score(f), "p": self.p_value(f)} for f, v in self.null.items()])

    def summary(self) -> str:
        u = self.best_units[0]
        tests = "; ".join(f"{f}{' (own group)' if self.roles[f] == 'architecture' else ''} p={self.p_value(f):.3g} "
                          f"z={self.z_score(f):.2f}" for f in self.null)
        return (f"layer {self.layer}, concept {self.concept!r}: best unit {u} (AUROC {float(self.auroc[u]):.3f}), "
                f"max |AUROC − 0.5| = {self.observed:.3f} vs {self.n_bases} random bases per family — {tests}")

    def _repr_html_(self) -> str:
        fmt = lambda v: f"{v:.3g}"  # noqa: E731
        return (f"<div><p><b>ProbeReport</b> — {html.escape(self.summary())}</p>"
                f"{self.to_frame().to_html(index=False, float_format=fmt, border=0)}"
                f"<p>best units</p>{self.units_frame().to_html(index=False, float_format=fmt, border=0)}</div>")

    def plot(self, ax=None):
        """Histogram of each family's null with the neuron basis marked."""
        ax = new_axes(ax, figsize=(6, 3.2))
        _draw_histogram(ax, self)
        return ax


def _draw_histogram(ax, r: ProbeReport) -> None:
    values = torch.cat([*r.null.values(), torch.tensor([r.observed], dtype=torch.float64)]).numpy()
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi + 1e-12 + 1e-9 * abs(hi), 31)
    for fam, v in r.null.items():
        ax.hist(v.numpy(), bins=bins, alpha=0.55, label=f"{fam} (p={r.p_value(fam):.3g})",
                color=COLOURS.get(OWN if r.roles[fam] == "architecture" else fam))
    ax.axvline(r.observed, color="crimson", lw=2, label="neuron basis")
    ax.set_xlabel("best unit's |AUROC − 0.5|")
    ax.set_ylabel("random bases")
    ax.set_title(f"{r.layer}: {r.concept}")
    ax.legend(fontsize=7, frameon=False)


def _reduce(x: torch.Tensor, concept_ndim: int, where: str) -> torch.Tensor:
    """Activations with units last, one row per example (or per token when concepts are per token)."""
    if x.ndim == concept_ndim:
        return x
    if x.ndim == 4 and concept_ndim == 2:  # conv maps [N, C, H, W]: the spatial mean of each channel
        return x.mean((2, 3))
    raise InvalidOptionError(f"{where} has shape {tuple(x.shape)} but the concepts have {concept_ndim} axes; pass [N, d] "
                             f"(per-example concepts; conv maps [N, C, H, W] are averaged) or [N, T, d] with token concepts.")


def _capture(model: nn.Module, inputs: torch.Tensor, concept_ndim: int, batch_size: int, progress: ProgressLike):
    """``({site: acts}, {site: Site}, skipped)``: every usable site of ``wb.symmetry_map(model)``, captured once."""

    tl, sites, skipped = has_layout(model), {}, []  # units last: TransformerLens and raw Hugging Face models
    for s in symmetry_map(model).sites:
        o = next((o for o in s.observed if o.name == s.hook_name), None)
        if o is None:  # moved by weights alone (a fused q/k/v projection's parts are no module's output)
            skipped.append(f"{s.name} (no activation shows it)")
        elif o.block > 1:  # per-head slices of a wider hook: not one unit per channel
            skipped.append(f"{s.name} (per-head block)")
        else:
            sites[s.name] = (s, o)
    if not sites:
        raise WorkbenchError(f"wb.symmetry_map found no layer with units to probe in this {type(model).__name__}.")
    names = sorted({o.name for _, o in sites.values()})
    parts: dict = {n: [] for n in sites}
    with eval_mode(model), torch.no_grad():
        for lo in progress_bar(range(0, len(inputs), batch_size), desc="capturing", unit="batch", progress=progress,
                               leave=False):
            try:
                _, cache = run_with_cache(model, inputs[lo:lo + batch_size], names=names, budget=None, reduce=first_tensor)
            except WorkbenchError:
                raise
            except Exception as exc:
                raise InvalidOptionError(f"the model could not run on the data (inputs {tuple(inputs.shape)}, "
                                         f"{inputs.dtype}): {type(exc).__name__}: {exc}") from exc
            for n, (s, o) in list(sites.items()):
                h = cache.calls(o.name)[o.call]
                if h.shape[-1 if tl else 1] != s.n or (tl and h.ndim != 3):  # e.g. per-head [batch, pos, head, d_head]
                    skipped.append(f"{n} (hook shape {tuple(h.shape)} is not one value per unit)")
                    del sites[n], parts[n]
                    continue
                if tl:  # [batch, pos, d]: tokens, or their mean for per-sequence concepts
                    h = h if concept_ndim == 3 else h.mean(1)
                else:  # units on axis 1; pixels and any other axes averaged
                    h = h.reshape(h.shape[0], h.shape[1], -1).mean(-1) if h.ndim > 2 else h
                parts[n].append(h.detach().float())
    if not parts:
        raise WorkbenchError(f"no site of this {type(model).__name__} has one value per unit at its hook: {skipped}.")
    acts = {n: torch.cat(p) for n, p in parts.items()}
    return acts, {n: sites[n][0] for n in acts}, skipped


class ProbeData:
    """Activations of named layers and the concepts, with the tests cached per (layer, n_bases, seed).

    Args:
        acts: ``{layer: [N, d]}`` (``[N, T, d]`` with token-level concepts; conv maps ``[N, C, H, W]``
            are averaged over space).
        concepts: a ConceptDataset, ``{name: labels}`` or bool ``[N, K]``; concepts that are constant on
            these examples are dropped (they have no AUROC).
        groups: ``{layer: own group}`` — a registry name, a Group or a Site (layers not named: none known).
        bases: the random families.
    """

    def __init__(self, acts: dict, concepts, groups: Optional[dict] = None, bases: Sequence[str] = ("orthogonal", "gl")):
        Y, names = concept_matrix(concepts)
        where = None
        meta = getattr(concepts, "meta", {}) or {}
        if Y.ndim == 3 and meta.get("pad_id") is not None and concepts.inputs.shape == Y.shape[:-1]:
            where = concepts.inputs != meta["pad_id"]  # padding carries no concept
        rows = Y[where] if where is not None else Y.reshape(-1, Y.shape[-1])
        n1 = rows.sum(0)
        keep = ((n1 > 0) & (n1 < len(rows))).tolist()
        self.concept_names = [n for n, k in zip(names, keep) if k]
        self.dropped = [n for n, k in zip(names, keep) if not k]
        if not self.concept_names:
            raise InvalidOptionError(f"every concept ({names}) is all-true or all-false on these examples; nothing to probe.")
        self._Y, self._where = Y[..., torch.tensor(keep)], where
        self.acts = {str(k): _reduce(torch.as_tensor(v), Y.ndim, f"layer {k!r}") for k, v in acts.items()}
        if not self.acts:
            raise InvalidOptionError("no layers to probe: acts is empty.")
        self.bases = list(bases)
        self.groups = {}
        for layer, g in (groups or {}).items():
            check_option("layer", layer, list(self.acts))
            self.groups[layer] = resolve_group(g, self.acts[layer].shape[-1])
        self._scores: dict = {}
        self._tests: dict = {}

    @property
    def layers(self) -> list[str]:
        return list(self.acts)

    def scores(self, layer: str) -> UnitScores:
        check_option("layer", layer, self.layers)
        if layer not in self._scores:
            self._scores[layer] = concept_scores(self.acts[layer], self._Y, where=self._where, names=self.concept_names)
        return self._scores[layer]

    def cached(self, layer: str, n_bases: int, seed: int) -> bool:
        return (layer, n_bases, seed) in self._tests

    def test(self, layer: str, n_bases: int, seed: int, check: Check = _no_check) -> PrivilegedBasisTest:
        """``wb.probing.privileged_basis_test`` of every concept at ``layer`` (same numbers), cancellable."""
        key = (layer, checked_int("n_bases", n_bases, 1), checked_int("seed", seed, 0))
        if key in self._tests:
            return self._tests[key]
        check("scores")
        check_option("layer", layer, self.layers)
        own = self.groups.get(layer)

        def step(family):  # the job's steps name the layer's own group OWN
            check(OWN if own is not None and family == own.name else family)

        test = privileged_basis_test(self.acts[layer], self._Y, self.bases, own, n_bases=n_bases, seed=seed,
                                     statistic="auroc", where=self._where, names=self.concept_names, check=step,
                                     progress=False)  # the widget's job bar shows the families
        self._tests[key] = test
        return test

    def report(self, layer: str, concept: str, n_bases: int, seed: int, k: int = 10,
               check: Check = _no_check) -> ProbeReport:
        """The :class:`ProbeReport` of one concept (its null sliced out of the layer's cached test)."""
        j = self.concept_names.index(check_option("concept", concept, self.concept_names))
        test, s = self.test(layer, n_bases, seed, check), self.scores(layer)
        return ProbeReport(layer, concept, n_bases, seed, float(test.observed[j]), {f: v[:, j] for f, v in test.null.items()},
                           dict(test.roles), s.auroc[:, j], s.mean_difference[:, j], test.n_examples, k)


def _open(acts_or_model, data, groups, batch_size: int, progress: ProgressLike) -> tuple[ProbeData, list[str]]:
    """The :class:`ProbeData` of whatever the user holds, and the layers skipped."""
    if data is None:
        raise InvalidOptionError("NeuronBasisProbe needs data with concepts: a ConceptDataset (wb.data.shapes(...)), "
                                 "a {name: labels} dict or a bool [N, K] array.")
    if isinstance(acts_or_model, nn.Module):
        inputs = getattr(data, "inputs", None)
        if not isinstance(inputs, torch.Tensor) or not hasattr(data, "concept_names"):
            raise InvalidOptionError(f"with a model, data must be a ConceptDataset (inputs and concepts); got "
                                     f"{type(data).__name__}.")
        acts, sites, skipped = _capture(acts_or_model, inputs, data.concepts.ndim, batch_size, progress)
        return ProbeData(acts, data, {**sites, **(groups or {})}), skipped
    x = acts_or_model
    if isinstance(x, (torch.Tensor, np.ndarray)):
        acts = {"acts": torch.as_tensor(x)}
    elif isinstance(x, dict):
        acts = dict(x)
    elif hasattr(x, "names") and hasattr(x, "__getitem__"):  # an ActivationCache or ActivationStore
        acts = {n: x[n] for n in x.names}
    else:
        raise InvalidOptionError(f"NeuronBasisProbe takes activations ([N, d] tensor, {{name: tensor}}, an "
                                 f"ActivationCache or ActivationStore) or a torch model; got {type(x).__name__}.")
    return ProbeData(acts, data, groups), []


class NeuronBasisProbe(BackgroundAction, widgets.VBox):
    """Pick a layer and a concept; see the neuron basis's statistic against random-basis nulls.

    The statistic is the best unit's |AUROC − 0.5| for the concept. Its null distributions come from
    ``n_bases`` random orthogonal and GL bases, and from the layer's own group when known (a model's
    sites carry it; with activations pass ``groups={layer: "relu"}``): an invariant statistic is
    identical in every basis of the own group, so its p-value there is 1. ``acts_or_model`` is an
    ``[N, d]`` tensor, ``{layer: tensor}``, an ActivationCache/ActivationStore, or a model (its
    ``wb.symmetry_map`` sites are captured once on ``data.inputs``; conv maps averaged over space).

    From code: ``probe.layer = "13"; probe.concept = "shape:circle"; probe.n_bases = 99;
    probe.run()`` returns a :class:`ProbeReport` (also ``probe.result``). A null is cached per
    (layer, n_bases, seed): switching concepts, or back to a computed setting, is instant.

    Example:
        >>> import torch, workbench as wb
        >>> y = torch.arange(300) % 2 == 0
        >>> acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)); acts[:, 1] += 2 * y
        >>> probe = wb.widgets.NeuronBasisProbe(acts, {"even": y}, groups={"acts": "relu"})
        >>> probe.n_bases = 19
        >>> r = probe.run()
        >>> r.best_units[0], r.p_value("orthogonal"), r.p_value("scaled_permutation")
        (1, 0.05, 1.0)
        >>> probe.concept, probe.result is r
        ('even', True)
    """

    action_button = "run_button"

    def __init__(self, acts_or_model, data=None, *, groups: Optional[dict] = None, n_bases: int = 50, seed: int = 0,
                 k: int = 10, batch_size: int = 256, progress: ProgressLike = None):
        self.k = checked_int("k", k, 1)
        self.data, self.skipped = _open(acts_or_model, data, groups, checked_int("batch_size", batch_size, 1), progress)
        self._result: Optional[ProbeReport] = None
        self._cancelled = False
        self.job = Job(["scores", *self.data.bases, OWN])
        self._build(n_bases, seed)
        super().__init__(self._layout())
        self._changed()

    # ------------------------------------------------------------------ the widgets
    def _build(self, n_bases: int, seed: int) -> None:
        d = self.data
        options = [(f"{n} — d={d.acts[n].shape[-1]}, own group {d.groups[n].name if n in d.groups else 'unknown'}", n)
                   for n in d.layers]
        self._layer = widgets.Dropdown(options=options, description="layer", layout=widgets.Layout(width="360px"))
        self._concept = widgets.Dropdown(options=d.concept_names, description="concept", layout=widgets.Layout(width="260px"))
        self._n_bases = widgets.BoundedIntText(value=checked_int("n_bases", n_bases, 1, 100_001), min=1, max=100_000,
                                               description="bases", layout=widgets.Layout(width="150px"))
        self._seed = widgets.BoundedIntText(value=checked_int("seed", seed, 0, 2**31), min=0, max=2**31 - 1,
                                            description="seed", layout=widgets.Layout(width="150px"))
        self.run_button = widgets.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.message, self.verdict, self.units = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self.histogram = widgets.Output()
        self.run_button.on_click(lambda _: self._clicked(self.run))
        self.cancel_button.on_click(lambda _: self.cancel())
        for w in (self._layer, self._concept, self._n_bases, self._seed):
            w.observe(lambda _: self._changed(), "value")

    def _layout(self) -> list:
        d = self.data
        first = next(iter(d.acts.values()))
        note = f"; dropped constant concepts {d.dropped}" if d.dropped else ""
        note += f"; skipped {', '.join(self.skipped)}" if self.skipped else ""
        title = widgets.HTML(f"<b>Neuron-basis probe</b> — {len(d.layers)} layers, {len(d.concept_names)} concepts, "
                             f"{first.shape[0]} examples{html.escape(note)}")
        controls = widgets.HBox([self._layer, self._concept, self._n_bases, self._seed])
        actions = widgets.HBox([self.run_button, self.cancel_button, self.job.bar, self.message])
        return [title, controls, actions, self.verdict, widgets.HBox([self.histogram, self.units])]

    # ------------------------------------------------------------------ state, readable and settable
    def __repr__(self) -> str:
        # The text a front end without the widget's JavaScript shows (ipywidgets' own repr is its children's HTML, and
        # it cuts any repr at 110 characters: the state first, ``result.summary()`` has the numbers).
        last = f"best unit {self.result.best_units[0]}" if self.result is not None else "not run yet"
        return f"NeuronBasisProbe(layer {self.layer!r}, concept {self.concept!r}, {self.n_bases} bases: {last})"

    @property
    def layer(self) -> str:
        return self._layer.value

    @layer.setter
    def layer(self, name) -> None:
        self._layer.value = check_option("layer", str(name), self.data.layers)

    @property
    def concept(self) -> str:
        return self._concept.value

    @concept.setter
    def concept(self, name) -> None:
        self._concept.value = check_option("concept", name, self.data.concept_names)

    n_bases = int_control("_n_bases", "Random bases per family (the smallest p-value is 1/(n_bases + 1)).")
    seed = int_control("_seed", "Seed of the random bases (same seed, same bases and numbers).")

    @property
    def result(self) -> Optional[ProbeReport]:
        """The report on show (None before the first run)."""
        return self._result

    @property
    def ready(self) -> bool:
        """Whether the current (layer, n_bases, seed) is computed, so any concept answers at once."""
        return self.data.cached(self.layer, self.n_bases, self.seed)

    # ------------------------------------------------------------------ actions
    def run(self, wait: bool = True) -> Optional[ProbeReport]:
        """Test the current layer and concept; returns the report (None if cancelled).

        ``wait=False`` runs in a worker thread (what the Run button does); ``wait()`` joins it and
        ``cancel()`` stops it between chunks of bases.
        """
        layer, concept, n_bases, seed = self.layer, self.concept, self.n_bases, self.seed  # fixed now: a worker may run long
        return self._launch(lambda check: self.data.report(layer, concept, n_bases, seed, self.k, check), wait)

    def _done(self, value) -> None:
        self._show(value)
        self.message.value = f"<i>done in {self.job.seconds:.2f} s</i>"
        if (value.layer, value.concept, value.n_bases, value.seed) != (self.layer, self.concept, self.n_bases, self.seed):
            self._answer()  # a control moved while the worker ran: show its setting (cached now, or say Run)

    def _changed(self) -> None:
        """A control moved: answer at once from the cache, or say that Run will compute it."""
        if self.job.running:
            self.message.value = "<i>settings changed — Run again when this run ends</i>"
        else:
            self._answer()

    def _answer(self) -> None:
        if self.ready:
            self._show(self.data.report(self.layer, self.concept, self.n_bases, self.seed, self.k))
            self.message.value = "<i>from the cache</i>"
        else:
            self.message.value = (f"<i>press Run to draw {self.n_bases} random bases per family for layer "
                                  f"{html.escape(self.layer)}</i>")

    # ------------------------------------------------------------------ panels
    def _show(self, r: ProbeReport) -> None:
        self._result = r
        fmt = lambda v: f"{v:.3g}"  # noqa: E731
        rows = "".join(f"<tr><td>{html.escape(f)}{' (own group)' if r.roles[f] == 'architecture' else ''}</td>"
                       f"<td>{fmt(r.p_value(f))}</td><td>{fmt(r.z_score(f))}</td><td>{fmt(float(v.mean()))}</td></tr>"
                       for f, v in r.null.items())
        self.verdict.value = (f"<div class='wb-probe-verdict'>{html.escape(r.summary())}<table><tr><th>family</th><th>p</th>"
                              f"<th>z</th><th>null mean</th></tr>{rows}</table></div>")
        self.units.value = (f"<div style='font-size:11px'><b>best units</b> for concept {html.escape(r.concept)} at "
                            f"layer {html.escape(r.layer)} (|AUROC − 0.5|)"
                            f"{r.units_frame().to_html(index=False, float_format=fmt, border=0)}</div>")
        show(self.histogram, [render(lambda fig: _draw_histogram(fig.add_axes((0.12, 0.16, 0.84, 0.74)), r), (5.2, 3.0))])
