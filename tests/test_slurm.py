"""Slurm for real: a one-node cluster started by slurm/local_cluster.sh (as root; the tests skip
where it cannot start) runs the committed slurm/*.sbatch scripts unchanged and the Hydra Slurm
launcher, and each test checks what the jobs left behind:

- preemption: train.sbatch's own `--signal=SIGUSR1@120` reaches Lightning when the job nears its
  time limit; the job saves, requeues itself and resumes, and ends with the weights of an
  uninterrupted run;
- multi-task: `--ntasks-per-node=2` runs `trainer=ddp_cpu` and `trainer=deepspeed_cpu` as two
  Slurm tasks that Lightning sees through `SLURMEnvironment`; the DeepSpeed job is preempted and
  resumed too;
- a sweep through `hydra/launcher=slurm_local` submits real Slurm jobs with submitit;
- a preprocessing job array and its merge step write the store of a single run;
- the tokenizer script prepares the data the training jobs use; bad submissions fail clearly.

The jobs overlap to keep the file short: a module fixture submits them all at the start (the
training jobs once the tokenizer job has made their data), a thread plays the approaching time
limit for the preempted ones, and each test waits for its own jobs. The node offers more CPUs
than the machine has, so they all run at once, sharing its cores; every wait is bounded and a
job that overstays is cancelled and reported with its logs.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, corpus_with_bad_files, small_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from slurm_cluster import FINAL, ClusterUnavailable, LocalCluster, client_env, tail, why_unavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODE_CPUS = 8  # 1 (preemption) + 2 (DDP) + 2 (DeepSpeed) + 2 (sweep) tasks at once, on any machine
HOLD_STEP, PREEMPT_STEPS = 8, 16  # the preempted job stops after step 8 of 16 (mid-epoch: 6 steps per epoch)
DEEPSPEED_HOLD_STEP = 4  # the 2-task DeepSpeed job is preempted after step 4 of 6
JOB_TIMEOUT = 420  # seconds any job may take (the machine is shared by all of them)


# -- what the jobs run ----------------------------------------------------------------------
def data_overrides(corpus: Path, root: Path) -> list[str]:
    """The data and tokenizer settings of conftest.small_overrides: the tokenizer job makes this
    store and tokenizer, every training job finds them."""
    keep = ("data=", "data.path=", "paths.data_dir=", "data.split.", "data.preprocess.", "tokenizer.")
    return [o for o in small_overrides(corpus, root) if o.startswith(keep)]


def train_overrides(corpus: Path, root: Path, name: str, multi_task: bool = False) -> list[str]:
    """`+experiment=demo` shrunk by conftest.small_overrides; the run folder is
    `$MMM_RUNS_DIR/<name>`, as for a user (runs/<experiment_name>)."""
    drop = ("run_dir=",) + (("trainer=", "trainer.precision=") if multi_task else ())
    return [
        "+experiment=demo",
        *[o for o in small_overrides(corpus, root) if not o.startswith(drop)],
        "validate_before_training=false",
        f"experiment_name={name}",
    ]


def probe(name: str, cls: str, **kwargs) -> str:
    args = ", ".join(f"{k}: {json.dumps(v) if isinstance(v, str) else v}" for k, v in kwargs.items())
    return f"+callbacks.{name}={{_target_: {cls}, {args}}}"


def records(path: Path) -> dict[int, list[dict]]:
    """rank -> the JSON lines a probe wrote to `<path>.rank<r>`."""
    return {
        int(p.name.rsplit("rank", 1)[1]): [json.loads(line) for line in p.read_text().splitlines()]
        for p in sorted(path.parent.glob(f"{path.name}.rank*"))
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finish(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The output of a local process started by the campaign, which must succeed in time."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{what} still running after {timeout:.0f} s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


@dataclasses.dataclass
class TrainJob:
    """A train.sbatch job of the campaign: its log and what its probes write."""

    name: str
    log: Path
    steps: Path  # rank_probe.RecordSteps: <steps>.rank<r>
    starts: Path  # slurm_probe.RecordCluster: <starts>.rank<r>
    marker: Path | None = None  # slurm_probe.HoldUntilSignalled's
    id: str = ""
    driver: threading.Thread | None = None
    driver_error: str | None = None


class Campaign:
    """Every job of this file, submitted at once; the tests wait for theirs."""

    def __init__(self, cluster: LocalCluster, corpus: Path, root: Path) -> None:
        self.cluster, self.corpus, self.root = cluster, corpus, root
        self.logs = root / "logs"
        self.logs.mkdir()
        self.runs = root / "runs"
        # What a user of the local cluster exports: no modules to load there; the tests' probes.
        # MMM_DATA_DIR: a job given no data folder must not find the checkout's data/.
        self.env = {
            "MMM_MODULES": "",
            "MMM_RUNS_DIR": str(self.runs),
            "MMM_DATA_DIR": str(root / "default_data"),
            "PYTHONPATH": str(REPO / "tests"),
        }
        self.procs: list[subprocess.Popen] = []
        self.tokenizer_job = self.tokenizer_error = None

    def sbatch(self, script: str, options: list[str], overrides: list[str], env: dict | None = None) -> str:
        return self.cluster.sbatch(*options, f"slurm/{script}", *overrides, env={**self.env, **(env or {})})

    def local(self, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """A process on this machine, not a job (the references the jobs are compared with)."""
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=client_env(**{**self.env, **(env or {})}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def submit_data_jobs(self) -> None:
        # The preprocessing array as slurm/README.md shows it: the array, then the merge step.
        pp = self.root / "preprocess"
        self.pp_corpus = corpus_with_bad_files(pp / "corpus", n=6)  # 9 files: 9 shards of one file
        common = [
            "data=folder",
            f"data.path={self.pp_corpus}",
            "data.preprocess.shard_size=1",
            "data.preprocess.min_notes=16",
        ]
        self.pp_array_store, self.pp_single_store = pp / "array_store", pp / "single_store"
        small = ["--cpus-per-task=1", "--mem=1G"]
        self.pp_array = self.sbatch(
            "preprocess.sbatch",
            ["--array=0-1", *small, f"--output={self.logs}/preprocess-%A_%a.out"],
            [*common, f"data.store={self.pp_array_store}"],
        )
        self.pp_merge = self.sbatch(
            "preprocess.sbatch",
            [f"--dependency=afterany:{self.pp_array}", *small, f"--output={self.logs}/preprocess-merge-%j.out"],
            [*common, f"data.store={self.pp_array_store}"],
        )
        # The same settings in one process (the array tasks ran 1 worker each, from --cpus-per-task).
        self.pp_single = self.local(
            [
                "-m",
                "mmm.preprocess",
                *common,
                f"data.store={self.pp_single_store}",
                "data.preprocess.num_workers=1",
                f"hydra.run.dir={pp / 'single_run'}",
            ]
        )
        self.tokenizer_log = self.logs / "tokenizer.out"
        self.tokenizer_job = self.sbatch(
            "tokenizer.sbatch",
            ["--cpus-per-task=1", "--mem=2G", f"--output={self.tokenizer_log}"],
            data_overrides(self.corpus, self.root),
        )

    def wait_for_data(self) -> None:
        self.tokenizer_records = self.cluster.wait(self.tokenizer_job, JOB_TIMEOUT, (self.tokenizer_log,))
        if self.tokenizer_records[0]["JobState"] != "COMPLETED":
            self.tokenizer_error = (
                "the tokenizer job, which makes the training jobs' data, failed:\n"
                + self.cluster.report(self.tokenizer_job, (self.tokenizer_log,))
            )

    def submit_training_jobs(self) -> None:
        cpu_job = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G"]
        # Multi-task: two Slurm tasks, one per process, for DDP and for DeepSpeed; the DeepSpeed
        # job is preempted too (the production path: every task gets the signal and saves).
        self.multi = {}
        for trainer, hold in (("ddp_cpu", None), ("deepspeed_cpu", DEEPSPEED_HOLD_STEP)):
            overrides = [
                *train_overrides(self.corpus, self.root, trainer, multi_task=True),
                f"trainer={trainer}",
                "data.samples_per_epoch=24",
            ]
            self.multi[trainer] = self.train_job(trainer, [*cpu_job, "--ntasks-per-node=2"], overrides, hold=hold)
        # Preemption of one task, compared with the same run on this machine, never interrupted.
        overrides = [
            *train_overrides(self.corpus, self.root, "preempt"),
            f"trainer.max_steps={PREEMPT_STEPS}",
            "data.samples_per_epoch=12",
            "trainer.val_check_interval=6",
        ]
        # One thread in both runs compared bit for bit (a reduction split over threads may round otherwise).
        threads = {"OMP_NUM_THREADS": "1"}
        self.preemptions = {
            "preempt": self.train_job(
                "preempt", [*cpu_job, "--ntasks-per-node=1"], overrides, hold=HOLD_STEP, env=threads
            ),
            "deepspeed_cpu": self.multi["deepspeed_cpu"],
        }
        self.reference = self.local(
            [
                "-m",
                "mmm.train",
                *overrides,
                "experiment_name=preempt_reference",
                probe("steps", "rank_probe.RecordSteps", path=str(self.root / "preempt_reference_steps")),
            ],
            env=threads,
        )
        for job in self.preemptions.values():
            job.driver = threading.Thread(target=self.drive_preemption, args=(job,), daemon=True)
            job.driver.start()
        # A sweep of two learning rates through the Slurm launcher (its own runs folder).
        self.sweep_runs = self.root / "sweep_runs"
        self.sweep = self.local(
            [
                "-m",
                "mmm.train",
                "-m",
                "hydra/launcher=slurm_local",
                *train_overrides(self.corpus, self.root, "demo"),
                "optim.optimizer.lr=1e-3,2e-3",
                probe("cluster", "slurm_probe.RecordCluster", path="${run_dir}/cluster"),
            ],
            env={"SLURM_CONF": str(self.cluster.conf), "MMM_RUNS_DIR": str(self.sweep_runs)},
        )

    def train_job(
        self, name: str, options: list[str], overrides: list[str], hold: int | None = None, env: dict | None = None
    ) -> TrainJob:
        """`sbatch <options> slurm/train.sbatch <overrides>` (experiment_name=<name>), recording
        each rank's steps and view of the job; `hold`: stop after that step until signalled."""
        job = TrainJob(
            name,
            self.logs / f"{name}.out",
            self.root / f"{name}_steps",
            self.root / f"{name}_cluster",
            self.root / f"{name}_holding" if hold else None,
        )
        probes = [
            probe("steps", "rank_probe.RecordSteps", path=str(job.steps)),
            probe("cluster", "slurm_probe.RecordCluster", path=str(job.starts)),
        ]
        if hold:
            probes.append(probe("hold", "slurm_probe.HoldUntilSignalled", step=hold, marker=str(job.marker)))
        job.id = self.sbatch("train.sbatch", [*options, f"--output={job.log}"], [*overrides, *probes], env=env)
        return job

    def drive_preemption(self, job: TrainJob) -> None:
        """What the approach of the time limit does, in a thread: once the job holds, its limit
        is moved to 1-2 minutes away; Slurm, which signals `--signal=SIGUSR1@120` jobs at its
        time-limit check (every 30 s) once less than 120 s are left, then sends train.sbatch's
        signal as it would after 47 h 58 min. Once the job is requeued, it gets its time back."""
        cluster = self.cluster
        try:
            deadline = time.monotonic() + JOB_TIMEOUT
            while not job.marker.exists():
                assert cluster.jobs(job.id)[0]["JobState"] in ("PENDING", "RUNNING"), "the job ended before its hold"
                assert time.monotonic() < deadline, "the job did not reach its hold in time"
                time.sleep(0.5)
            run_time = sum(
                int(x) * 60**i for i, x in enumerate(reversed(cluster.jobs(job.id)[0]["RunTime"].split(":")))
            )
            cluster.run("scontrol", "update", f"JobId={job.id}", f"TimeLimit={run_time // 60 + 2}")
            while int(cluster.jobs(job.id)[0]["Restarts"]) == 0:
                assert cluster.jobs(job.id)[0]["JobState"] not in FINAL, "the job ended without being requeued"
                assert time.monotonic() < deadline, "no requeue in time"
                time.sleep(0.5)
            cluster.run("scontrol", "update", f"JobId={job.id}", "TimeLimit=30")  # pending for cred_expire s: in time
        except BaseException as err:  # reported by the test, with the job's logs
            job.driver_error = f"{type(err).__name__}: {err}"
            cluster.run("scancel", job.id, check=False)

    def submit_bad_jobs(self) -> None:
        """Submissions that must fail at once, with a message saying what to fix."""
        self.bad = {}
        cpu_job = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G"]
        cases = {
            "no_venv": (
                ["--ntasks-per-node=1"],
                {"MMM_VENV": "/nonexistent/venv"},
                "error: no virtual environment at /nonexistent/venv",
            ),
            "ntasks": (
                ["--ntasks=2"],
                {},
                "error: train.sbatch needs --ntasks-per-node (one task per GPU or CPU process) "
                "and no --ntasks; got 2 tasks, 4 per node on 1 node(s)",
            ),
        }
        for name, (options, env, message) in cases.items():
            log = self.logs / f"bad_{name}.out"
            self.bad[name] = (
                self.sbatch("train.sbatch", [*cpu_job, *options, f"--output={log}"], ["+experiment=demo"], env=env),
                log,
                message,
            )
        log = self.logs / "bad_cwd.out"  # submitted from outside the checkout
        proc = self.cluster.run(
            "sbatch",
            "--parsable",
            *cpu_job,
            f"--output={log}",
            str(REPO / "slurm" / "tokenizer.sbatch"),
            env={**self.cluster.env, **self.env},
            cwd=self.root,
        )
        self.bad["cwd"] = (
            proc.stdout.strip(),
            log,
            f"error: {self.root} is not an mmm checkout: submit from the checkout's root",
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp_path: munged refuses a socket below a folder closed to other users.
    folder = Path(tempfile.mkdtemp(prefix="mmm-slurm-"))
    cluster = LocalCluster(folder, cpus=NODE_CPUS)
    try:
        cluster.start()
    except ClusterUnavailable as err:
        shutil.rmtree(folder)
        pytest.skip(f"no local Slurm cluster: {err}")
    yield cluster
    print(cluster.stop())
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def campaign(cluster, corpus, tmp_path_factory):
    campaign = Campaign(cluster, corpus, tmp_path_factory.mktemp("slurm_jobs"))
    try:
        campaign.submit_data_jobs()
        campaign.submit_bad_jobs()
        campaign.wait_for_data()
        if campaign.tokenizer_error is None:
            campaign.submit_training_jobs()
        yield campaign
    finally:
        campaign.close()


def needs_data(campaign: Campaign) -> None:
    if campaign.tokenizer_error:
        pytest.fail(campaign.tokenizer_error)


# -- the tests --------------------------------------------------------------------------------
def assert_requeued_and_resumed(campaign: Campaign, job: TrainJob, tasks: int, hold: int) -> None:
    """The job got Slurm's signal after step `hold`, saved and requeued itself, and came back
    once (SLURM_RESTART_COUNT=1) from that step's last.ckpt, all `tasks` ranks alike."""
    cluster = campaign.cluster
    [record] = cluster.wait(job.id, JOB_TIMEOUT, (job.log,))
    job.driver.join(timeout=10)
    assert job.driver_error is None, f"{job.driver_error}\n{cluster.report(job.id, (job.log,))}"
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", cluster.report(job.id, (job.log,))
    # Both runs appended to the job's log (--open-mode=append): the first got the signal, saved, requeued.
    out = job.log.read_text()
    run = campaign.runs / job.name
    last = run / "checkpoints" / "last.ckpt"
    assert out.count("SLURM auto-requeueing enabled") == 2 * tasks, out[-3000:]
    assert "Handling auto-requeue signal: 10" in out and f"Requeued SLURM job: {job.id}" in out, out[-3000:]
    assert out.count(f"interrupted at step {hold}: checkpoint saved to {last}") == tasks, out[-3000:]
    assert (run / "hpc_ckpt_1.ckpt").exists() and not (run / "hpc_ckpt_2.ckpt").exists()
    # The second run started from that step's last.ckpt (newer than the hpc checkpoint).
    assert f"Restoring states from the checkpoint path at {last}" in out, out[-3000:]
    starts = records(job.starts)
    assert sorted(starts) == list(range(tasks))
    for rank_starts in starts.values():
        assert [(s["env"]["SLURM_RESTART_COUNT"], s["global_step"]) for s in rank_starts] == [(None, 0), ("1", hold)]
        assert all(s["cluster_environment"] == "SLURMEnvironment" and s["auto_requeue"] for s in rank_starts)


def test_preempted_job_saves_requeues_and_resumes_to_the_uninterrupted_weights(campaign):
    """train.sbatch, unchanged, one task: when the job nears its time limit, Slurm sends the
    script's SIGUSR1; Lightning saves hpc_ckpt_1.ckpt and requeues the job; the requeue's SIGTERM
    makes mmm save last.ckpt after the step in flight; the job comes back, resumes at step 8 and
    trains steps 9-16 exactly as a run that was never interrupted: same samples, losses and
    weights at every step, bit-identical final weights."""
    needs_data(campaign)
    job = campaign.preemptions["preempt"]
    assert_requeued_and_resumed(campaign, job, tasks=1, hold=HOLD_STEP)
    hpc = torch.load(campaign.runs / "preempt" / "hpc_ckpt_1.ckpt", weights_only=False, map_location="cpu")
    assert hpc["global_step"] == HOLD_STEP
    finish(campaign.reference, JOB_TIMEOUT, "the uninterrupted run on this machine")
    steps, reference = records(job.steps)[0], records(campaign.root / "preempt_reference_steps")[0]
    assert [r["step"] for r in steps] == list(range(1, PREEMPT_STEPS + 1))  # none redone
    assert steps == reference
    assert_bit_identical(
        weights(campaign.runs / "preempt" / "model"), weights(campaign.runs / "preempt_reference" / "model")
    )


@pytest.mark.parametrize("trainer", ["ddp_cpu", "deepspeed_cpu"])
def test_two_slurm_tasks_train_as_two_ranks(campaign, trainer):
    """`sbatch --ntasks-per-node=2 slurm/train.sbatch ... trainer=<trainer>`: srun starts two
    processes, Lightning takes world size and ranks from Slurm (SLURMEnvironment, no process of
    its own), both train every step on the same weights, and one model folder comes out. The
    DeepSpeed job is also signalled by Slurm after step 4: both tasks save their shards, rank 0
    requeues, both resume at step 4 and train steps 5-6, none twice."""
    needs_data(campaign)
    job = campaign.multi[trainer]
    if trainer == "deepspeed_cpu":
        assert_requeued_and_resumed(campaign, job, tasks=2, hold=DEEPSPEED_HOLD_STEP)
    else:
        [record] = campaign.cluster.wait(job.id, JOB_TIMEOUT, (job.log,))
        assert record["JobState"] == "COMPLETED", campaign.cluster.report(job.id, (job.log,))
    starts = records(job.starts)
    assert sorted(starts) == [0, 1]
    for rank, rank_starts in starts.items():
        for start in rank_starts:
            assert start["cluster_environment"] == "SLURMEnvironment" and start["world_size"] == 2
            assert start["global_rank"] == int(start["env"]["SLURM_PROCID"]) == rank
            assert start["local_rank"] == int(start["env"]["SLURM_LOCALID"]) == rank
            assert (start["env"]["SLURM_JOB_ID"], start["env"]["SLURM_STEP_ID"], start["env"]["SLURM_NTASKS"]) == (
                job.id,
                "0",
                "2",
            )
            assert start["strategy"] == ("DDPStrategy" if trainer == "ddp_cpu" else "MMMDeepSpeedStrategy")
    assert starts[0][0]["pid"] != starts[1][0]["pid"]
    steps = records(job.steps)
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == list(range(1, 7))
    assert [r["weights"] for r in steps[0]] == [r["weights"] for r in steps[1]]
    assert not {i for r in steps[0] for i in r["index"]} & {i for r in steps[1] for i in r["index"]}
    run = campaign.runs / trainer
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert list(run.rglob("model.safetensors")) == [run / "model" / "model.safetensors"]  # rank 1 exported nothing
    assert (run / "checkpoints" / "last.ckpt").is_dir() == (
        trainer == "deepspeed_cpu"
    )  # a DeepSpeed checkpoint is a folder


def test_sweep_submits_real_slurm_jobs_through_the_launcher(campaign):
    """`python -m mmm.train -m hydra/launcher=slurm_local +experiment=demo optim.optimizer.lr=1e-3,2e-3`:
    submitit submits a Slurm job array asking for Lightning's requeue signal; both jobs run as
    Slurm jobs and finish; each job folder holds Hydra's records of its overrides and a model."""
    needs_data(campaign)
    sweep_dir = campaign.sweep_runs / "demo_sweep"
    try:
        finish(campaign.sweep, JOB_TIMEOUT, "the sweep")
    except AssertionError as err:
        logs = "\n".join(f"--- {p}\n{tail(p, 1500)}" for p in sorted(sweep_dir.glob(".submitit/*/*_log.*")))
        for folder in sweep_dir.glob(".submitit/*_*"):
            campaign.cluster.run("scancel", folder.name, check=False)
        raise AssertionError(f"{err}\n{logs}") from None
    [submission] = sweep_dir.glob(".submitit/*/*_submission.sh")
    script = submission.read_text()
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ):
        assert line in script, script
    multirun = OmegaConf.load(sweep_dir / "multirun.yaml")
    assert multirun.hydra.launcher._target_.endswith("SlurmLauncher")
    assert "optim.optimizer.lr=1e-3,2e-3" in OmegaConf.to_container(multirun.hydra.overrides.task)  # not resolved
    array = submission.parent.name
    for num, lr in enumerate(("1e-3", "2e-3")):
        job = sweep_dir / str(num)
        assert f"optim.optimizer.lr={float(lr)}" in OmegaConf.to_container(
            OmegaConf.load(job / ".hydra" / "overrides.yaml")
        )
        assert OmegaConf.load(job / ".hydra" / "config.yaml").optim.optimizer.lr == float(lr)
        assert sorted(p.name for p in (job / "model").iterdir()) == [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        ]
        [start] = records(job / "cluster")[0]
        assert start["cluster_environment"] == "SLURMEnvironment" and start["world_size"] == 1
        assert (start["env"]["SLURM_ARRAY_JOB_ID"], start["env"]["SLURM_ARRAY_TASK_ID"]) == (array, str(num))
        assert (sweep_dir / ".submitit" / f"{array}_{num}" / f"{array}_{num}_0_result.pkl").is_file()
    first, second = (weights(sweep_dir / str(n) / "model") for n in (0, 1))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # two learning rates, two models


def test_preprocessing_array_and_merge_step_write_the_single_run_store(campaign):
    """`sbatch --array=0-1 slurm/preprocess.sbatch ...` then the merge step
    (`--dependency=afterany:<array>`), as slurm/README.md shows: the store is the one a single
    process writes, byte for byte, report included."""
    cluster = campaign.cluster
    array = cluster.wait(campaign.pp_array, JOB_TIMEOUT)
    assert [r["JobState"] for r in array] == ["COMPLETED"] * 2, cluster.report(campaign.pp_array)
    [merge] = cluster.wait(campaign.pp_merge, JOB_TIMEOUT)
    assert merge["JobState"] == "COMPLETED", cluster.report(campaign.pp_merge)
    finish(campaign.pp_single, JOB_TIMEOUT, "the single preprocessing run")
    logs = {int(r["ArrayTaskId"]): Path(r["StdOut"]).read_text() for r in array}
    assert all("9 files, 9 shards" in log for log in logs.values()), logs
    array_store = files(campaign.pp_array_store)
    assert array_store == files(campaign.pp_single_store)
    assert "report.json" in array_store and not [p for p in array_store if p.endswith(".lock")]


def test_tokenizer_script_runs_as_written_and_bad_submissions_fail_clearly(campaign):
    """tokenizer.sbatch, unchanged (no account, partition or module line: they come from the
    environment), preprocesses the corpus and learns the tokenizer the training jobs used; a
    missing venv, --ntasks instead of --ntasks-per-node, or a submission from outside the
    checkout fail at once, saying what to do."""
    assert campaign.tokenizer_error is None, campaign.tokenizer_error
    out = campaign.tokenizer_log.read_text()
    summary = ast.literal_eval(out.strip().splitlines()[-1])  # what train_tokenizer prints last
    assert summary["vocab_size"] == 800 and summary["bpe"], out[-2000:]
    path = Path(summary["path"])
    assert len(json.loads(json.loads(path.read_text())["_model"])["model"]["vocab"]) == 800
    assert (
        path.parent == campaign.root / "data" / path.parent.name and (path.parent / "store" / "report.json").is_file()
    )
    for script in ("preprocess.sbatch", "tokenizer.sbatch", "train.sbatch"):
        text = (REPO / "slurm" / script).read_text()
        assert not re.search(r"#SBATCH\s+(--account|-A|--partition|-p)\b|^\s*module ", text, re.M), script
    for name, (job, log, message) in campaign.bad.items():
        [record] = campaign.cluster.wait(job, 120, (log,))
        assert record["JobState"] == "FAILED", (name, campaign.cluster.report(job, (log,)))
        assert message in log.read_text(), (name, log.read_text()[-2000:])


def test_launchers_ask_slurm_for_the_signal_lightning_catches(monkeypatch):
    """compute_canada (real clusters) and slurm_local (the tests) agree on what preemption relies
    on: Slurm sends SIGUSR1, which Lightning's SLURMEnvironment handles (submitit's default,
    SIGUSR2, it would not), signal_delay_s before the limit; requeue on; submitit never requeues."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    monkeypatch.setenv("SBATCH_ACCOUNT", "def-test")
    launchers = {}
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for name in ("compute_canada", "slurm_local"):
            launcher = compose("train", [f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher
            keys = ("account", "signal_delay_s", "max_num_timeout", "tasks_per_node", "gpus_per_node")
            launchers[name] = {k: OmegaConf.select(launcher, k) for k in keys}
            launchers[name]["additional_parameters"] = OmegaConf.to_container(
                launcher.additional_parameters, resolve=True
            )
    requeue_signal = SLURMEnvironment().requeue_signal
    for name, launcher in launchers.items():
        assert launcher["additional_parameters"] == {"requeue": True, "signal": f"USR1@{launcher['signal_delay_s']}"}, (
            name
        )
        assert signal.Signals[f"SIG{launcher['additional_parameters']['signal'].split('@')[0]}"] == requeue_signal
        assert launcher["max_num_timeout"] == 0, name
    cc = launchers["compute_canada"]
    assert cc["account"] == "def-test" and cc["tasks_per_node"] == cc["gpus_per_node"]
    assert launchers["slurm_local"]["signal_delay_s"] == cc["signal_delay_s"]


def test_local_cluster_script_refuses_bad_input_saying_what_to_do(tmp_path):
    """slurm/local_cluster.sh stops before starting anything on an unknown action, a folder where
    no cluster was started, a bad CPU count or port, and a folder munged could not serve from."""
    script = str(REPO / "slurm" / "local_cluster.sh")

    def run(*args: str, **env: str) -> str:
        proc = subprocess.run(
            ["bash", script, *args], env=client_env(**env), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and not proc.stdout, (args, proc.stdout, proc.stderr)
        return proc.stderr.strip()

    assert run("restart", str(tmp_path)) == "local_cluster: unknown action restart: use start, stop or status"
    assert (
        run("stop", str(tmp_path / "none"))
        == f"local_cluster: no folder {tmp_path / 'none'}: no cluster was started there"
    )
    assert "MMM_SLURM_CPUS=two is not a positive number of CPUs" in run("start", str(tmp_path), MMM_SLURM_CPUS="two")
    assert "MMM_SLURM_PORT=80 is not a port number between 1024 and 65534" in run(
        "start", str(tmp_path), MMM_SLURM_PORT="80"
    )
    if (
        why_unavailable() is None and os.stat(tmp_path.parent.parent).st_mode & 0o001 == 0
    ):  # pytest's own folder is closed
        message = run("start", str(tmp_path / "cluster"))
        assert "is not searchable by all users (o+x), which munged needs above its socket" in message, message
