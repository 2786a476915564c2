"""Multi-process training, executed: `python -m mmm.train` with 2 CPU processes over gloo, with
DDP (`trainer=ddp_cpu`) and with the real DeepSpeed ZeRO-2 engine (`trainer=deepspeed_cpu`).

Each run records, per rank and step, the sample indices, the loss and a checksum of the
weights (tests/rank_probe.py); `KillJobAt` SIGKILLs the whole job mid-epoch, as a node failure.
Runs are tiny (a 2-layer model, 256-token samples, 24 samples per epoch: 6 steps of 2x2).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, small_overrides, write_synthetic_midi
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mmm.data.datamodule import ResumableSampler
from mmm.data.prepare import ensure_tokenizer
from mmm.train import resume_path

STEPS_PER_EPOCH = 6  # data.samples_per_epoch=24 / (2 ranks x batch 2)


def run_overrides(corpus: Path, data_root: Path) -> list[str]:
    """small_overrides for a command line: the run folder is Hydra's (hydra.run.dir), as for users."""
    keep = [
        o
        for o in small_overrides(corpus, data_root)
        if not o.startswith(("run_dir=", "trainer=", "trainer.precision=", "trainer.max_steps="))
    ]
    return keep + ["data.samples_per_epoch=24", "validate_before_training=false", "trainer.max_steps=8"]


@pytest.fixture(scope="module")
def data_root(corpus, tmp_path_factory) -> Path:
    """Store and tokenizer made once, in this process; every run below finds them."""
    root = tmp_path_factory.mktemp("distributed")
    cfg = compose_config("train", small_overrides(corpus, root))
    ensure_tokenizer(cfg.data, cfg.tokenizer)
    return root


def command(
    run: Path, overrides: list[str], *extra: str, file_size_limit: int | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m mmm.train` (2 processes) in its own process group, optionally with its
    file-size limit (RLIMIT_FSIZE, inherited by every rank) lowered: a write past it fails with
    EFBIG as on a full disk (Python ignores SIGXFSZ, which would kill the process instead)."""
    cmd = [
        sys.executable,
        "-m",
        "mmm.train",
        *overrides,
        f"hydra.run.dir={run}",
        f"+callbacks.probe={{_target_: rank_probe.RecordSteps, path: {run}_steps}}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "MMM_SPY_DIR": str(run.parent / f"{run.name}_spy")}

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
        preexec_fn=limit if file_size_limit else None,
    )


def launch(run: Path, overrides: list[str], *extra: str, expect_killed: bool = False) -> dict[int, list[dict]]:
    """`command`, which must succeed (or be killed); return the records."""
    proc = command(run, overrides, *extra)
    if expect_killed:
        assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-4000:]
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return records(run)


def records(run: Path) -> dict[int, list[dict]]:
    """rank -> the JSON lines RecordSteps wrote, in order."""
    return {r: [json.loads(line) for line in Path(f"{run}_steps.rank{r}").read_text().splitlines()] for r in (0, 1)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# -- the sampler alone ---------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [24, 23, 7, 1])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_gives_each_sample_of_an_epoch_to_exactly_one_rank(num_samples, world_size):
    per_rank = -(-num_samples // world_size)
    ranks = [
        ResumableSampler(num_samples, seed=3, epoch=1, rank=r, world_size=world_size).indices for r in range(world_size)
    ]
    assert all(len(r) == per_rank for r in ranks)  # ranks take as many steps
    seen = [i for r in ranks for i in r]
    assert sorted(seen) == list(range(per_rank * world_size))  # no repeat, none missing
    # Resuming mid-epoch: the rest of the epoch first, the same samples per rank.
    resumed = ResumableSampler(num_samples, seed=3, epoch=1, start=per_rank // 2, rank=0, world_size=world_size).indices
    assert resumed[: per_rank - per_rank // 2] == ranks[0][per_rank // 2 :] and sorted(resumed) == sorted(ranks[0])
    with pytest.raises(ValueError, match="rank 3 is not in"):
        ResumableSampler(num_samples, seed=3, epoch=1, rank=3, world_size=world_size)


def test_newest_hpc_checkpoint_wins_over_last_ckpt(tmp_path):
    cfg = OmegaConf.create({"ckpt_path": "last", "run_dir": str(tmp_path)})
    assert resume_path(cfg) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    for newer, older in ((hpc, last), (last, hpc)):
        os.utime(older, ns=(10**18, 10**18))
        os.utime(newer, ns=(2 * 10**18, 2 * 10**18))
        assert resume_path(cfg) == str(newer)
    # DeepSpeed checkpoints are directories updated in place: their `latest` file dates them.
    last.unlink()
    (last / "checkpoint").mkdir(parents=True)
    (last / "latest").write_text("checkpoint")
    os.utime(last / "latest", ns=(3 * 10**18, 3 * 10**18))  # the directory itself stays old
    assert resume_path(cfg) == str(last)
    os.utime(hpc, ns=(4 * 10**18, 4 * 10**18))
    assert resume_path(cfg) == str(hpc)
    (last / "latest").unlink()  # an interrupted DeepSpeed save is no candidate
    hpc.unlink()
    assert resume_path(cfg) is None


def test_a_versioned_last_checkpoint_newer_than_last_ckpt_wins(tmp_path):
    """A last.ckpt saved on an interrupt before ModelCheckpoint's first save makes it write
    last-v1.ckpt from then on: resuming from the stale last.ckpt would lose those steps."""
    cfg = OmegaConf.create({"ckpt_path": "last", "run_dir": str(tmp_path)})
    (tmp_path / "checkpoints").mkdir()
    last, versioned = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last-v1.ckpt"
    for path, at in ((last, 10**18), (versioned, 2 * 10**18)):
        path.write_bytes(b"x")
        os.utime(path, ns=(at, at))
    assert resume_path(cfg) == str(versioned)
    os.utime(last, ns=(3 * 10**18, 3 * 10**18))  # a later interrupt rewrote last.ckpt
    assert resume_path(cfg) == str(last)


def test_deepspeed_cpu_config_is_the_gpu_config_but_the_accelerator(tmp_path):
    from hydra.utils import instantiate

    from mmm.train import check_config
    from mmm.training.strategies import MMMDeepSpeedStrategy

    gpu, cpu = (
        OmegaConf.to_container(compose_config("train", [f"trainer={t}", f"run_dir={tmp_path}"]).trainer)
        for t in ("deepspeed", "deepspeed_cpu")
    )
    assert {k for k in gpu if gpu[k] != cpu[k]} == {"accelerator", "devices"}
    assert (cpu["accelerator"], cpu["devices"]) == ("cpu", 2)
    strategy = instantiate(cpu["strategy"])
    assert isinstance(strategy, MMMDeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 2
    stage3 = compose_config("train", ["trainer=deepspeed_cpu", "trainer.strategy.stage=3", f"run_dir={tmp_path}"])
    assert instantiate(stage3.trainer.strategy).config["zero_optimization"]["stage"] == 3
    check_config(stage3)  # runs without CUDA: no "needs CUDA GPUs" refusal


# -- DDP -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp(corpus, data_root):
    """An uninterrupted 8-step run, and the same run SIGKILLed before step 6 then re-run."""
    overrides = run_overrides(corpus, data_root) + ["trainer=ddp_cpu"]
    full = data_root / "ddp_full"
    spy = ["+callbacks.spy={_target_: rank_probe.WriteSpy}"]
    full_records = launch(full, overrides, *spy)
    killed = data_root / "ddp_killed"
    launch(killed, overrides, "+callbacks.kill={_target_: rank_probe.KillJobAt, step: 5}", expect_killed=True)
    checkpoints_at_kill = sorted(p.name for p in (killed / "checkpoints").iterdir())
    killed_records = launch(killed, overrides)
    return full, full_records, killed, killed_records, checkpoints_at_kill


@pytest.mark.multiprocess
def test_ddp_each_sample_of_an_epoch_goes_to_exactly_one_rank(ddp):
    _, recs, *_ = ddp
    assert [r["step"] for r in recs[0]] == [r["step"] for r in recs[1]] == list(range(1, 9))
    epoch0 = {rank: [i for r in recs[rank][:STEPS_PER_EPOCH] for i in r["index"]] for rank in (0, 1)}
    assert sorted(epoch0[0] + epoch0[1]) == list(range(24))
    epoch1 = {rank: [i for r in recs[rank][STEPS_PER_EPOCH:] for i in r["index"]] for rank in (0, 1)}
    assert not set(epoch1[0]) & set(epoch1[1])
    assert epoch1[0] != epoch0[0][: len(epoch1[0])]  # a new order each epoch
    # DDP keeps one copy of the weights: every rank holds the same after every step.
    assert [r["weights"] for r in recs[0]] == [r["weights"] for r in recs[1]]


@pytest.mark.multiprocess
def test_ddp_killed_mid_epoch_and_rerun_ends_bit_identical(ddp):
    full, full_recs, killed, killed_recs, at_kill = ddp
    assert at_kill == ["last.ckpt", "step0000003.ckpt"]  # killed after step 5: nothing saved since step 3
    for rank in (0, 1):
        steps = [r["step"] for r in killed_recs[rank]]
        assert steps == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # steps 4-5 redone from the step-3 checkpoint
        assert killed_recs[rank][:5] + killed_recs[rank][7:] == full_recs[rank]  # same samples, losses, weights
        assert killed_recs[rank][5:7] == killed_recs[rank][3:5]
    assert_bit_identical(weights(killed / "model"), weights(full / "model"))


@pytest.mark.multiprocess
def test_ddp_only_rank_zero_writes_checkpoints_model_and_logs(ddp):
    full, *_ = ddp
    files = sorted(str(p.relative_to(full)) for p in full.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("tensorboard/events.out.tfevents")]
    assert len(events) == 1  # one TensorBoard writer
    expected = {
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "checkpoints/last.ckpt",
        "checkpoints/step0000003.ckpt",
        "checkpoints/step0000006.ckpt",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "tensorboard/hparams.yaml",
        *events,
    }
    assert set(files) == expected
    # And rank 1 opened nothing for writing under the run folder (WriteSpy, from its start).
    spy = full.parent / f"{full.name}_spy"
    assert (spy / "rank1.armed").is_file()
    assert not (spy / "rank1.writes").exists(), (spy / "rank1.writes").read_text()


# -- DeepSpeed -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deepspeed(corpus, data_root):
    """trainer=deepspeed_cpu for 6 steps, SIGKILLed before step 6 and re-run with the same command."""
    overrides = [o for o in run_overrides(corpus, data_root) if o != "trainer.max_steps=8"] + [
        "trainer=deepspeed_cpu",
        "trainer.max_steps=6",
    ]
    run = data_root / "deepspeed"
    launch(run, overrides, "+callbacks.kill={_target_: rank_probe.KillJobAt, step: 5}", expect_killed=True)
    at_kill = sorted(p.name for p in (run / "checkpoints").iterdir())
    return run, launch(run, overrides), at_kill


@pytest.mark.multiprocess
def test_deepspeed_rerun_resumes_at_the_checkpoint_step(deepspeed):
    run, recs, at_kill = deepspeed
    assert at_kill == ["last.ckpt", "step0000003.ckpt"]
    assert (run / "checkpoints" / "last.ckpt" / "zero_to_fp32.py").is_file()  # a DeepSpeed directory
    for rank in (0, 1):
        assert [r["step"] for r in recs[rank]] == [1, 2, 3, 4, 5, 4, 5, 6]
        # Steps 4-5 redone from the step-3 checkpoint: the same samples, losses and weights.
        assert recs[rank][5:7] == recs[rank][3:5]
    # ZeRO-2 partitions the optimizer state, not the weights: every rank holds the same.
    assert [r["weights"] for r in recs[0]] == [r["weights"] for r in recs[1]]


@pytest.mark.multiprocess
def test_deepspeed_export_is_the_consolidated_fp32_master_weights(deepspeed, tmp_path):
    from mmm import MMM
    from mmm.checkpoint import main as export

    run, *_ = deepspeed
    ckpt = run / "checkpoints" / "last.ckpt"
    export([str(ckpt), str(tmp_path / "exported")])
    # DeepSpeed's own consolidation script, saved in every checkpoint directory.
    subprocess.run(
        [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(tmp_path / "fp32"), "--safe_serialization"],
        check=True,
        capture_output=True,
    )
    master = {k.removeprefix("model."): v for k, v in load_file(str(tmp_path / "fp32" / "model.safetensors")).items()}
    exported = weights(tmp_path / "exported")
    assert all(v.dtype == torch.float32 for v in exported.values())
    assert_bit_identical(exported, master)
    assert_bit_identical(weights(run / "model"), master)  # what training itself exported at the end
    # The folder is a model: a 4-bar infill.
    midi = write_synthetic_midi(tmp_path / "piece.mid", seed=5, num_bars=12)
    out = MMM.from_pretrained(tmp_path / "exported").infill(midi, track=1, bars=(4, 8), seed=0, max_bar_tokens=64)
    assert len(out.tracks) >= 2


@pytest.mark.multiprocess
def test_deepspeed_and_ddp_follow_the_same_loss_curve(deepspeed, ddp):
    """Same seed, data and schedule; the loss per rank and step agrees within bf16 rounding.

    Not exactly: DeepSpeed's bf16 mode casts the module to bf16 (its fp32 master weights start
    from those rounded values) and reduces bf16 gradients, while DDP's bf16-mixed keeps fp32
    weights and gradients and runs only autocast regions in bf16. The first step sees the same
    weights up to that rounding; the gap then grows slowly with the updates."""
    _, ds, _ = deepspeed
    _, ddp_recs, *_ = ddp
    for rank in (0, 1):
        a = list({r["step"]: r for r in ds[rank]}.values())  # steps 1-6 (4-5 were redone identically)
        b = ddp_recs[rank][:6]
        assert [r["index"] for r in a] == [r["index"] for r in b]  # the same samples on the same rank
        torch.testing.assert_close(
            torch.tensor([r["loss"] for r in a]), torch.tensor([r["loss"] for r in b]), rtol=2**-8, atol=0
        )  # bf16's relative precision
        assert abs(a[0]["loss"] - b[0]["loss"]) < 1e-3


@pytest.mark.multiprocess
@pytest.mark.full_disk
def test_deepspeed_save_on_a_full_disk_keeps_the_previous_checkpoint(corpus, data_root):
    """A DeepSpeed save that runs out of space (a file-size limit below its state files) fails
    with DiskFull on every rank and leaves the previous last.ckpt folder byte for byte, loadable,
    with no temporary folder beside it; the re-run with space resumes from it and completes."""
    from mmm.model.pretrained import load_pretrained

    overrides = [o for o in run_overrides(corpus, data_root) if o != "trainer.max_steps=8"] + ["trainer=deepspeed_cpu"]
    run = data_root / "deepspeed_full_disk"
    launch(run, [*overrides, "trainer.max_steps=1"])  # ends with last.ckpt at step 1
    last = run / "checkpoints" / "last.ckpt"
    before = {p: p.read_bytes() for p in sorted(last.rglob("*")) if p.is_file()}
    limit = min(len(data) for p, data in before.items() if p.suffix == ".pt") // 2
    assert limit > max(len(data) for p, data in before.items() if p.suffix != ".pt")  # only state files hit it

    # Step 2, then its final save over last.ckpt (the periodic ones come every 3 steps) fails.
    proc = command(run, [*overrides, "trainer.max_steps=2"], file_size_limit=limit)
    assert proc.returncode != 0 and f"DiskFull: [Errno 27] could not write {last}: File too large" in proc.stderr, (
        proc.stderr[-4000:]
    )
    assert {p: p.read_bytes() for p in sorted(last.rglob("*")) if p.is_file()} == before
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no partial folder beside it
    load_pretrained(last)

    recs = launch(run, [*overrides, "trainer.max_steps=2"])  # space is back
    for rank in (0, 1):
        assert [r["step"] for r in recs[rank]] == [1, 2, 2]
        assert recs[rank][2] == recs[rank][1]  # step 2 redone from the step-1 checkpoint: same samples, loss, weights
    assert (run / "model" / "model.safetensors").is_file()
