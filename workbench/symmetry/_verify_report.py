"""``wb.verify``'s report: the verdict, the comparison's rule and figures, and each site's check."""
from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass, field
from typing import Optional

from .._report import Report, new_axes


def rows_text(n: int) -> str:
    """'1 row', '48 rows'."""
    return f"{n} row{'' if n == 1 else 's'}"


@dataclass
class SiteCheck:
    site: str
    group: str
    equivariance_error: float  # max over observations of ‖h' − F h − c‖ / max(‖h‖, ‖F h‖)
    representation_change: float  # max over observations of ‖h' − h‖ / max(‖h‖, ‖F h‖)
    observations: int  # hook points compared; 0: the site was not checked
    # the site's own tolerance where the model's rounding raised the report's: 10× the rounding of the site's own
    # activations (float32 against float64), at least the dtype's; None: the report's ``tolerance``
    tolerance: Optional[float] = None


@dataclass(repr=False)
class InvarianceReport(Report):
    """Output agreement of two models and, per site, equivariance and how far activations moved.

    The verdict (:attr:`verdict`) is ``"PASS"`` (the function is unchanged under :attr:`rule`, and
    every checked site moved as its element says), ``"FAIL"``, or ``"NOT CHECKED"`` (the outputs
    agree but no site was checked: no transform, or nothing of it observable — not a pass).
    """

    max_abs_diff: float
    max_rel_diff: float  # the largest |new − old| / scale over all elements (the scale: see ``rule``)
    top1_agreement: Optional[float]
    tolerance: float
    dtype: str
    sites: list[SiteCheck] = field(default_factory=list)
    compared: str = "outputs"  # or "log-probabilities" (decoders), "encoder outputs" (BERT), "last hidden states" (a base
    # model), "pooled outputs" (CLIP's vision tower with its projection, in the new basis), "embeddings" (its image_embeds),
    # "pooler outputs" (a BERT-like base model's pooler), or the name of another field of a ModelOutput (a "loss") where
    # that field disagreed
    kl: Optional[float] = None  # mean KL(p ‖ p') per position, for log-probabilities
    # the rounding floor measured when the strict check failed (``rule`` says whether it raised the tolerance):
    # a float64 model whose norms compute in float32 (largest absolute change), or a float32 model against
    # its float64 copy (largest relative change)
    floor: Optional[float] = None
    rule: str = ""  # the comparison rule, in words
    worst: Optional[dict] = None  # the element with the largest relative difference: index, old, new, scale
    top1_disagreements: int = 0  # rows whose top-1 differs by more than a float tie
    not_checked: list = field(default_factory=list)  # (site, why) for sites of the transform not checked
    finite: bool = True  # every output of the new model is finite where the original's is
    # every output of the original model is 0 on these inputs (torchvision starts a ViT's head at zero):
    # the outputs agree whatever the transform did, and only the site checks say anything
    outputs_zero: bool = False
    # a mixture of experts' top-k choices (tokens) at ties within rounding where the original was evaluated with the new
    # model's choice (symmetry/_verify_routing.py): either choice evaluates the same function at its discontinuity
    routing_ties: int = 0
    # output units whose difference exceeds their own tolerance: 10× the unit's own rounding (or the dtype's tolerance),
    # where the model's rounding raised :attr:`tolerance` (which then bounds every unit's; ``rule`` says so)
    units_beyond_rounding: int = 0
    # what the verdict was judged on: the inputs given (the batch's first axis; None for inputs of another form), and
    # the rows of the outputs compared (a decoder's: every position of every input). A PASS says the function agrees on
    # these, not everywhere
    inputs: Optional[int] = None
    rows: Optional[int] = None
    # the other fields the models return (a loss, a mixture's aux_loss) beyond their tolerance: (name, max relative
    # change, its tolerance). Where the outputs agree, the first heads the report (:attr:`compared`, the figures)
    fields_beyond: list = field(default_factory=list)

    @property
    def function_preserved(self) -> bool:
        return (self.finite and self.max_rel_diff <= self.tolerance and self.top1_disagreements == 0
                and self.units_beyond_rounding == 0)

    def site_tolerance(self, s: SiteCheck) -> float:
        """The tolerance ``s`` is judged against: its own where rounding raised it, else :attr:`tolerance`."""
        return self.tolerance if s.tolerance is None else s.tolerance

    @property
    def equivariant(self) -> bool:
        return all(s.equivariance_error <= self.site_tolerance(s) for s in self.sites)

    @property
    def checked(self) -> list[SiteCheck]:
        """The site checks that compared at least one hook point."""
        return [s for s in self.sites if s.observations > 0]

    @property
    def representations_moved(self) -> bool:
        return bool(self.checked) and all(s.representation_change > 100 * self.site_tolerance(s) for s in self.checked)

    @property
    def verdict(self) -> str:
        """``"PASS"``, ``"FAIL"`` or ``"NOT CHECKED"`` (outputs agree, but no site was checked)."""
        if not (self.function_preserved and self.equivariant):
            return "FAIL"
        return "PASS" if self.checked else "NOT CHECKED"

    @property
    def passed(self) -> bool:
        """The function is unchanged and every checked site moved exactly as its element says — with at
        least one site checked (nothing checked is not a pass: see :attr:`verdict`)."""
        return self.verdict == "PASS"

    def summary(self) -> str:
        what = {"log-probabilities": "log-probability", "encoder outputs": "encoder output",
                "last hidden states": "last hidden state", "pooled outputs": "pooled output",
                "embeddings": "embedding", "logits": "logit", "pooler outputs": "pooler output",
                "outputs": "output"}.get(self.compared)
        fields = {name: (rel, tol) for name, rel, tol in self.fields_beyond}
        checked = self.checked
        moved = sum(s.representation_change > 100 * self.site_tolerance(s) for s in checked)
        # An encoder's or a base model's output is the residual stream itself: it moves with the stream's element,
        # and is compared with the original's moved by that element (docs/COVERAGE.md), which the text must say.
        basis = " in the new basis" if self.compared in ("encoder outputs", "last hidden states", "pooled outputs") else ""
        on = ""
        if self.inputs is not None:
            on = f" on the {self.inputs} input{'s' if self.inputs != 1 else ''} given"
            if self.rows is not None and self.rows != self.inputs:
                on += f" ({rows_text(self.rows)})"
        elif self.rows is not None:
            on = f" on the {rows_text(self.rows)} of the given inputs"
        if what is None:  # another field the models return heads the report: the outputs agree (``rule``)
            tol = fields.pop(self.compared, (None, self.tolerance))[1]
            text = (f"{self.verdict}{on}: {self.compared!r} (returned beside the outputs, which agree) changed by "
                    f"{self.max_rel_diff:.2e} relative (tolerance {tol:.1e}, {self.dtype} model)")
        else:
            text = (f"{self.verdict}{on}: max relative {what} difference{basis} {self.max_rel_diff:.2e} (tolerance "
                    f"{self.tolerance:.0e}, {self.dtype})")
        if not self.finite:  # (of the field heading the report, where the outputs agree)
            text += f"; the new model's {'outputs are' if what is not None else repr(self.compared) + ' is'} not finite"
        if self.outputs_zero:
            text += ("; the model's outputs are all 0 on these inputs, so comparing them checks nothing (only the "
                     "sites do): give inputs, or a model, whose outputs are not 0")
        if self.units_beyond_rounding:
            text += (f"; {self.units_beyond_rounding} output unit{'s' if self.units_beyond_rounding > 1 else ''} beyond "
                     f"10× {'their' if self.units_beyond_rounding > 1 else 'its'} own rounding")
        if self.top1_disagreements:
            text += f"; top-1 differs on {self.top1_disagreements} rows beyond float ties"
        elif self.top1_agreement is not None and self.top1_agreement < 1:
            text += f"; top-1 agreement {self.top1_agreement:.3f} (only float ties differ)"
        if self.routing_ties:
            text += (f"; {self.routing_ties} top-k expert choice{'s' if self.routing_ties > 1 else ''} at ties within "
                     f"rounding, where the original was evaluated with the new model's choice")
        if self.worst is not None and not self.function_preserved:
            w = self.worst
            at = f" at {list(w['index'])}" if len(w["index"]) else ""  # (a single number, a loss, has no index)
            text += f"; worst{at}: {w['old']:.4g} → {w['new']:.4g}"
        if fields:
            text += "; also " + ", ".join(f"{name!r} changed by {rel:.2e} relative (tolerance {tol:.1e})"
                                          for name, (rel, tol) in fields.items())
        bad = [s.site for s in checked if s.equivariance_error > self.site_tolerance(s)]
        if bad:
            text += f"; not equivariant at {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}"
        if self.verdict == "NOT CHECKED" or self.not_checked:
            unseen = [s.site for s in self.sites if s.observations == 0]
            why = ("; ".join(f"{s}: {r}" for s, r in self.not_checked[:2])
                   or (f"no activation of {unseen[0]}{' …' if len(unseen) > 1 else ''} can be hooked, e.g. the maps "
                       f"inside one attention module: transform a site that can be, such as the stream after it"
                       if unseen else "no transform given"))
            text += f"; sites checked {len(checked)}/{len(self.sites) + len(self.not_checked)} ({why})"
        return text + f"; representations moved at {moved}/{len(checked)} sites"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([vars(s) for s in self.sites],
                            columns=["site", "group", "equivariance_error", "representation_change", "observations"])

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax)
        frame = self.to_frame().melt(id_vars=["site"], value_vars=["equivariance_error", "representation_change"],
                                     var_name="measure", value_name="relative error")
        frame["relative error"] = frame["relative error"].clip(lower=1e-18)
        sns.barplot(data=frame, x="site", y="relative error", hue="measure", ax=ax)
        ax.set_yscale("log")
        ax.axhline(self.tolerance, color="k", ls="--", lw=1, label=f"tolerance {self.tolerance:.0e}")
        # The whole summary does not fit a title: the verdict and the output difference, wrapped; the
        # legend goes beside the axes, where it covers no bar.
        ax.set_title(textwrap.fill(f"{self.verdict}: max relative output difference {self.max_rel_diff:.1e}, "
                                   f"{len(self.checked)} sites checked", 60), fontsize=11)
        ax.tick_params(axis="x", rotation=60)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        return ax

    def _repr_html_(self) -> str:
        colour = {"PASS": "#1a7f37", "FAIL": "#cf222e"}.get(self.verdict, "#6e7781")
        badge = f"<span style='background:{colour};color:white;padding:1px 6px;border-radius:4px'>{self.verdict}</span>"
        return badge + super()._repr_html_() + f"<p><i>rule: {html.escape(self.rule)}</i></p>"
