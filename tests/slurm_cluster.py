"""A one-node Slurm cluster for tests/test_slurm*.py: slurm/local_cluster.sh started in a tmp
folder, and the few client calls the tests make (sbatch, scontrol, waiting for a job with a
bound, a job's log). No accounting database: a job's state comes from `scontrol show job`,
which local_cluster.sh makes keep finished jobs for an hour (MinJobAge), longer than any test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
# A job in one of these states will not run again (a requeued one is PENDING, then RUNNING).
FINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


class ClusterUnavailable(RuntimeError):
    """The local cluster cannot run here (the message says why): the Slurm tests skip."""


def why_unavailable() -> str | None:
    """Why no local cluster can start on this machine, or None."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if missing:
        return f"Slurm and munge are not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts the jobs): run the Slurm tests as root"
    return None


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free now (slurmctld's and slurmd's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise ClusterUnavailable("no pair of free ports found for slurmctld and slurmd")


def client_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Slurm job or submission setting (the tests may
    themselves run inside a job, or under a user's SBATCH_PARTITION), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "MMM_"))}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return {**env, **extra}


class LocalCluster:
    """slurm/local_cluster.sh in `folder` (a short path: munge's socket goes there)."""

    def __init__(self, folder: Path, cpus: int) -> None:
        self.folder, self.cpus = Path(folder), cpus
        self.conf = self.folder / "slurm.conf"
        self.env = client_env(SLURM_CONF=str(self.conf))

    def start(self) -> None:
        reason = why_unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        env = client_env(MMM_SLURM_PORT=str(free_port_pair()), MMM_SLURM_CPUS=str(self.cpus))
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start", str(self.folder)], env=env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise ClusterUnavailable(
                f"slurm/local_cluster.sh start failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
            )

    def stop(self) -> str:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "stop", str(self.folder)], capture_output=True, text=True, timeout=120
        )
        return proc.stdout + proc.stderr

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command (`scontrol`, `squeue`...) against this cluster."""
        proc = subprocess.run(
            list(args),
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=kwargs.pop("timeout", 60),
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """`sbatch --parsable *args` from the repository root, as a user submits the slurm/
        scripts; returns the job id (of an array: the array's)."""
        proc = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=REPO)
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` of a job (one record per array task), as key -> value."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        records = []
        for line in proc.stdout.splitlines():
            record = {}
            for field in line.split():
                key, _, value = field.partition("=")
                record.setdefault(key, value)
            if record:
                records.append(record)
        return records

    def wait(self, job_id: str, timeout: float, logs: tuple[Path, ...] = ()) -> list[dict[str, str]]:
        """Wait until every task of the job is in a final state; a job still queued or running
        after `timeout` s is cancelled and fails the test with its logs."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if not records:  # slurmctld forgets finished jobs after MinJobAge (an hour here)
                raise AssertionError(f"job {job_id} is unknown to slurmctld\n" + self.report(job_id, logs))
            if all(r.get("JobState") in FINAL for r in records):
                return records
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(
                    f"job {job_id} not done after {timeout:.0f} s: "
                    f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}\n"
                    + self.report(job_id, logs)
                )
            time.sleep(1)

    def report(self, job_id: str, logs: tuple[Path, ...] = ()) -> str:
        """The job's records, the tails of its logs (its StdOut/StdErr and `logs`) and of the
        daemons' logs: what a failing test shows."""
        records = self.jobs(job_id)
        paths = [Path(r[k]) for r in records for k in ("StdOut", "StdErr") if r.get(k)] + list(logs)
        out = [
            " ".join(f"{k}={r.get(k)}" for k in ("JobId", "JobState", "Reason", "ExitCode", "Restarts"))
            for r in records
        ]
        for path in dict.fromkeys(paths):
            if path.is_file():
                out.append(f"--- {path}\n{tail(path)}")
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / "log" / name
            if path.is_file():
                out.append(f"--- {path}\n{tail(path, 1500)}")
        return "\n".join(out)


def tail(path: Path, chars: int = 4000) -> str:
    text = Path(path).read_text(errors="replace")
    return text[-chars:]
