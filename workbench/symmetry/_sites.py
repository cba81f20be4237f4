"""What a symmetry map is made of: sites, the ports (weights) that write and read them, the hook
points where they are observed, and the map itself. The same types whichever backend built them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .._errors import UnknownNameError, nearest
from .._report import Report, new_axes
from ..groups import Group

@dataclass(frozen=True)
class Observation:
    """A hook point where a site's activation can be read: module output, which call, at which level."""

    name: str
    call: int
    level: str  # "prebn"/"perm": moved by the permutation part; "pre": by M; "post": by φ(M); "dual": by M⁻ᵀ
    block: int = 1  # features per channel when the value is flattened channel-major
    axis: int = -1  # transformers: the axis the element acts on
    heads: Optional[tuple] = None  # transformers: only these indices of the head axis (-2) move


@dataclass(frozen=True)
class Port:
    """A parameterised module touching a site: ``level``/``block`` describe the tensor at its side.

    A writer whose output only a BatchNorm reads has level ``"prebn"`` and names that ``norm``.
    """

    name: str
    level: str
    block: int = 1
    norm: Optional[str] = None
    axis: int = 0  # transformers: the axis of the (canonical, per-head) weight that moves
    heads: Optional[tuple] = None  # transformers: only these heads (axis 0) move


@dataclass
class Site:
    """A hidden space of a model on which a group acts without changing the function.

    ``writers`` map into the space (their rows move by M), ``readers`` read from it (their columns
    move by φ(M)⁻¹), ``norms`` are BatchNorms inside it (permuted; on their output, scalings go on
    γ and β). ``hook_name`` is where its activation is best observed.
    """

    name: str
    n: int
    group: Group
    activation: str
    hook_name: str
    writers: list[Port]
    readers: list[Port]
    norms: list[tuple[str, str]]  # (BatchNorm name, "output" | "input")
    observed: list[Observation]
    notes: list[str] = field(default_factory=list)
    affine: bool = False  # uses the affine extension (offsets absorbed by readers' biases)
    # Zero-padding shortcuts: (site embedded or None, first channel, channels, level) — on those
    # channels this site's element is the embedded site's element (identity when it is no site).
    embeds: list[tuple[Optional[str], int, int, str]] = field(default_factory=list)
    # BatchNorms reading the site ("input" norms): the level of what they read ("pre", or "post": φ(M) moves it)
    norm_levels: dict = field(default_factory=dict)

    @property
    def privileged(self) -> bool:
        """True when every symmetry maps neurons to neurons (no continuous part)."""
        return not self.group.continuous

    def __repr__(self) -> str:
        return f"Site({self.name!r}, n={self.n}, group={self.group.name}, activation={self.activation})"


@dataclass(repr=False)
class SymmetryMap(Report):
    """The sites of a model and the places that are not sites, with the reason."""

    model: str
    sites: list[Site]
    skipped: list[tuple[str, str]]  # (place, reason)
    trace_error: Optional[str] = None  # why the model could not be traced or run on the example, if so

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name) -> Site:
        if isinstance(name, int):
            return self.sites[name]
        # An index by name, built once per list of sites (a transform looks every site up three times: the
        # search took 28 ms of ViT-B/16's); a changed list (another object or length) rebuilds it.
        key = (id(self.sites), len(self.sites))
        index = self.__dict__.get("_index")
        if index is None or index[0] != key:
            by_name: dict = {}
            for i, s in enumerate(self.sites):
                by_name.setdefault(s.name, i)
                by_name.setdefault(s.hook_name, i)
            index = self.__dict__["_index"] = (key, by_name)
        i = index[1].get(name)
        if i is not None and name in (self.sites[i].name, self.sites[i].hook_name):
            return self.sites[i]
        for s in self.sites:
            if s.name == name or s.hook_name == name:
                return s
        close = nearest(str(name), [s.name for s in self.sites])
        raise UnknownNameError(f"no site named {name!r} in this symmetry map ({len(self.sites)} sites)."
                               + (f" Nearest: {close}." if close else ""))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def summary(self) -> str:
        cont = sum(not s.privileged for s in self.sites)
        return (f"{self.model}: {_count(len(self.sites), 'site')} ({cont} with a continuous group), "
                f"{_count(len(self.skipped), 'place')} skipped")

    def to_frame(self):
        import pandas as pd

        rows = [(s.name, s.n, s.group.name, s.group.label or "", _phi(s.group), s.activation, s.privileged,
                 ", ".join(p.name for p in s.writers), ", ".join(p.name for p in s.readers), "; ".join(s.notes))
                for s in self.sites]
        return pd.DataFrame(rows, columns=["site", "n", "group", "label", "phi", "activation", "privileged",
                                           "writers", "readers", "notes"])

    def skipped_frame(self):
        import pandas as pd

        return pd.DataFrame(self.skipped, columns=["place", "reason"])

    def _repr_html_(self) -> str:
        """The summary, then the sites grouped by layer (one collapsible table per layer, with counts, when
        there are many), then the places skipped with why (collapsed)."""
        import html

        def row(site: Site) -> str:
            cells = [site.name, site.n, site.group.name, site.activation, "yes" if site.privileged else "no",
                     _names(site.writers), _names(site.readers), "; ".join(site.notes)]
            # The group's label (its mathematics; a host's blocks, which its name {family}_per_block does not say)
            # on hover, as to_frame's "label" column and the explorer's site line give it.
            tips = {2: site.group.label or ""}
            return "<tr>" + "".join(f"<td{_title(tips.get(i))}>{html.escape(str(c))}</td>"
                                    for i, c in enumerate(cells)) + "</tr>"

        head = "".join(f"<th>{h}</th>" for h in ("site", "n", "group", "activation", "privileged", "writers",
                                                  "readers", "notes"))
        layers: dict[str, list[Site]] = {}
        for site in self.sites:
            layers.setdefault(_layer_of(site.name), []).append(site)
        table = lambda sites: f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(map(row, sites))}</tbody></table>"  # noqa: E731
        if len(self.sites) <= 12:
            body = table(self.sites)
        else:
            body = "".join(
                f"<details><summary><b>{html.escape(layer)}</b>: {_count(len(sites), 'site')} — {html.escape(_counts(sites))}"
                f"</summary>{table(sites)}</details>" for layer, sites in layers.items())
        skipped = ""
        if self.skipped:
            rows = "".join(f"<tr><td>{html.escape(p)}</td><td>{html.escape(r)}</td></tr>" for p, r in self.skipped)
            skipped = (f"<details><summary>Skipped: {_count(len(self.skipped), 'place')}, each with the reason</summary>"
                       f"<table><thead><tr><th>place</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
                       f"</details>")
        return f"<div><p><b>SymmetryMap</b> — {html.escape(self.summary())}</p>{body}{skipped}</div>"

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax)
        frame = self.to_frame()
        sns.barplot(data=frame, x="site", y="n", hue="group", dodge=False, ax=ax)
        ax.set_ylabel("dimension")
        ax.set_title("sites and their groups")
        ax.tick_params(axis="x", rotation=60)
        return ax


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _title(text) -> str:
    """`` title="…"`` (escaped) for an HTML cell whose hover text is ``text``; nothing for none."""
    import html

    return f' title="{html.escape(text)}"' if text else ""


def _names(ports: list, shown: int = 3) -> str:
    """``a, b, c (+5 more)``: long port lists (a residual stream has dozens) stay one line."""
    names = list(dict.fromkeys(p.name for p in ports))
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def _layer_of(site: str) -> str:
    """The layer a site belongs to, for grouping: ``blocks.2.attn.qk.0`` → ``blocks.2``, ``layer1.0.relu``
    → ``layer1``, a top-level module → ``top level``."""
    parts = site.split(".")
    if len(parts) >= 2 and parts[1].isdigit() and not parts[0].isdigit():
        return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
    return parts[0] if len(parts) > 1 else "top level"


def _counts(sites: list) -> str:
    from collections import Counter

    return ", ".join(f"{n} × {g}" for g, n in Counter(s.group.name for s in sites).most_common())


def _phi(group: Group) -> str:
    phi = group.phi
    return "M" if phi == "identity" else ("abs(M)" if phi == "abs" else f"M^⊙{phi[1]}")
