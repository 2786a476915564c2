"""Config helpers shared by the entry points: plain containers and strict key checks."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def _slug(path: str) -> str:
    """A store name for a folder: readable basename + hash of the absolute path."""
    import hashlib
    import re
    from pathlib import Path

    resolved = Path(path).expanduser().resolve()
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", resolved.name) or "root"
    return f"folder-{base}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:6]}"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mmm.slug"):
        OmegaConf.register_new_resolver("mmm.slug", _slug)


register_resolvers()


def plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain python (resolved); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def require_keys(where: str, cfg: Mapping, allowed: Iterable[str], required: Iterable[str] | None = None) -> None:
    """Fail on unknown keys (naming the closest allowed key) and on missing required keys."""
    allowed = set(allowed)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        raise ValueError(f"unknown config key(s): {', '.join(hints)}. Allowed: {', '.join(sorted(allowed))}")
    missing = sorted(set(allowed if required is None else required) - set(cfg))
    if missing:
        raise ValueError(f"missing config key(s): {', '.join(f'{where}.{k}' for k in missing)}")
