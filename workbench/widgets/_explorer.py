"""``IntertwinerExplorer``: apply a random intertwiner at one site and watch the function stay and the neurons move."""
from __future__ import annotations

import dataclasses

import html
import math
from typing import Optional

import ipywidgets as widgets
import torch
from torch import nn

from .._errors import InvalidOptionError, WorkbenchError, check_option
from .._progress import ProgressLike, progress_bar
from ..groups import GROUP_ALIASES, GROUP_NAMES
from ..hooks import batch_digest, model_fingerprint
from ..symmetry import symmetry_map
from ._base import BackgroundAction, Job, checked_int, html_bundle, int_control, show, shown_text
from ._compute import ExplorerResult, badge_html, explore, unit_extremes, unit_traces
from ._examples import example_rows_html, kind_of, token_contexts_html
from ._pixels import colour_bar_html, coloured, png_bytes

STEPS = ["transform", "verify", "scores", "matching"]
#: Non-symmetries offered for contrast (any registry name can be set from code).
CONTRASTS = ("orthogonal", "gl", "permutation", "signed_permutation")


def _data_parts(data):
    """``(inputs, captions, vocab)`` from a ConceptDataset or a tensor of examples."""
    inputs = getattr(data, "inputs", data)
    if not isinstance(inputs, torch.Tensor):
        raise InvalidOptionError(f"data must be a ConceptDataset (wb.data.shapes(...)) or a tensor of examples; "
                                 f"got {type(data).__name__}.")
    if inputs.ndim < 2 or len(inputs) == 0:
        raise InvalidOptionError(f"data needs at least one example with shape [N, ...]; got inputs of shape {tuple(inputs.shape)}.")
    labels, names = getattr(data, "labels", None), getattr(data, "label_names", None)
    if labels is not None and names and labels.ndim == 1:
        captions = [names[i] for i in labels.tolist()]
    else:
        captions = [f"#{i}" for i in range(len(inputs))]
    return inputs, captions, getattr(data, "vocab", None)


def _cell(event: dict, shape: tuple[int, int]) -> tuple[int, int]:
    """The ``(row, column)`` a click on a heatmap image landed on, from where in the drawn image it was
    (ipyevents' dataX/dataY round to the nearest source pixel, which is the wrong cell half the time)."""
    rows, cols = shape
    x, y = event["relativeX"] / event["boundingRectWidth"], event["relativeY"] / event["boundingRectHeight"]
    return min(rows - 1, max(0, int(y * rows))), min(cols - 1, max(0, int(x * cols)))


def _warm_up() -> None:
    """Import now what the first Apply would import (the matching's solver, the colormaps): seconds on a busy machine."""
    from importlib import import_module

    for name in ("scipy.optimize", "matplotlib.cm", "PIL.PngImagePlugin"):
        import_module(name)


class IntertwinerExplorer(BackgroundAction, widgets.VBox):
    """Pick a site, a group, a seed and σ; Apply transforms the model there and shows what moved.

    The own group gives a function-preserving model (PASS): its units are the old units permuted
    and rescaled, so the correlation heatmap is a clean diagonal in matched order and each unit's
    top examples reappear at its matched unit. A non-symmetry (a rotation at a ReLU site) changes
    the function (FAIL) and mixes the units. ``data`` is a ConceptDataset or a tensor ``[N, ...]``.

    Usable from code: ``explorer.site = "9"; explorer.seed = 3; explorer.apply()`` returns an
    :class:`ExplorerResult` (also ``explorer.result``). Opening scores every site's units on the data
    once; an Apply runs ``wb.random_intertwiner``, ``wb.verify`` on the first ``verify_examples``
    examples, and one forward of the new model that stops at the site. The model is never modified.

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> explorer = wb.widgets.IntertwinerExplorer(mlp, torch.randn(20, 4), progress=False)
        >>> explorer.seed = 3
        >>> explorer.apply().passed, explorer.result.shift.overlap_matched.min().item()
        (True, 1.0)
        >>> explorer.group = "orthogonal"
        >>> explorer.apply().passed
        False
    """

    def __init__(self, model: nn.Module, data, *, k: int = 8, verify_examples: int = 32, batch_size: int = 256,
                 progress: ProgressLike = None):
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(f"IntertwinerExplorer needs a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self._modules = dict(model.named_modules())
        self.inputs, self.captions, self.vocab = _data_parts(data)
        self.k = checked_int("k", k, 1)
        self.verify_examples = checked_int("verify_examples", verify_examples, 1)
        self.batch_size = checked_int("batch_size", batch_size, 1)
        smap = symmetry_map(model)
        # a site no activation shows (a raw GPT-2's fused q/k/v parts) has no units to score: listed as skipped
        hidden = [s for s in smap.sites if not any(o.name == s.hook_name for o in s.observed)]
        self.smap = dataclasses.replace(smap, sites=[s for s in smap.sites if s not in hidden],
                                        skipped=list(smap.skipped) + [(s.name, "no activation of this model shows it")
                                                                      for s in hidden]) if hidden else smap
        if not len(self.smap):
            reasons = "; ".join(f"{p}: {why}" for p, why in self.smap.skipped) or "no hidden layer with a writer and a reader"
            raise WorkbenchError(f"wb.symmetry_map found no site in this {type(model).__name__} to transform ({reasons}).")
        # {site: [N, C]}, the original model's unit scores, and their smallest values (for flipped units)
        self.before, self.before_min = self._score_all(progress)
        self._scored = self._state(full=True)  # what those scores were taken from (see _rescore_if_changed)
        _warm_up()
        self._result: Optional[ExplorerResult] = None
        self._new_model: Optional[nn.Module] = None
        self._cancelled = False  # whether the last Apply was cancelled
        self.job = Job(STEPS)
        self._build()
        super().__init__(self._layout())
        self._on_site()

    def _score_all(self, progress: ProgressLike) -> dict:
        batches = math.ceil(len(self.inputs) / self.batch_size)
        with progress_bar(total=batches, desc="scoring units", unit="batch", progress=progress, leave=False) as bar:
            try:
                top, low = unit_extremes(self.model, self.smap.sites, self.inputs, batch_size=self.batch_size, bar=bar)
            except WorkbenchError:
                raise
            except Exception as exc:  # a shape mismatch deep in torch: say which data did not fit
                raise InvalidOptionError(f"the model could not run on the data (inputs of shape {tuple(self.inputs.shape)}, "
                                         f"{self.inputs.dtype}): {type(exc).__name__}: {exc}") from exc
        for name, scores in top.items():  # NaN sorts above every number: it would head every unit's "top" examples
            bad = ~(torch.isfinite(scores).all(1) & torch.isfinite(low[name]).all(1))
            if bool(bad.any()):
                raise InvalidOptionError(f"the model's activations at site {name!r} are NaN or infinite on examples "
                                         f"{bad.nonzero().flatten()[:10].tolist()} (of {len(scores)}); top examples and "
                                         f"matching need finite values: drop those examples or fix the model.")
        return top, low

    def _state(self, full: bool) -> tuple:
        """What the cached scores depend on: the model's modules, and every parameter's, buffer's and the data's
        identity, storage and version counter (an optimiser step, ``load_state_dict`` or an in-place edit moves
        it); ``full`` adds a hash of their bytes, which also sees writes through ``.data`` (no version counter)."""
        tensors = [t for _, t in self.model.named_parameters()] + [t for _, t in self.model.named_buffers()]
        key = (tuple(id(m) for m in self.model.modules()),
               tuple((id(t), t.data_ptr(), t._version) for t in [*tensors, self.inputs]))
        if not full:
            return key, None
        return key, (model_fingerprint(self.model)["parameters"], batch_digest(self.inputs, full=True))

    def _rescore_if_changed(self, full: bool) -> None:
        """Score the units again when the model's weights or the data changed since they were scored (an Apply
        compares the current model's transformed copy with these scores; stale ones showed a shift that was
        training, not the transform). A model whose modules changed needs a new explorer (its sites may differ)."""
        key, digest = self._state(full)
        if key == self._scored[0] and (digest is None or digest == self._scored[1]):
            return
        if key[0] != self._scored[0][0]:
            raise WorkbenchError(f"the {type(self.model).__name__}'s modules changed since this explorer opened, so its "
                                 f"sites may have too; open a new IntertwinerExplorer on it.")
        self.before, self.before_min = self._score_all(False)
        self._scored = self._state(full=True)
        if getattr(self, "_result", None) is not None:  # a result of the old weights: not comparable any more
            self._result = self._new_model = None
            self.heatmap.children = []
            self.badge.value = ("<i>the model's weights or the data changed since the last Apply: its units were scored "
                                "again; Apply to transform the model as it is now</i>")

    # ------------------------------------------------------------------ the widgets
    def _build(self) -> None:
        site_options = [(f"{s.name}{self._module_type(s.hook_name)} — {s.n} units, {s.group.describe()}", s.name)
                        for s in self.smap]
        width = max(320, min(720, 8 * max(len(label) for label, _ in site_options) + 110))  # no truncated labels
        self._site = widgets.Dropdown(options=site_options, description="site", layout=widgets.Layout(width=f"{width}px"))
        self._group = widgets.Dropdown(options=[("own group", "own")] + [(c, c) for c in CONTRASTS], value="own",
                                       description="group", layout=widgets.Layout(width="230px"))
        self._seed = widgets.BoundedIntText(value=0, min=0, max=2**31 - 1, description="seed",
                                            layout=widgets.Layout(width="150px"))
        # The spread of the log-normal scalings (not the activation σ of the paper's notation).
        self._sigma = widgets.BoundedFloatText(value=1.0, min=0.0, max=10.0, step=0.1, description="scale σ",
                                               tooltip="σ of the log-normal scalings of a scaled-permutation group",
                                               style={"description_width": "initial"},
                                               layout=widgets.Layout(width="150px"))
        self._unit = widgets.BoundedIntText(value=0, min=0, max=1, description="unit", layout=widgets.Layout(width="150px"))
        self.apply_button = widgets.Button(description="Apply", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.site_info = widgets.HTML()
        self.badge = widgets.HTML("<i>Pick a site and a group, then Apply.</i>")
        self.message = widgets.HTML()
        # Clickable heatmaps: PNG images (one pixel per cell, scaled up by the browser) whose clicks report
        # where they landed (ipyevents), i.e. the cell; see _pixels.py for why not matplotlib.
        self.heatmap = widgets.HBox(layout=widgets.Layout(align_items="flex-start"))
        self.examples = widgets.Output()
        self.apply_button.on_click(lambda _: self._clicked(self.apply))
        self.cancel_button.on_click(lambda _: self.cancel())
        self._site.observe(lambda _: self._on_site(), "value")
        for w in (self._group, self._seed, self._sigma):
            w.observe(lambda _: self._mark_stale(), "value")
        self._unit.observe(lambda _: self._draw_examples(), "value")

    def _layout(self) -> list:
        title = widgets.HTML("<style>.wb-pixelated {image-rendering: pixelated; cursor: crosshair}</style>"
                             f"<b>Intertwiner explorer</b> — {html.escape(self.smap.summary())}; "
                             f"{len(self.inputs)} examples ({kind_of(self.inputs)})")
        controls = widgets.HBox([self._site, self._group, self._seed, self._sigma])
        actions = widgets.HBox([self.apply_button, self.cancel_button, self.job.bar, self.message])
        return [title, controls, self.site_info, actions, self.badge, self.heatmap,
                widgets.HBox([self._unit, widgets.HTML("<i>top examples of this unit, before and after</i>")]), self.examples]

    # ------------------------------------------------------------------ state, readable and settable
    def __repr__(self) -> str:
        # The text a front end without the widget's JavaScript shows (ipywidgets' own repr is its children's HTML, and
        # it cuts any repr at 110 characters: the state first, ``result.summary()`` has the numbers).
        last = ("PASS" if self._result.passed else "FAIL") if self._result is not None else "not applied yet"
        return f"IntertwinerExplorer(site {self.site!r}, group {self.group!r}, seed {self.seed}: {last}; {len(self.smap)} sites)"

    @property
    def site(self) -> str:
        return self._site.value

    @site.setter
    def site(self, name: str) -> None:
        if not isinstance(name, str):
            raise InvalidOptionError(f"site must be a site name from {self.smap.names}; got {name!r}.")
        self._site.value = self.smap[name].name  # an unknown name raises with the nearest ones

    @property
    def group(self) -> str:
        """``"own"`` (the site's intertwiner group) or a registry name such as ``"orthogonal"``."""
        return self._group.value

    @group.setter
    def group(self, name: str) -> None:
        key = check_option("group", name.lower() if isinstance(name, str) else name, ["own", *GROUP_NAMES])
        key = GROUP_ALIASES.get(key, key)
        if key not in [v for _, v in self._group.options]:
            self._group.options = [*self._group.options, (key, key)]
        self._group.value = key

    seed = int_control("_seed", "The seed of the random element (same seed, same element).")

    @property
    def sigma(self) -> float:
        """σ of the log-normal scalings of a scaled-permutation group."""
        return self._sigma.value

    @sigma.setter
    def sigma(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= self._sigma.max:
            raise InvalidOptionError(f"sigma must be a number in [0, {self._sigma.max:g}]; got {value!r}.")
        self._sigma.value = float(value)

    unit = int_control("_unit", "The unit (of the original model) whose top examples are shown.")

    @property
    def result(self) -> Optional[ExplorerResult]:
        """The last finished Apply (None before the first)."""
        return self._result

    @property
    def new_model(self) -> Optional[nn.Module]:
        """The transformed model of the last Apply."""
        return self._new_model

    @property
    def examples_text(self) -> str:
        """What the examples panel shows as HTML (token contexts, the shift summary)."""
        return shown_text(self.examples)

    # ------------------------------------------------------------------ actions
    def apply(self, wait: bool = True) -> Optional[ExplorerResult]:
        """Transform the model at the current site with a random element; returns the result (None if cancelled).

        ``wait=False`` runs in a worker thread (what the Apply button does) and returns at once;
        ``wait()`` joins it, ``cancel()`` stops it at the next step or batch.
        """
        if self.job.running:
            raise WorkbenchError("a run is already in progress; wait() for it or cancel() it first.")
        self._rescore_if_changed(full=True)
        site = self.smap[self.site]
        group = None if self.group in ("own", site.group.name) else self.group
        seed, sigma = self.seed, self.sigma  # read now: the controls may change while a worker runs
        self._applied = self._settings()
        return self._launch(lambda check: explore(self.model, site, group, seed, sigma, self.inputs, self.before[site.name],
                                                  verify_examples=self.verify_examples, batch_size=self.batch_size,
                                                  k=self.k, check=check, before_min=self.before_min[site.name]), wait)

    def _done(self, value) -> None:
        self._result, self._new_model = value
        self.message.value = f"<i>done in {self.job.seconds:.2f} s</i>"
        self.badge.value = badge_html(self._result.passed) + html.escape(self._result.evidence())
        self._draw_heatmap()
        self._draw_examples()
        if self._settings() != self._applied:  # a control moved while the worker ran: this is not its result
            self._mark_stale()

    def _settings(self) -> tuple:
        return self.site, self.group, self.seed, self.sigma

    def _mark_stale(self) -> None:
        if self._result is not None:
            self.message.value = "<i>settings changed — Apply to update</i>"

    def _on_site(self) -> None:
        site = self.smap[self.site]
        self._unit.max = site.n - 1
        writers = ", ".join(f"{p.name}{self._module_type(p.name)}" for p in site.writers)
        readers = ", ".join(f"{p.name}{self._module_type(p.name)}" for p in site.readers)
        kind = "privileged basis (only permutations and scalings)" if site.privileged else "continuous group"
        self.site_info.value = (f"<span style='font-size:12px'>site <b>{html.escape(site.name)}</b>: {site.n} units after "
                                f"{html.escape(site.activation)}, group <b>{html.escape(site.group.describe())}</b> — {kind}; "
                                f"written by {html.escape(writers or 'nothing')}; read by {html.escape(readers or 'nothing')}"
                                f"</span>")
        self._mark_stale()
        self._draw_examples()

    def _module_type(self, name: str) -> str:
        """`` (Conv2d)`` for a module path of a plain model; nothing for TransformerLens hook points."""
        module = self._modules.get(name)
        kind = type(module).__name__ if module is not None else ""
        return f" ({kind})" if kind and kind != "HookPoint" else ""

    # ------------------------------------------------------------------ figures
    def _draw_heatmap(self) -> None:
        r = self._result
        matched = r.matched_correlation.abs().mean().item()
        self.heatmap.children = [
            self._heatmap_panel(r.correlation.numpy(), "same", "correlation, same index", "original unit"),
            self._heatmap_panel(r.correlation[:, r.matching.perm].numpy(), "matched",
                                f"matched order: mean |r| on the diagonal {matched:.3f}", "original unit (matched)"),
            widgets.HTML(colour_bar_html("RdBu_r", -1, 1, "Pearson r"))]

    def _heatmap_panel(self, values, which: str, title: str, xlabel: str, size: int = 220) -> widgets.VBox:
        """One heatmap whose cells are clickable: a click shows that column's original unit below."""
        from ipyevents import Event

        rows, cols = values.shape
        height = max(8, round(size * rows / max(cols, 1)))
        image = widgets.Image(value=png_bytes(coloured(values, "RdBu_r", -1.0, 1.0)), format="png",
                              layout=widgets.Layout(width=f"{size}px", height=f"{height}px", border="1px solid #ccc"))
        image.add_class("wb-pixelated")
        event = Event(source=image, watched_events=["click"], prevent_default_action=True)
        event.on_dom_event(lambda e, which=which, shape=(rows, cols): self.click_cell(which, *_cell(e, shape)))
        self._events = [*getattr(self, "_events", [])[-3:], event]  # keep the listeners alive with their image
        label = widgets.HTML(f"<div style='writing-mode:vertical-rl;transform:rotate(180deg);font-size:12px'>"
                             f"transformed unit (0–{rows - 1})</div>")
        return widgets.VBox([widgets.HTML(f"<div style='font-size:13px'><b>{html.escape(title)}</b></div>"),
                             widgets.HBox([label, image]),
                             widgets.HTML(f"<div style='font-size:12px;text-align:center'>{html.escape(xlabel)} "
                                          f"(0–{cols - 1}) · click a cell to see that unit</div>")],
                            layout=widgets.Layout(margin="0 14px 0 0"))

    def click_cell(self, which: str, row: int, col: int) -> int:
        """What a click on heatmap cell ``(row, col)`` does: show the top examples of the cell's original unit
        (``which``: ``"same"`` — columns are original units — or ``"matched"``, columns in matched order).
        Returns that unit."""
        r = self._result
        check_option("which", which, ["same", "matched"])
        if r is None or not (0 <= row < r.correlation.shape[0] and 0 <= col < r.correlation.shape[1]):
            raise InvalidOptionError(f"cell ({row}, {col}) is outside the heatmap (or nothing was applied yet).")
        unit = col if which == "same" else int(r.matching.perm[col])
        self.unit = unit
        return unit

    def _example_rows(self) -> list[tuple[str, torch.Tensor, nn.Module, int]]:
        """``(title, example indices, model, unit)`` for each row of the examples panel."""
        u, site = self.unit, self.site
        rows = [(f"original model, unit {u}", self.before[site][:, u].topk(min(self.k, len(self.inputs))).indices,
                 self.model, u)]
        r = self._result
        if r is not None and r.site == site:
            v = int((r.matching.perm == u).nonzero()[0])  # the transformed unit matched to original unit u
            same = r.shift.overlap_same_index[u].item()
            matched = r.shift.overlap_matched[v].item()
            rows += [(f"transformed, same index {u} (top-{r.shift.k} overlap {same:.2f})", r.shift.top_after[u],
                      self._new_model, u),
                     (f"transformed, unit {v} matched to {u} (overlap {matched:.2f}, r = {r.correlation[v, u]:+.3f})",
                      r.shift.top_after[v], self._new_model, v)]
        return rows

    def _draw_examples(self) -> None:
        if not self.job.running:  # (a running Apply reads the scores; it redraws when it ends)
            self._rescore_if_changed(full=False)
        rows = self._example_rows()
        kind = kind_of(self.inputs)
        bundles = []
        if kind == "tokens":
            site = self.smap[self.site]
            traced = [(t, self.inputs[i], unit_traces(m, site, self.inputs[i], u), [self.captions[j] for j in i.tolist()])
                      for t, i, m, u in rows]
            bundles.append(html_bundle(token_contexts_html(traced, self.vocab)))
        else:
            items = [(t, self.inputs[i], [self.captions[j] for j in i.tolist()]) for t, i, _, _ in rows]
            bundles.append(html_bundle(example_rows_html(items, kind)))
        if self._result is not None and self._result.site == self.site:
            bundles.append(html_bundle(f"<p style='font-size:12px'>{html.escape(self._result.shift.summary())}</p>"))
        show(self.examples, bundles)
