"""How training writes and reads its Lightning `.ckpt` files (set on the trainer by `mmm.train`).

Lightning's own `TorchCheckpointIO` pickles the checkpoint into memory, writes it to a file in
the system temp folder and moves it into place: across filesystems that move is a copy over the
target, so a disk filling up mid-copy truncates the previous good `last.ckpt`, and the whole
checkpoint must also fit in `/tmp`. Here it is written beside its target by `mmm.files.atomic.atomic_write`
and read by `mmm.model.pretrained.load_checkpoint_file`, which never runs code from the file; a remote
one (`ckpt_path=https://...`, `s3://...`) is read by Lightning with `weights_only=True` too.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmm.files.atomic import atomic_write
from mmm.model.pretrained import SAFE_GLOBALS, globals_named_in, load_checkpoint_file, unsafe_checkpoint


def _save(checkpoint: dict[str, Any], path: Path) -> None:
    # Through a Python file: torch.save to a path writes with a C++ stream whose failure
    # ("iostream error") loses the OS error, so a full disk could not be told apart.
    with open(path, "wb") as f:
        torch.save(checkpoint, f)


class MMMCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's way
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: _save(checkpoint, tmp))

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """`weights_only=False` (`trust_checkpoint=true`) is the opt-in for a trusted file
        holding more than plain data."""
        trusted = weights_only is False
        if "://" not in str(path):
            if not Path(path).is_file():
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
            return load_checkpoint_file(path, trusted=trusted, map_location=map_location)
        if trusted:
            return super().load_checkpoint(path, map_location, weights_only=False)
        # Lightning would unpickle everything from an http(s) URL (weights_only=None means False
        # there): only the explicit opt-in above does that here.
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return super().load_checkpoint(path, map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise unsafe_checkpoint(path, globals_named_in(e)) from None
