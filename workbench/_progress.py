"""One progress convention for every long call: ``progress=None | True | False``.

- ``None`` (the default of every verb): a bar in a Jupyter kernel, none anywhere else — a script, a
  test or a terminal IPython stays quiet, as it always has;
- ``True``: a ``tqdm.auto`` bar (a widget in a notebook, text on stderr elsewhere) with a total where
  the work has one;
- ``False``: no bar.

Every verb that takes ``progress=`` draws its bar with :func:`progress_bar`, so they all behave alike.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

import numpy as np

from ._errors import InvalidOptionError

#: what ``progress=`` accepts everywhere
ProgressLike = Optional[bool]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (an IPython shell with a ``kernel``).

    IPython is looked up in ``sys.modules``, never imported: a kernel has always imported it, and
    importing it here would cost a script ~0.3 s for nothing.
    """
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    if get is None:
        return False
    try:
        shell = get()
    except Exception:  # a half-initialised or mocked IPython is not a kernel
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def show_progress(progress: ProgressLike, param: str = "progress") -> bool:
    """Whether ``progress`` asks for a bar here: None → :func:`in_notebook`, a bool → itself."""
    if progress is None:
        return in_notebook()
    if isinstance(progress, (bool, np.bool_)):
        return bool(progress)
    raise InvalidOptionError(f"{param}={progress!r} is not a progress setting: pass True (a bar), False (none) "
                             f"or None (a bar in a Jupyter notebook only, the default).")


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str,
                 progress: ProgressLike = None, unit: str = "it", leave: bool = True):
    """A ``tqdm.auto`` bar over ``iterable`` (or a bar to ``update`` by hand), shown as ``progress`` says.

    ``total`` defaults to ``len(iterable)`` where it has one. A hidden bar is tqdm's own disabled bar:
    it writes nothing and iterates at full speed, so callers use the same code either way.
    """
    from tqdm.auto import tqdm  # ~50 ms; only the verbs that report progress pay it

    show = show_progress(progress)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not show)
