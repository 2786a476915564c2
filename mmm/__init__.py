"""MMM, the Multi-Track Music Machine. `from mmm import MMM` loads the generation API lazily,
so that `import mmm` stays light (no torch import)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmm.api import MMM

__all__ = ["MMM"]


def __getattr__(name: str) -> Any:
    if name == "MMM":
        from mmm.api import MMM

        return MMM
    raise AttributeError(f"module 'mmm' has no attribute {name!r}")
