"""Checkpoint folders (`config.json` + `model.safetensors` + `tokenizer.json`) and loading
from them, from Lightning `.ckpt` files and from DeepSpeed checkpoint directories.

The folder is self-contained: sampling never recomposes the training YAML, and
`miditok.MMM.from_pretrained(folder)` / `MMM(params=folder/"tokenizer.json")` load its tokenizer.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from miditok import MMM as MMMTokenizer
from safetensors.torch import load_file, save_file

from mmm.files.atomic import atomic_write_folder, recover_folder
from mmm.model.config import ModelConfig
from mmm.model.transformer import MMMTransformer
from mmm.tokenizer import TOKENIZER_FILE, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# 2: a bar's header is a BPE word of its own (mmm.tokenizer.bpe_words); a format-1 model reads
# and writes bars whose header merged with their first notes, so its prompts would be foreign to it.
FORMAT_VERSION = 2


def save_pretrained(
    model: MMMTransformer, tokenizer: MMMTokenizer, folder: str | Path, extra: dict | None = None
) -> Path:
    """Write the folder atomically: built in a temp dir beside it, then swapped into place
    (`mmm.files.atomic.atomic_write_folder`: a full disk leaves the previous folder and no partial one)."""
    config = {"mmm_format": FORMAT_VERSION, "model": model.config.to_dict(), **(extra or {})}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / WEIGHTS_FILE))
        tokenizer.save(tmp / TOKENIZER_FILE)

    return atomic_write_folder(folder, write)


# Globals a checkpoint of ours may hold beyond what torch's `weights_only` unpickler always
# accepts (tensors, dtypes, containers, numbers, strings). None today: Lightning's loops,
# optimizer, scheduler and callback states, our hyper-parameters and the sampler position are
# all plain (`torch.serialization.get_unsafe_globals_in_checkpoint` on a trained last.ckpt is
# empty). A type added to a checkpoint later goes here, never a callable.
SAFE_GLOBALS: list[Any] = []


# DeepSpeed's own optimizer-state files hold these (checked on ZeRO-2 and ZeRO-3 checkpoints of
# `trainer=deepspeed_cpu`), and its `zero_to_fp32` unpickles them with weights_only=False: each
# file is scanned first, and anything beyond them is refused.
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint holds something other than data: loading it would run code from the file."""


def unsafe_checkpoint(path: Any, offending: list[str]) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"{path}: refusing to load it: it holds {', '.join(offending) or 'an object that is not plain data'}, "
        "which an mmm checkpoint never holds, and unpickling it could run code from the file. "
        "If you made this file or trust its source, load it with trusted=True "
        "(MMM.from_pretrained(path, trusted=True), `python -m mmm.checkpoint --trusted`, "
        "`python -m mmm.train trust_checkpoint=true`); to share a model, share its checkpoint folder "
        "(model.safetensors), which holds no code."
    )


def globals_named_in(error: pickle.UnpicklingError) -> list[str]:
    """The offending global that torch's weights-only refusal names (it names the first only)."""
    return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def load_checkpoint_file(path: str | Path, *, trusted: bool = False, map_location: Any = "cpu") -> Any:
    """`torch.load` of a `.ckpt`/`.pt` file that never runs code from it: only tensors, plain
    data and `SAFE_GLOBALS` are unpickled. Anything else raises `UnsafeCheckpoint` naming the
    offending types, before any of them is called. `trusted=True` (for a file you made or
    trust) loads everything, as plain `torch.load(weights_only=False)` does."""
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            try:  # every offending global, read from the file without unpickling it
                offending = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # not a zip checkpoint
                offending = globals_named_in(e)
            error = unsafe_checkpoint(path, offending)
            if not offending:
                error.args = (f"{error.args[0]} torch said: {e}",)
            raise error from None


def check_deepspeed_states(folder: Path) -> None:
    """Scan the state files of a DeepSpeed checkpoint's tag folder without unpickling them and
    refuse (`UnsafeCheckpoint`) one holding anything beyond plain data and `DEEPSPEED_GLOBALS`:
    DeepSpeed's resume and its `zero_to_fp32` unpickle them in full (weights_only=False)."""
    for state_file in sorted(folder.glob("*.pt")):
        offending = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(state_file)) - DEEPSPEED_GLOBALS)
        if offending:
            raise unsafe_checkpoint(state_file, offending)


def _from_lightning_ckpt(path: Path, trusted: bool = False) -> tuple[MMMTransformer, MMMTokenizer]:
    ckpt = load_checkpoint_file(path, trusted=trusted)
    hparams = ckpt.get("hyper_parameters", {})
    if "model_config" not in hparams or not hparams.get("tokenizer_json"):
        raise ValueError(f"{path}: not an mmm training checkpoint (no model config / tokenizer inside)")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return _build(hparams["model_config"], state), _tokenizer_from_json(hparams["tokenizer_json"])


def _from_deepspeed_dir(path: Path, trusted: bool = False) -> tuple[MMMTransformer, MMMTokenizer]:
    """A DeepSpeed (ZeRO-2 or 3) checkpoint directory, as `trainer=deepspeed` writes it: the fp32
    master weights consolidated by DeepSpeed's own `zero_to_fp32` (exactly what the
    `zero_to_fp32.py` script saved beside them gives), the model config and tokenizer from
    the Lightning state that rank 0 saved with them."""
    tag = (path / "latest").read_text().strip()
    # Rank 0's model-states file (ZeRO-2 name, then ZeRO-3 name) holds Lightning's client state.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    client_file = next((path / tag / n for n in names if (path / tag / n).is_file()), None)
    if client_file is None:
        raise FileNotFoundError(
            f"{path}: 'latest' names the tag {tag!r} but {path / tag} holds no model states (an incomplete checkpoint)"
        )
    if not trusted:  # zero_to_fp32 unpickles every state file in full
        check_deepspeed_states(path / tag)
    client = load_checkpoint_file(client_file, trusted=trusted)
    hparams = client.get("hyper_parameters", {})
    if "model_config" not in hparams or not hparams.get("tokenizer_json"):
        raise ValueError(f"{path}: not an mmm training checkpoint (no model config / tokenizer inside)")
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag)
    # DeepSpeed wraps the LightningModule, whose transformer is its `model` attribute.
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return _build(hparams["model_config"], state), _tokenizer_from_json(hparams["tokenizer_json"])


def _tokenizer_from_json(text: str) -> MMMTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TOKENIZER_FILE
        path.write_text(text)
        return load_tokenizer(path)


def _build(model_config: dict[str, Any], state: dict[str, torch.Tensor]) -> MMMTransformer:
    model = MMMTransformer(ModelConfig.from_dict(dict(model_config)))
    model.load_state_dict(state)
    return model.eval()


def checkpoint_location(ref: str | Path) -> Path | str:
    """What `ckpt=` names: an existing local path, or a hub repo id ('owner/name') to download.
    Anything else is a FileNotFoundError: a path that looks local (`./x`, `x.ckpt`, or one slash
    under an existing local folder, such as a mistyped `runs/modle`) is never sent to the hub."""
    path = Path(ref)
    if path.exists():
        return path
    text = str(ref)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith((".ckpt", ".json")):
        raise FileNotFoundError(f"{text}: no such checkpoint folder or file (nor a hub repo id 'owner/name')")
    if Path(text.split("/")[0]).is_dir():
        raise FileNotFoundError(
            f"{text}: no such checkpoint folder or file ({text.split('/')[0]}/ is a local "
            "folder, so this is not taken for a hub repo id)"
        )
    return text


def load_pretrained(path: str | Path, trusted: bool = False) -> tuple[MMMTransformer, MMMTokenizer]:
    """Model and tokenizer from a checkpoint folder, a Lightning `.ckpt` or a DeepSpeed dir.
    A `.ckpt` or DeepSpeed dir is read without running code from it unless `trusted`
    (`load_checkpoint_file`)."""
    path = Path(path)
    if not path.exists():  # a folder whose save was killed mid-swap is beside it, complete
        recover_folder(path)
    if path.is_file() and path.suffix == ".ckpt":
        return _from_lightning_ckpt(path, trusted)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        config = json.loads((path / CONFIG_FILE).read_text())
        if "model" not in config:
            raise ValueError(f"{path / CONFIG_FILE}: no 'model' section; not an mmm checkpoint folder")
        version = config.get("mmm_format", 1)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path}: checkpoint format {version} was written by a newer mmm "
                f"(this one reads format {FORMAT_VERSION}): upgrade mmm"
            )
        if version < FORMAT_VERSION:
            raise ValueError(
                f"{path}: checkpoint format {version} was trained on the earlier bar encoding (a bar's "
                f"header merged with its first notes by BPE); this mmm encodes format {FORMAT_VERSION}, "
                "so the model would read foreign prompts. Retrain it with this mmm, or fine-tune it: raise "
                "trainer.max_steps and re-run its training command (it resumes from last.ckpt)"
            )
        return _build(config["model"], load_file(str(path / WEIGHTS_FILE))), load_tokenizer(path)
    if path.is_dir() and (path / "latest").is_file():
        return _from_deepspeed_dir(path, trusted)
    raise FileNotFoundError(
        f"{path}: expected a checkpoint folder (config.json, model.safetensors, tokenizer.json), "
        "a Lightning .ckpt file or a DeepSpeed checkpoint directory"
    )


def generation_settings(path: str | Path) -> dict[str, Any]:
    """`MMM` keyword arguments stored by training in a checkpoint folder's config.json
    (`generation`: `max_bar_tokens` and `controls_seen`, measured on the training data);
    empty for checkpoints without them (`.ckpt`, DeepSpeed dirs, older folders)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return {}
    generation = json.loads(config.read_text()).get("generation", {})
    return {k: generation[k] for k in ("max_bar_tokens", "controls_seen") if k in generation}
