"""`python -m mmm.serve ckpt=<folder|.ckpt|hub id> port=8765`: start the worker processes (each
loads the model once), then serve the API and the studio with uvicorn (see configs/serve.yaml).
Bad settings (an exposed host without a token, a missing checkpoint, the serve extra not
installed) fail before the model is loaded."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mmm.config import at_least, check_section
from mmm.model.pretrained import checkpoint_location
from mmm.serve.settings import Settings


@dataclasses.dataclass
class ServeConfig(Settings):
    """configs/serve.yaml: the server's settings plus which model to load and how."""

    ckpt: str = ""
    device: str = "cpu"
    num_threads: int | None = dataclasses.field(default=None, metadata=at_least(1))
    max_bar_tokens: int | None = dataclasses.field(default=None, metadata=at_least(1))
    compile: bool = False
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    def check(self) -> None:
        super().check()
        if not self.ckpt:
            raise ValueError("ckpt is empty: give ckpt=<checkpoint folder|.ckpt|hub id>")


def model_card(ckpt: str) -> dict[str, Any]:
    """What /v1/info says about the checkpoint beyond its sizes: its name (never a server path),
    the training summary and licence that a checkpoint folder's config.json may hold."""
    path = Path(ckpt)
    card: dict[str, Any] = {"checkpoint": path.name if path.exists() else ckpt}
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        card.update({k: data[k] for k in ("training", "license") if k in data})
    return card


def serve(cfg: Mapping[str, Any]) -> None:
    cfg = check_section("serve", cfg, ServeConfig)
    checkpoint_location(cfg.ckpt)  # a missing folder fails before the extra is even imported
    try:
        import uvicorn

        from mmm.serve.app import create_app
    except ImportError as err:
        raise ValueError(
            f'the server needs the serve extra ({err.name} is missing): pip install -e ".[serve]"'
        ) from None
    settings = Settings(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Settings)})
    ckpt = cfg.ckpt
    from mmm.generation.api import MMM

    options = {k: getattr(cfg, k) for k in ("num_threads", "max_bar_tokens") if getattr(cfg, k) is not None}
    # Each worker process loads the checkpoint itself; the workers that only read and check
    # uploads never run the model: on the CPU, uncompiled.
    generate = functools.partial(MMM.from_pretrained, ckpt, device=cfg.device, compile=cfg.compile, **options)
    check = functools.partial(MMM.from_pretrained, ckpt, **options)
    app = create_app(generate, settings, model_card(ckpt), checks_model=check)
    try:
        app.state.server.start()
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    print(f"MMM studio: http://{settings.host}:{settings.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=cfg.log_level)


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../../configs", config_name="serve", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        try:
            serve(cfg)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    _run()


if __name__ == "__main__":
    main()
