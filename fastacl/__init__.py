"""fastacl: fast, trustworthy adversarial contrastive learning (ACL, DynACL, AIR, RCS).

    fastacl.train(method="acl", epochs=5)                  # fastacl.train.train
    fastacl.evaluate("runs/acl/checkpoint.pt", max_test=500)  # fastacl.finetune.evaluate
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

from fastacl import ops  # noqa: E402
from fastacl import train as _train_module  # noqa: E402  (stdlib + torch only at import time)


class _CallableModule(_types.ModuleType):
    """`fastacl.train` is both the submodule and, called, its `train` function.

    A package attribute cannot be a function named like a submodule: importing the submodule
    (`import fastacl.train`, `from fastacl.train import TrainConfig`) rebinds the name to the
    module. So the module itself is made callable.
    """

    def __call__(self, *args, **kwargs):
        return self.train(*args, **kwargs)


_sys.modules["fastacl.train"].__class__ = _CallableModule
train = _train_module


def __getattr__(name):
    # Imported on first use: evaluation pulls in pyautoattack and the models.
    if name == "evaluate":
        from fastacl.finetune import evaluate

        return evaluate
    if name == "TrainConfig":
        return _train_module.TrainConfig
    raise AttributeError(f"module 'fastacl' has no attribute {name!r}")


__all__ = ["TrainConfig", "__version__", "evaluate", "ops", "train"]
