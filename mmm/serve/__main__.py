"""`python -m mmm.serve ckpt=<folder|.ckpt|hub id> port=8765`: load the model once, serve the API
and the studio with uvicorn (see configs/serve.yaml). Bad settings (an exposed host without a
token, a missing checkpoint, the serve extra not installed) fail before the model is loaded."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmm.config import plain, require_keys

KEYS = {"ckpt", "host", "port", "token", "allow_unauthenticated", "cors_origins", "max_upload_mb", "queue_size",
        "keep_jobs", "max_variations", "max_new_bars", "license", "device", "num_threads", "max_bar_tokens",
        "log_level"}


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
    cfg = plain(cfg)
    require_keys("serve", cfg, KEYS, required={"ckpt"})
    try:
        import uvicorn

        from mmm.serve.app import Settings, create_app
    except ImportError as err:
        raise ValueError(f"the server needs the serve extra ({err.name} is missing): pip install -e \".[serve]\"") from None
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: cfg[k] for k in fields if k in cfg})
    settings.check()
    ckpt = str(cfg["ckpt"])
    if not Path(ckpt).exists() and ckpt.count("/") != 1:
        raise ValueError(f"ckpt={ckpt!r}: no such checkpoint folder or file (nor a hub id 'owner/name')")
    from mmm.api import MMM

    options = {k: cfg[k] for k in ("num_threads", "max_bar_tokens") if cfg.get(k) is not None}
    mmm = MMM.from_pretrained(ckpt, device=cfg["device"], **options)
    app = create_app(mmm, settings, model_card(ckpt))
    print(f"MMM studio: http://{settings.host}:{settings.port}/  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=cfg["log_level"])


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
