"""The server's settings, importable without the serve extra (FastAPI): `python -m mmm.serve`
checks them before anything heavy is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmm.config import at_least, check_fields, within

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Settings:
    """Server settings (configs/serve.yaml holds the same keys with their documentation)."""

    host: str = "127.0.0.1"
    port: int = field(default=8765, metadata=within(0, 65535))
    token: str | None = None
    allow_unauthenticated: bool = False
    max_upload_mb: float = field(default=4.0, metadata=at_least(1e-6))
    queue_size: int = field(default=8, metadata=at_least(1))
    keep_jobs: int = field(default=64, metadata=at_least(1))
    max_variations: int = field(default=8, metadata=at_least(1))
    max_new_bars: int = field(default=64, metadata=at_least(1))
    cors_origins: list[str] = field(default_factory=list)
    license: str | None = None

    def check(self) -> None:
        check_fields(self)
        if self.host not in LOOPBACK and not self.token and not self.allow_unauthenticated:
            raise ValueError(
                f"host={self.host!r} is reachable from other machines: set token=<a secret> (clients then send "
                "'Authorization: Bearer <token>') or, on a trusted network only, allow_unauthenticated=true"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
