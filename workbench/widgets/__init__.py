"""ipywidgets front ends: the intertwiner explorer, the neuron-basis probe and the activation-cache browser.

Each widget is an ``ipywidgets.VBox`` (display it as the last expression of a cell) whose state can
also be set and read from code, which is how the tests drive them.
"""
from ._cache_browser import CacheBrowser
from ._compute import Cancelled, ExplorerResult
from ._explorer import IntertwinerExplorer
from ._probe import NeuronBasisProbe, ProbeReport

__all__ = ["CacheBrowser", "Cancelled", "ExplorerResult", "IntertwinerExplorer", "NeuronBasisProbe", "ProbeReport"]
