"""Interruption and resume, bad input, bad configuration: nothing lost, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, small_overrides, write_synthetic_midi
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file

from mmm.train import train


def resume_overrides(corpus: Path, root: Path) -> list[str]:
    # 10 steps over 2+ epochs (samples_per_epoch=12, batch 2 -> 6 steps/epoch), so resuming
    # crosses an epoch boundary and starts mid-epoch.
    return small_overrides(corpus, root) + [
        "trainer.max_steps=10",
        "data.samples_per_epoch=12",
        "validate_before_training=false",
        "trainer.val_check_interval=6",
        "logger=none",
    ]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "run" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    metrics = train(compose_config("train", resume_overrides(corpus, root)))
    assert metrics["global_step"] == 10
    return final_weights(root)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(corpus, tmp_path, uninterrupted):
    """SIGTERM (Slurm preemption) mid-epoch: last.ckpt is written after the current step, and
    the resumed run ends with exactly the weights of an uninterrupted run: same step count,
    optimizer state, LR schedule and data order."""
    overrides = resume_overrides(corpus, tmp_path)
    killer = "+callbacks.kill={_target_: rank_probe.SendSignal, at_step: 8, signum: %d}" % signal.SIGTERM
    with pytest.raises(SIGTERMException):
        train(compose_config("train", overrides + [killer]))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9  # the step in flight when the signal came was finished
    metrics = train(compose_config("train", overrides + ["ckpt_path=last"]))
    assert metrics["global_step"] == 10
    assert_same_weights(final_weights(tmp_path), uninterrupted)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigkill_resumes_from_the_last_periodic_checkpoint(corpus, tmp_path, uninterrupted):
    """SIGKILL gives no chance to save: the run resumes from the last periodic checkpoint
    (every 3 steps) and still ends with the uninterrupted weights."""
    overrides = resume_overrides(corpus, tmp_path)
    killer = "+callbacks.kill={_target_: rank_probe.SendSignal, at_step: 7, signum: %d}" % signal.SIGKILL
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "mmm.train", *overrides, killer],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    lock = tmp_path / "run" / "train.lock"
    assert "SendSignal" in json.loads(lock.read_text())["command"]  # the killed run's lock is left...
    metrics = train(compose_config("train", overrides + ["ckpt_path=last"]))
    assert metrics["global_step"] == 10
    assert not lock.exists()  # ...taken over as stale by the resumed run, which released it at the end
    assert_same_weights(final_weights(tmp_path), uninterrupted)


# -- bad MIDI ------------------------------------------------------------------------------
def _midi_bytes(score) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.mid"
        score.dump_midi(path)
        return path.read_bytes()


def bad_files(root: Path) -> dict[str, str]:
    """Write one file per kind of breakage; returns {file name: expected reason}."""
    from conftest import synthetic_score
    from symusic import Note, Score, Tempo, TimeSignature, Track

    good = _midi_bytes(synthetic_score(0, 12))
    files: dict[str, tuple[bytes, str]] = {
        "truncated.mid": (good[: len(good) // 2], "unreadable"),
        "wrong_header.mid": (b"MTxx" + good[4:], "not_midi"),
        "zero_tpq.mid": (good[:12] + b"\x00\x00" + good[14:], "bad_ticks_per_quarter"),
        "smpte_tpq.mid": (good[:12] + b"\xe7\x28" + good[14:], "bad_ticks_per_quarter"),
        "type2.mid": (good[:8] + b"\x00\x02" + good[10:], "midi_type_2"),
        "empty.mid": (b"", "not_midi"),
        "png_named_mid.mid": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not_midi"),
    }
    drums = Score(480)
    drums.tracks.append(Track("kit", 0, True))
    drums.tracks[0].notes.extend(Note(i * 240, 120, 36, 100) for i in range(200))
    meta = Score(480)
    meta.tempos.append(Tempo(0, 120.0))
    meta.time_signatures.append(TimeSignature(0, 4, 4))
    meta.tracks.append(Track("empty", 0, False))
    fast = synthetic_score(1, 12)
    fast.tempos.append(Tempo(480 * 8, 5000.0))
    odd = synthetic_score(2, 12)
    odd.time_signatures.append(TimeSignature(480 * 8, 100, 4))
    huge = synthetic_score(3, 12)
    huge.tracks[0].notes.append(Note(480 * 4 * 6000, 480, 60, 90))  # a note 6000 bars later
    files |= {
        "only_drums.mid": (_midi_bytes(drums), "drums_only"),
        "only_meta.mid": (_midi_bytes(meta), "no_notes"),
        "absurd_tempo.mid": (_midi_bytes(fast), "absurd_tempo"),
        "absurd_time_signature.mid": (_midi_bytes(odd), "absurd_time_signature"),
        "gigantic.mid": (_midi_bytes(huge), "too_long"),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


@pytest.mark.subprocess
def test_every_kind_of_bad_midi_is_skipped_with_its_reason(tmp_path):
    from conftest import data_cfg, tok_cfg

    from mmm.data.store_writer import preprocess

    expected = bad_files(tmp_path / "bad")
    write_synthetic_midi(tmp_path / "bad" / "fine.mid", 5, 12)
    report = preprocess(data_cfg(tmp_path / "bad", tmp_path / "store", num_workers=2), tok_cfg())
    got = {r["name"]: r["reason"] for r in report["rejected_files"]}
    assert got == expected
    assert report["kept"] == 1


@pytest.mark.subprocess
@pytest.mark.slow
def test_fuzzed_midi_never_crashes_or_hangs_preprocessing(tmp_path, request):
    """Hundreds of mutated real files (byte flips, truncations, splices) through preprocessing
    with 2 workers: every file ends up kept or rejected with a reason."""
    import random

    from conftest import data_cfg, tok_cfg

    from mmm.data.store_writer import preprocess

    root = os.environ.get("MMM_TEST_MIDI")
    seeds = sorted(Path(root, "multitrack").glob("*.mid"))[:4] if root else []
    if not seeds:
        seeds = [write_synthetic_midi(tmp_path / f"seed_{i}.mid", i, 16) for i in range(4)]
    originals = [p.read_bytes() for p in seeds]
    rng = random.Random(1234)
    fuzz = tmp_path / "fuzz"
    fuzz.mkdir()
    n = 240
    for i in range(n):
        data = bytearray(rng.choice(originals))
        kind = i % 4
        if kind == 0:  # random byte flips, header included
            for _ in range(rng.randint(1, 40)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncation
            data = data[: rng.randrange(1, len(data))]
        elif kind == 2:  # splice two files
            other = rng.choice(originals)
            cut = rng.randrange(14, len(data))
            data = data[:cut] + other[rng.randrange(14, len(other)) :]
        else:  # flips inside the track data only (keeps a valid header)
            for _ in range(rng.randint(1, 10)):
                data[rng.randrange(22, len(data))] = rng.randrange(256)
        (fuzz / f"mutant_{i:03d}.mid").write_bytes(bytes(data))
    # Mutations that still parse: the tokenizer meets odd but readable content.
    from symusic import Note, Score, Tempo, TimeSignature

    n_bytes, n = n, n + 120
    for i in range(n_bytes, n):
        score = Score.from_midi(rng.choice(originals))
        for track in score.tracks:
            notes = list(track.notes)
            for note in rng.sample(notes, k=min(len(notes), rng.randint(0, 30))):
                note.time = max(0, note.time + rng.choice([-1, 1]) * rng.randint(0, 10 ** rng.randint(1, 5)))
                note.duration = rng.choice([0, 1, note.duration * 50, rng.randint(0, 10**5)])
                note.pitch = rng.choice([0, 127, note.pitch])
                note.velocity = rng.choice([1, 127, note.velocity])
            if rng.random() < 0.3:
                track.notes.append(Note(rng.randint(0, 10**6), rng.randint(0, 10**4), rng.randint(0, 127), 64))
        if rng.random() < 0.5:
            score.tempos.append(Tempo(rng.randint(0, 10**5), rng.choice([4.0, 30.0, 300.0, 999.0])))
        if rng.random() < 0.5:
            score.time_signatures.append(
                TimeSignature(rng.randint(0, 10**5), rng.choice([1, 3, 5, 7, 13]), rng.choice([2, 4, 8, 16]))
            )
        if rng.random() < 0.2:
            score.tracks = score.tracks[: rng.randint(0, len(score.tracks))]
        score.dump_midi(fuzz / f"mutant_{i:03d}.mid")
    report = preprocess(data_cfg(fuzz, tmp_path / "store", num_workers=2, shard_size=16, file_timeout=20), tok_cfg())
    assert report["files"] == n
    assert report["kept"] + report["rejected"] == n
    assert all(r["reason"] for r in report["rejected_files"])
    print(f"fuzz: {report['kept']} kept, rejected by reason {report['rejected_by_reason']}")


def test_sampling_side_check_refuses_bad_scores():
    from symusic import Score

    from mmm.data.checks import Rejected, check_score

    with pytest.raises(Rejected, match="no_notes"):
        check_score(Score(480))


# -- atomic writes -------------------------------------------------------------------------
def test_store_shard_write_is_atomic(tmp_path, monkeypatch):
    import mmm.files.atomic
    from mmm.data import store as store_module

    target = tmp_path / "x.arrow"
    store_module.atomic_write_bytes(target, b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(mmm.files.atomic.os, "fsync", boom)
    with pytest.raises(OSError):
        store_module.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"


def test_checkpoint_folder_write_is_atomic(tmp_path, monkeypatch):
    from conftest import tokenizer_params

    from mmm.model import MMMTransformer, model_config_from_preset
    from mmm.model.pretrained import load_pretrained, save_pretrained
    from mmm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_params())
    model = MMMTransformer(model_config_from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=64))
    folder = save_pretrained(model, tokenizer, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(self, path):
        Path(path).write_text("{ half a json")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(type(tokenizer), "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(MMMTransformer(model.config), tokenizer, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    load_pretrained(folder)


def test_lightning_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """Lightning writes .ckpt through an fsspec transaction: a write that dies midway leaves
    the previous checkpoint, never a truncated one that loads as valid."""
    from fsspec.implementations.local import LocalFileOpener
    from lightning.fabric.utilities.cloud_io import _atomic_save

    target = tmp_path / "last.ckpt"
    _atomic_save({"step": 1, "w": torch.zeros(1000)}, target)
    real_write = LocalFileOpener.write

    def half_write(self, data):
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError("killed")

    monkeypatch.setattr(LocalFileOpener, "write", half_write)
    with pytest.raises(OSError):
        _atomic_save({"step": 2, "w": torch.ones(1000)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["step"] == 1


# -- a folder swap killed between its two renames --------------------------------------------
# A child writes `argv[1]` with `atomic_write_folder` (`argv[2]` into a file `latest` and a
# tag folder, as DeepSpeed writes a checkpoint) and is SIGKILLed at the swap's second rename:
# the previous folder has been renamed aside, the new one is not in place yet.
KILLED_MID_SWAP = """
import os, signal, sys
from mmm.files.atomic import atomic_write_folder
def fill(folder, version):
    (folder / "latest").write_text(version)
    (folder / version).mkdir()
    (folder / version / "mp_rank_00_model_states.pt").write_bytes(version.encode() * 100)
rename = os.replace
renames = []
def replace(src, dst):
    renames.append(dst)
    if len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
os.replace = replace
atomic_write_folder(sys.argv[1], lambda tmp: fill(tmp, sys.argv[2]))
"""


def fill_checkpoint(folder: Path, version: str) -> None:
    """What the child's `fill` writes."""
    (folder / "latest").write_text(version)
    (folder / version).mkdir()
    (folder / version / "mp_rank_00_model_states.pt").write_bytes(version.encode() * 100)


def kill_mid_swap(folder: Path, version: str) -> int:
    """Write `version` into `folder` in a child killed between the swap's renames; its pid."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_SWAP, str(folder), version], cwd=REPO)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    return proc.pid


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.subprocess
def test_a_checkpoint_folder_swap_killed_between_its_renames_is_finished_on_resume(tmp_path):
    """`checkpoints/last.ckpt` (a DeepSpeed folder) killed mid-swap: `ckpt_path=last` finds
    the new checkpoint, complete, instead of starting afresh; nothing is left beside it."""
    from omegaconf import OmegaConf

    from mmm.files.atomic import atomic_write_folder
    from mmm.train import resume_path

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    atomic_write_folder(last, lambda tmp: fill_checkpoint(tmp, "step9"))
    pid = kill_mid_swap(last, "step12")
    assert not last.exists() and (last.parent / f".last.ckpt.old{pid}").is_dir()  # what the kill leaves
    cfg = OmegaConf.create({"ckpt_path": "last", "run_dir": str(tmp_path / "run")})
    assert resume_path(cfg) == str(last)
    assert (last / "latest").read_text() == "step12"
    assert contents(last)["step12/mp_rank_00_model_states.pt"] == b"step12" * 100
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.subprocess
def test_a_model_folder_swap_killed_between_its_renames_loads_and_the_next_write_cleans_up(tmp_path):
    """`model/` killed mid-swap: `load_pretrained` (and so `python -m mmm.checkpoint`, the
    sampler, the server) finds it; the next write of a folder leaves no leftover of a killed one."""
    from conftest import tokenizer_params

    from mmm.files.atomic import atomic_write_folder
    from mmm.model import MMMTransformer, model_config_from_preset
    from mmm.model.pretrained import load_pretrained, save_pretrained
    from mmm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_params())
    model = MMMTransformer(model_config_from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=64))
    folder = save_pretrained(model, tokenizer, tmp_path / "model")
    before = contents(folder)
    # The child swaps in a folder that is no model; the swap is finished only if it was complete.
    kill_mid_swap(folder, "step12")
    os.rename(next(tmp_path.glob(".model.tmp*")), tmp_path / "new")  # as if killed before the new one was written
    load_pretrained(folder)  # the previous folder is put back
    assert contents(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]

    other = tmp_path / "other"
    atomic_write_folder(other, lambda tmp: fill_checkpoint(tmp, "a"))
    kill_mid_swap(other, "b")
    atomic_write_folder(other, lambda tmp: fill_checkpoint(tmp, "c"))
    assert contents(other) == {"latest": b"c", "c/mp_rank_00_model_states.pt": b"c" * 100}
    assert not list(tmp_path.glob(".other*"))


@pytest.mark.subprocess
def test_the_leftovers_of_a_live_writer_are_left_alone(tmp_path):
    """Another process in the middle of its swap (alive) is not undone under its feet."""
    from mmm.files.atomic import recover_folder

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        aside = tmp_path / f".last.ckpt.old{writer.pid}"
        aside.mkdir()
        assert recover_folder(tmp_path / "last.ckpt") is None and aside.is_dir()
    finally:
        writer.kill()
        writer.wait()
    assert recover_folder(tmp_path / "last.ckpt") == tmp_path / "last.ckpt"  # its writer is gone: put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# -- unsafe checkpoints --------------------------------------------------------------------
class Trap:
    """Unpickled, it runs a shell command: what a booby-trapped checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def mmm_ckpt(path: Path, **extra) -> Path:
    """A Lightning-style .ckpt of a tiny model, as `MMM.from_pretrained` reads it."""
    from conftest import tokenizer_params

    from mmm.model import MMMTransformer, model_config_from_preset
    from mmm.tokenizer import build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer(tokenizer_params())
    model = MMMTransformer(model_config_from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=64))
    torch.save(
        {
            "hyper_parameters": {
                "model_config": model.config.to_dict(),
                "tokenizer_json": save_tokenizer(tokenizer, path.parent / "tok.json").read_text(),
            },
            "state_dict": {f"model.{k}": t for k, t in model.state_dict().items()},
            **extra,
        },
        path,
    )
    return path


@pytest.mark.subprocess
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    from mmm import MMM
    from mmm.model.pretrained import UnsafeCheckpoint, load_checkpoint_file, load_pretrained

    marker = tmp_path / "pwned"
    good = mmm_ckpt(tmp_path / "good.ckpt")
    bad = mmm_ckpt(tmp_path / "bad.ckpt", callbacks={"Innocent": {"state": Trap(marker)}})
    MMM.from_pretrained(good)  # plain data: loads as before
    for load in (load_pretrained, MMM.from_pretrained):
        with pytest.raises(
            UnsafeCheckpoint, match=r"bad.ckpt: refusing to load it: it holds posix.system, .*trusted=True"
        ) as e:
            load(bad)
        assert "MMM.from_pretrained(path, trusted=True)" in str(e.value) and "model.safetensors" in str(e.value)
    assert not marker.exists()
    # The export command refuses it too, naming its --trusted flag.
    proc = subprocess.run(
        [sys.executable, "-m", "mmm.checkpoint", str(bad), str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "--trusted" in proc.stderr and "posix.system" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    # The trap is real: the explicit opt-in for a trusted file runs it.
    load_checkpoint_file(bad, trusted=True)
    assert marker.exists()


def deepspeed_dir(folder: Path, marker: Path) -> Path:
    """A DeepSpeed checkpoint folder (`latest` naming a tag folder of state files) whose
    state files carry a `Trap`: the model-states file too, the first one DeepSpeed's resume
    unpickles (the scan reads the optimizer-state file first)."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    mmm_ckpt(folder / "checkpoint" / "mp_rank_00_model_states.pt", callbacks={"Innocent": {"state": Trap(marker)}})
    torch.save(
        {"optimizer_state_dict": {"loss_scaler": Trap(marker)}},
        folder / "checkpoint" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    return folder


def test_a_deepspeed_checkpoint_carrying_code_is_refused_before_deepspeed_unpickles_it(tmp_path):
    """DeepSpeed's zero_to_fp32 loads every state file with weights_only=False: each is scanned
    first, and a global beyond DeepSpeed's own few is refused before anything is unpickled."""
    from mmm.model.pretrained import UnsafeCheckpoint, load_pretrained

    marker = tmp_path / "pwned"
    folder = deepspeed_dir(tmp_path / "last.ckpt", marker)
    with pytest.raises(UnsafeCheckpoint, match=r"optim_states.pt: refusing to load it: it holds posix.system"):
        load_pretrained(folder)
    assert not marker.exists()


@pytest.mark.subprocess
def test_resuming_from_a_checkpoint_carrying_code_is_refused(corpus, tmp_path):
    """Lightning's own resume path (`Trainer.fit(ckpt_path=...)`) goes through the same check."""
    from mmm.model.pretrained import UnsafeCheckpoint

    marker = tmp_path / "pwned"
    bad = mmm_ckpt(tmp_path / "bad.ckpt", callbacks={"Innocent": {"state": Trap(marker)}})
    cfg = compose_config("train", small_overrides(corpus, tmp_path) + [f"ckpt_path={bad}", "logger=none"])
    with pytest.raises(UnsafeCheckpoint, match="posix.system.*trust_checkpoint=true"):
        train(cfg)
    assert not marker.exists()


@pytest.mark.subprocess
def test_resuming_deepspeed_from_a_checkpoint_carrying_code_is_refused(corpus, tmp_path):
    """`trainer=deepspeed ckpt_path=<dir>`: DeepSpeed's own resume unpickles its state files
    in full; MMMDeepSpeedStrategy scans them first (run as the command, on one CPU process)."""
    marker = tmp_path / "pwned"
    bad = deepspeed_dir(tmp_path / "last.ckpt", marker)
    overrides = [o for o in small_overrides(corpus, tmp_path) if not o.startswith(("trainer=", "trainer.precision="))]
    cmd = [
        sys.executable,
        "-m",
        "mmm.train",
        *overrides,
        "trainer=deepspeed_cpu",
        "trainer.devices=1",
        "logger=none",
        f"ckpt_path={bad}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "UnsafeCheckpoint" in proc.stderr, proc.stderr[-3000:]
    assert (
        "optim_states.pt: refusing to load it: it holds posix.system" in proc.stderr
        and "trust_checkpoint=true" in proc.stderr
    )
    assert not marker.exists()


def test_a_remote_checkpoint_carrying_code_is_refused(tmp_path, monkeypatch):
    """`ckpt_path=https://...`: Lightning reads an http(s) URL with weights_only=False unless
    told otherwise; MMMCheckpointIO tells it, but for the explicit opt-in. Served over HTTP
    from this process."""
    import functools
    import http.server
    import threading

    from mmm.model.pretrained import UnsafeCheckpoint
    from mmm.training.checkpoint_io import MMMCheckpointIO

    marker = tmp_path / "pwned"
    served = tmp_path / "served"
    served.mkdir()
    mmm_ckpt(served / "good.ckpt")
    mmm_ckpt(served / "bad.ckpt", callbacks={"Innocent": {"state": Trap(marker)}})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where torch.hub keeps its downloads
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        io = MMMCheckpointIO()
        assert "model_config" in io.load_checkpoint(f"{url}/good.ckpt")["hyper_parameters"]  # plain data loads
        with pytest.raises(
            UnsafeCheckpoint, match=r"bad.ckpt: refusing to load it: it holds posix.system.*trust_checkpoint=true"
        ):
            io.load_checkpoint(f"{url}/bad.ckpt")
        assert not marker.exists()
        io.load_checkpoint(f"{url}/bad.ckpt", weights_only=False)  # trust_checkpoint=true: the trap is real
        assert marker.exists()
    finally:
        server.shutdown()


# -- bad configuration ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.loader.batch_size=abc", "data.loader.batch_size='abc': expected an integer"),
        ("trainer.max_steps=0", "trainer.max_steps=0: expected a value >= 1"),
        ("optim.optimizer.lr=-1.0", "optim.optimizer.lr=-1.0: expected a number >= 0"),
        ("data.sequences.tracks_ratio=[0.5,0.2]", r"data.sequences.tracks_ratio=\[0.5, 0.2\]"),
        ("+data.sequences.infil_ratio=0.5", "did you mean data.sequences.infill_ratio"),
        ("+data.loader.batchsize=4", "did you mean data.loader.batch_size"),
        ("+optim.warmup=10", "optim.warmup"),
        ("model.max_seq_len=64", "exceeds the model context"),
        ("trainer=deepspeed", "deepspeed needs CUDA"),
        ("trainer=gpu", "no CUDA GPU"),
    ],
)
def test_bad_config_fails_before_any_work(override, message, corpus, tmp_path):
    if "CUDA" in message and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    cfg = compose_config("train", small_overrides(corpus, tmp_path) + [override])
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "data").exists(), "nothing was preprocessed"


def test_unknown_key_is_refused_by_hydra(corpus, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_step"):
        compose_config("train", small_overrides(corpus, tmp_path) + ["trainer.max_step=3"])


@pytest.mark.subprocess
@pytest.mark.slow
def test_tokenizer_vocab_size_mismatch_fails_before_training(corpus, tmp_path):
    cfg = compose_config(
        "train", small_overrides(corpus, tmp_path) + ["trainer.max_steps=1", "validate_before_training=false"]
    )
    train(cfg)  # builds the store and a tokenizer of 800
    bad = compose_config(
        "train",
        small_overrides(corpus, tmp_path) + [f"tokenizer.path={cfg.tokenizer.path}", "tokenizer.vocab_size=900"],
    )
    with pytest.raises(ValueError, match="has 800 tokens but tokenizer.vocab_size=900"):
        train(bad)


def test_sampling_refuses_bad_midi_with_its_reason(tmp_path):
    from mmm.generation.scores import read_score

    expected = bad_files(tmp_path / "bad")
    for name, reason in expected.items():
        if reason == "drums_only":  # a drums-only piece is a fine input for sampling
            read_score(tmp_path / "bad" / name)
            continue
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            read_score(tmp_path / "bad" / name)
    with pytest.raises(ValueError, match="midi_type_2"):
        read_score(tmp_path / "bad" / "type2.mid")
