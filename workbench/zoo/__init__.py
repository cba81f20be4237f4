"""Small trained models that ship with the package (``workbench/zoo/weights``, package data), and the recipes that make them.

``wb.zoo.list()`` shows them with their numbers; ``wb.zoo.load(name, seed=0)`` returns one in eval
mode; ``python -m workbench.zoo.train NAME --seed S`` regenerates one.
"""
from ._architectures import BasicBlock, BasicBlockA, Bottleneck, ResNet, ResNet20, mlp, myrtle, resnet18
from ._recipes import RECIPES, Recipe
from ._registry import ZooIntegrityError, load, read_manifest, zoo_dir
from ._registry import list_models as list  # noqa: A001  (the documented verb is wb.zoo.list())

__all__ = ["BasicBlock", "BasicBlockA", "Bottleneck", "ResNet", "resnet18", "RECIPES", "Recipe", "ResNet20", "ZooIntegrityError", "list", "load", "mlp", "myrtle",
           "read_manifest", "zoo_dir"]
