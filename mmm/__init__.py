"""MMM, the Multi-Track Music Machine. `from mmm import MMM` loads the generation API lazily,
so that `import mmm` stays light (no torch import)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmm.generation.api import MMM

__all__ = ["MMM"]

# Modules that Hydra configs name in `_target_` and that moved into subpackages: a config written
# before the move (`_target_: mmm.strategies.MMMDeepSpeedStrategy`) still instantiates.
_MOVED = {"strategies": "mmm.training.strategies", "callbacks": "mmm.training.callbacks"}


def __getattr__(name: str) -> Any:
    if name == "MMM":
        from mmm.generation.api import MMM

        return MMM
    if name in _MOVED:
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'mmm' has no attribute {name!r}")
