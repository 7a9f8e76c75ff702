"""Names steer renamed, kept working with a DeprecationWarning: one word per meaning.

    backend=  (patch, StreamState.update)  -> impl=   the kernel implementation: auto | triton | torch
    NeuronSites                            -> NeuronLayout   a model's neuron layout; "site" is only
                                              where an intervention writes (neuron | activation | residual)

"backend" keeps one meaning: the steering path, hooks or fused (`steer.engine.backends`).
"""
from __future__ import annotations

import importlib
import warnings

#: old public name -> (module, new name)
RENAMED = {"NeuronSites": ("steer.core.adapters", "NeuronLayout")}


def renamed_argument(where: str, old: str, old_value, new: str, new_value):
    """The value of a renamed keyword: `new_value`, or `old_value` (with a warning) when the caller
    used the old name."""
    if old_value is None:
        return new_value
    warnings.warn(f"{where}: `{old}=` is renamed `{new}=`", DeprecationWarning, stacklevel=3)
    return old_value


def renamed_attribute(module: str, name: str):
    """Module `__getattr__` body: the object a renamed public name now has, with a warning."""
    if name not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home, new = RENAMED[name]
    warnings.warn(f"{module}.{name} is renamed {new}", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(home), new)
