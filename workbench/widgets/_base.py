"""Plumbing shared by the widgets: figures into ``ipywidgets.Output``, and cancellable work with progress.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot: nothing is shown twice by the
inline backend, and drawing from a worker thread is safe) and put into an ``Output`` by setting its
``outputs`` in one assignment, which works from any thread and outside a kernel (the tests).

Speed decides the style here: every click must answer in well under a second on a busy 2-core
machine, so figures use fixed margins (constrained layout measured every tick label and cost more
than the computation) and a few rc settings close to seaborn's "whitegrid" (importing seaborn pulls
in scipy.stats, seconds on a loaded machine, for a style).
"""
from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any, Callable, Optional, Sequence

import ipywidgets as widgets

from .._errors import InvalidOptionError, WorkbenchError
from ._compute import Cancelled, Check


# At the 80 dpi the panels are drawn at, 10 pt is about 11 px on screen: no text smaller than that.
STYLE = {"axes.edgecolor": "#cccccc", "axes.facecolor": "white", "axes.grid": False, "font.size": 10,
         "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 10, "ytick.labelsize": 10,
         "axes.spines.top": False, "axes.spines.right": False}


def render(draw: Callable, size: tuple[float, float], dpi: int = 80) -> dict:
    """A PNG output bundle of ``draw(fig)`` on a fresh figure; ``draw`` places its own axes."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=size)
        draw(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": "<figure>"}}


def html_bundle(text: str) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {"text/html": text, "text/plain": text}}


def show(output: widgets.Output, bundles: Sequence[dict]) -> None:
    """Replace what ``output`` shows with ``bundles`` (from :func:`render` / :func:`html_bundle`)."""
    output.outputs = tuple(bundles)


def shown_text(output: widgets.Output) -> str:
    """The HTML/plain text an ``Output`` shows (for reading a widget's state from code)."""
    return "\n".join(o["data"].get("text/html", "") for o in output.outputs if "data" in o)


def error_html(exc: BaseException) -> str:
    import html

    return f"<span style='color:#cf222e'><b>{type(exc).__name__}</b>: {html.escape(str(exc))}</span>"


def checked_int(param: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high)``, or an :class:`InvalidOptionError` that says what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{param} must be an int; got {value!r} ({type(value).__name__}).")
    if value < low or (high is not None and value >= high):
        allowed = f"{low} <= {param} < {high}" if high is not None else f"{param} >= {low}"
        raise InvalidOptionError(f"{param}={value} is out of range; expected {allowed}.")
    return int(value)


def int_control(attr: str, doc: str) -> property:
    """A property for the int value of the bounded widget ``self.<attr>``, range-checked with a clear error."""
    param = attr.lstrip("_")

    def get(self) -> int:
        return getattr(self, attr).value

    def set(self, value: int) -> None:
        control = getattr(self, attr)
        control.value = checked_int(param, value, control.min, control.max + 1)

    return property(get, set, doc=doc)


class Job:
    """Runs one piece of work at a time, inline or in a worker thread, with steps on a progress bar.

    The work is ``fn(check)``; it calls ``check("step")`` when it starts a step (the bar advances) and
    ``check(None)`` between batches. ``cancel()`` makes the next ``check`` raise :class:`Cancelled`.
    A worker thread keeps the kernel free, so the Cancel button's click is heard while it runs.
    """

    def __init__(self, steps: Sequence[str]):
        self.steps = list(steps)
        self.bar = widgets.IntProgress(value=0, min=0, max=len(self.steps), description="",
                                       layout=widgets.Layout(width="160px", visibility="hidden"))
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.seconds = 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cancel(self) -> None:
        self._cancel.set()

    def _check(self, step: Optional[str]) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user; nothing was changed.")
        if step is not None:
            self.bar.value = self.steps.index(step) + 1
            self.bar.description = step

    def start(self, fn: Callable[[Check], Any], done: Callable[[Any, Optional[BaseException]], None],
              background: bool) -> None:
        """Run ``fn`` and then ``done(value, error)``; inline (errors other than Cancelled re-raised) or in a thread."""
        if self.running:
            raise WorkbenchError("work is already running; wait for it or cancel it first.")
        self._cancel.clear()
        self.bar.value, self.bar.layout.visibility = 0, "visible"

        def body():
            start, value, error = time.perf_counter(), None, None
            try:
                value = fn(self._check)
            except BaseException as exc:  # reported by done(); inline runs re-raise below
                error = exc
            self.seconds = time.perf_counter() - start
            self.bar.layout.visibility = "hidden"
            done(value, error)
            return error

        if background:
            self._thread = threading.Thread(target=body, name="workbench-widget", daemon=True)
            self._thread.start()
            return
        error = body()
        if error is not None and not isinstance(error, Cancelled):
            raise error

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class BackgroundAction:
    """The one action of a widget that runs as a :class:`Job`: start it from code or a click,
    cancel it, wait for it, and report how it ended.

    The widget has ``job``, ``message``, ``cancel_button``, ``_result``, ``_cancelled`` and the button
    named by ``action_button``; it implements ``_done(value)`` for a finished run.
    """

    action_button = "apply_button"

    def _launch(self, work: Callable, wait: bool):
        if self.job.running:
            raise WorkbenchError("a run is already in progress; wait() for it or cancel() it first.")
        getattr(self, self.action_button).disabled, self.cancel_button.disabled = True, False
        self.message.value = "<i>running…</i>"
        self.job.start(work, self._finish, background=not wait)
        return None if (not wait or self._cancelled) else self._result

    def _clicked(self, action: Callable) -> None:
        try:
            action(wait=False)
        except Exception as exc:  # a click has no caller to raise to: show it
            self.message.value = error_html(exc)

    def cancel(self) -> None:
        """Stop a running action at its next step; nothing from it is kept."""
        self.job.cancel()

    def wait(self, timeout: Optional[float] = None):
        """Wait for a background run to finish; returns the current result."""
        self.job.wait(timeout)
        return self._result

    def _finish(self, value, error: Optional[BaseException]) -> None:
        getattr(self, self.action_button).disabled, self.cancel_button.disabled = False, True
        self._cancelled = isinstance(error, Cancelled)
        if error is not None:
            self.message.value = "<i>cancelled — nothing changed</i>" if self._cancelled else error_html(error)
            return
        self._done(value)
