"""The server's settings, importable without the serve extra (FastAPI): `python -m mmm.serve`
checks them before anything heavy is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmm.config import at_least, check_fields, within

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # bound to every address: the names clients use are unknown


@dataclass
class Settings:
    """Server settings (configs/serve.yaml holds the same keys with their documentation)."""

    host: str = "127.0.0.1"
    port: int = field(default=8765, metadata=within(0, 65535))
    token: str | None = None
    allow_unauthenticated: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    max_upload_mb: float = field(default=4.0, metadata=at_least(1e-6))
    queue_size: int = field(default=8, metadata=at_least(1))
    keep_jobs: int = field(default=64, metadata=at_least(1))
    max_variations: int = field(default=8, metadata=at_least(1))
    max_new_bars: int = field(default=64, metadata=at_least(1))
    cors_origins: list[str] = field(default_factory=list)
    license: str | None = None
    job_timeout_s: float = field(default=600.0, metadata=at_least(0.1))
    check_timeout_s: float = field(default=30.0, metadata=at_least(0.1))
    check_workers: int = field(default=2, metadata=at_least(1))

    def check(self) -> None:
        check_fields(self)
        if self.host not in LOOPBACK and not self.token and not self.allow_unauthenticated:
            raise ValueError(
                f"host={self.host!r} is reachable from other machines: set token=<a secret> (clients then send "
                "'Authorization: Bearer <token>') or, on a trusted network only, allow_unauthenticated=true"
            )
        if self.host in WILDCARDS and not self.allowed_hosts:
            raise ValueError(
                f"host={self.host!r} answers on every address of this machine: list the names clients reach it "
                "by in allowed_hosts (e.g. allowed_hosts=[studio.lan,192.168.1.20]), or allowed_hosts=['*'] to "
                "accept any Host header"
            )
        for name in self.allowed_hosts:
            if not name.strip() or "/" in name or re.fullmatch(r"[^:]+:\d+", name.strip()):
                raise ValueError(
                    f"allowed_hosts: {name!r} is not a host name; give names or addresses without scheme or port "
                    "(e.g. studio.lan)"
                )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def served_hosts(self) -> set[str] | None:
        """The names a request's `Host` header may carry (lower case, no port), or None for any."""
        names = {h.strip().strip("[]").lower().rstrip(".") for h in self.allowed_hosts}
        if "*" in names:
            return None
        names |= set(LOOPBACK)
        if self.host not in WILDCARDS:
            names.add(self.host.strip("[]").lower())
        return names
