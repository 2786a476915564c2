"""Music files -> token store: the work of `python -m mmm.preprocess` (its docstring says what
the command does). Here: file checks and tokenization in worker processes watched from outside
(hang and crash isolation), shards written atomically under per-shard locks, the manifest that
refuses a store made with other settings, and the merged report."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm import tqdm

from mmm.config import at_least, check_section, interval, plain, within
from mmm.data.checks import Rejected, check_midi_header, check_score
from mmm.data.chunks import tokenize_score
from mmm.data.sources import build_source
from mmm.data.store import (
    SPLITS,
    STORE_FORMAT,
    atomic_write_bytes,
    atomic_write_json,
    done_shards,
    remove_partial_shard,
    setting_changes,
    shard_paths,
    tokenizer_settings,
    write_shard,
)
from mmm.files.locks import acquire_lock
from mmm.tokenizer import Vocab, build_tokenizer, vocab_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    """`data.preprocess`: which files are kept and how pieces are cut into chunks
    (configs/data/common.yaml explains each key)."""

    num_workers: int = field(metadata=at_least(1))
    shard_size: int | None = field(metadata=at_least(1))
    min_bars: int = field(metadata=at_least(1))
    min_notes: int = field(metadata=at_least(0))
    max_notes: int = field(metadata=at_least(1))
    max_tracks: int = field(metadata=at_least(1))
    max_bars: int = field(metadata=at_least(1))
    tempo_limits: tuple[float, float] = field(metadata=interval(0, float("inf")))
    allow_drums_only: bool
    chunk_max_tokens: int = field(metadata=at_least(1))
    chunk_max_track_tokens: int = field(metadata=at_least(1))
    chunk_min_bars: int = field(metadata=at_least(1))
    file_timeout: float

    def check(self) -> None:
        if self.file_timeout <= 0:
            raise ValueError(f"file_timeout={self.file_timeout!r}: expected seconds > 0")


@dataclass(frozen=True)
class SplitConfig:
    """`data.split`: fractions of the pieces held out, assigned by content hash (`split_of`)."""

    valid: float = field(metadata=within(0, 1))
    test: float = field(metadata=within(0, 1))

    def check(self) -> None:
        if self.valid + self.test >= 1:
            raise ValueError(
                f"valid={self.valid:g} and test={self.test:g} leave no piece to train on: expected valid + test < 1"
            )


# How the work is run, not what the store holds: left out of the manifest.
_RUN_KEYS = ("num_workers", "shard_size")
# Test hooks (see `_test_fault`, `_test_pause`): only honoured when this variable is "1".
TEST_FAULTS_ENV = "MMM_TEST_FAULTS"
TEST_PAUSE_ENV = "MMM_TEST_PAUSE_DIR"
# A shard whose worker died this many times while on no file of it (e.g. the out-of-memory
# killer while it built the shard's table) fails the run: its next try would likely die too.
MAX_SHARD_TRIES = 3


def split_of(content_hash: str, valid: float, test: float) -> str:
    """Deterministic split from a content hash: the same content always lands in the same split."""
    x = int(content_hash[:8], 16) / 2**32
    return "test" if x < test else "valid" if x < test + valid else "train"


def content_hash(chunks) -> str:
    """Hash of what a piece is after tokenization (programs and base ids of every bar): the same
    notes under another file name, tick resolution or meta events hash the same."""
    h = hashlib.sha1()
    for chunk in chunks:
        h.update(json.dumps([chunk.programs, chunk.bars], separators=(",", ":")).encode())
    return h.hexdigest()


def array_task(
    task_index: int | None = None, task_count: int | None = None, env: Mapping[str, str] = os.environ
) -> tuple[int, int] | None:
    """(index, count) of this job-array task from the arguments or else Slurm's variables;
    None for a whole run. Slurm numbers tasks from SLURM_ARRAY_TASK_MIN (`--array=1-4` too);
    the array must be contiguous (no `:step`)."""
    if task_index is None and task_count is None and "SLURM_ARRAY_TASK_ID" in env:
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        task_count = int(env.get("SLURM_ARRAY_TASK_COUNT", 0))
    if task_index is None and task_count is None:
        return None
    if not isinstance(task_index, int) or not isinstance(task_count, int) or not 0 <= task_index < task_count:
        raise ValueError(
            f"task_index={task_index!r}, task_count={task_count!r}: both must be set, with "
            "0 <= task_index < task_count (or leave both null for a whole run)"
        )
    return task_index, task_count


# ----------------------------------------------------------------------------- worker side

# What the workers work with: set by the parent for each run (forked workers inherit it) or by
# `_init_worker` in a spawned worker.
_W: dict[str, Any] = {}


def _set_state(source, tokenizer, settings: dict, split_cfg: dict) -> None:
    _W.clear()
    _W.update(
        source=source,
        tokenizer=tokenizer,
        vocab=Vocab(tokenizer),
        settings=SimpleNamespace(**settings),
        split=split_cfg,
    )


def _init_worker(source_cfg: dict, tokenizer_cfg: dict, settings: dict, split_cfg: dict) -> None:
    _set_state(build_source(source_cfg), build_tokenizer(tokenizer_cfg), settings, split_cfg)


def _test_fault(data: bytes) -> None:
    """Test hook: a file starting with one of these markers hangs inside C code (every signal
    blocked, then `pause()`: nothing in the process can interrupt it), loops forever, dies by
    SIGSEGV, aborts in C (SIGABRT), is killed as the out-of-memory killer does (SIGKILL), or
    takes 6 s to load while using a tenth of a core (a worker waiting for CPU on a busy node)."""
    import ctypes
    import faulthandler

    if not data.startswith(b"MMM-TEST-"):
        return
    faulthandler.disable()  # no traceback dump from a test's deliberate crash
    if data.startswith(b"MMM-TEST-HANG"):
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        ctypes.CDLL(None).pause()
    elif data.startswith(b"MMM-TEST-SPIN"):
        while True:
            pass
    elif data.startswith(b"MMM-TEST-SLOW"):
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            busy = time.monotonic() + 0.005
            while time.monotonic() < busy:
                pass
            time.sleep(0.045)
    elif data.startswith(b"MMM-TEST-SEGV"):
        ctypes.string_at(0)  # reads address 0: a real segmentation fault
    elif data.startswith(b"MMM-TEST-ABRT"):
        ctypes.CDLL(None).abort()
    elif data.startswith(b"MMM-TEST-KILL"):
        os.kill(os.getpid(), signal.SIGKILL)


def _test_pause(point: str) -> None:
    """Test hook: a test arms `point` ("writing": a worker starts writing its shard; "idle": it
    has reported its shard done) by creating the file `$MMM_TEST_PAUSE_DIR/<point>`. The first
    worker to reach an armed point renames that file to `<point>.<its pid>` and waits there
    until the file is gone, so that the test can kill it at that point from outside."""
    folder = os.environ.get(TEST_PAUSE_ENV)
    if os.environ.get(TEST_FAULTS_ENV) != "1" or not folder:
        return
    claim = Path(folder, f"{point}.{os.getpid()}")
    try:
        os.rename(Path(folder, point), claim)  # atomic: one worker claims an armed point
    except FileNotFoundError:
        return
    while claim.exists():
        time.sleep(0.05)


def _process_shard(shard: int, indices: range, skip: Mapping[int, dict], starting: Callable[[int], None]) -> dict:
    """Process the files of one shard and write it; returns its report. Files in `skip` (those
    that hung or crashed a worker before) are reported as they are, not retried."""
    source, settings = _W["source"], _W["settings"]
    rows, kept, rejected = [], [], []
    for i in indices:
        if i in skip:
            rejected.append(skip[i])
            continue
        starting(i)
        name = f"#{i}"
        try:
            item = source[i]
            name = item.name
            if os.environ.get(TEST_FAULTS_ENV) == "1":
                _test_fault(item.data)
            if item.fmt == "midi":
                check_midi_header(item.data)
            score = item.load()
            check_score(score, vars(settings))
            chunks = tokenize_score(score, _W["tokenizer"], _W["vocab"], settings)
        except Rejected as err:
            rejected.append({"name": name, "reason": err.reason, "detail": err.detail})
            continue
        except Exception as err:  # unreadable, corrupt: never fatal for the run
            rejected.append({"name": name, "reason": "unreadable", "detail": f"{type(err).__name__}: {err}"})
            continue
        content = content_hash(chunks)
        split = item.split or split_of(content, _W["split"]["valid"], _W["split"]["test"])
        for c, chunk in enumerate(chunks):
            rows.append((item.name, i, item.md5, split, c, chunk))
        kept.append(
            {
                "name": item.name,
                "index": i,
                "split": split,
                "content": content,
                "chunks": len(chunks),
                "notes": sum(ch.num_notes for ch in chunks),
            }
        )
    starting(-1)  # writing: no file is at fault if this fails
    _test_pause("writing")
    report = {"files": len(indices), "kept": kept, "rejected": rejected}
    write_shard(Path(settings.store), shard, rows, report)
    return report


def _parent_death_signal() -> None:
    """Linux: die with the parent (a killed run must not leave workers writing its shards)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn, init_args: tuple | None) -> None:
    _parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if init_args is not None:  # spawn: nothing inherited
        _init_worker(*init_args)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        shard, indices, skip = job
        try:
            report = _process_shard(shard, indices, skip, lambda i: conn.send(("file", i)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return
        conn.send(("done", report))
        _test_pause("idle")


# ----------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    proc: Any
    conn: Any
    job: tuple[int, range] | None = None
    lock: AbstractContextManager | None = None
    file: int = -1  # index of the file in progress, -1 for none
    since: float = 0.0
    cpu_since: float | None = None  # the worker's CPU seconds when it started the file
    cpu_seen: float | None = None  # its CPU seconds when last seen advancing...
    seen_at: float = 0.0  # ...and when that was

    def start_file(self, file: int) -> None:
        self.file, self.since = file, time.monotonic()
        self.cpu_since = self.cpu_seen = _cpu_seconds(self.proc.pid)
        self.seen_at = self.since

    def hung(self, timeout: float) -> bool:
        """On its file for over `timeout` seconds of its own CPU time (a loop), or without using
        any CPU for `timeout` seconds (blocked). Wall time alone would also condemn a worker that
        only waits for a core on an oversubscribed node, and the files kept would depend on the
        machine's load. Without /proc: wall time."""
        now = time.monotonic()
        cpu = _cpu_seconds(self.proc.pid)
        if cpu is None or self.cpu_since is None:
            return now - self.since > timeout
        if cpu > self.cpu_seen:
            self.cpu_seen, self.seen_at = cpu, now
        return cpu - self.cpu_since > timeout or now - self.seen_at > timeout


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc; None elsewhere or once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Jobs:
    """The shards still to do, the files that hung or crashed a worker (per shard), and how
    often a shard's worker died while on none of its files."""

    pending: deque
    skips: dict[int, dict[int, dict]] = field(default_factory=dict)
    deaths: Counter = field(default_factory=Counter)


def _signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def _run_isolated(
    jobs: list[tuple[int, range]],
    num_workers: int,
    timeout: float,
    init_args: tuple,
    store: Path,
    on_done: Callable[[dict], None],
) -> None:
    """Process `jobs` in worker processes, each shard under its lock; survive any single file.
    `_W` must hold this run's state (`_set_state`)."""
    # fork where available: workers start at once with the parent's state (spawn re-imports).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "fork":
        init_args = None
    todo = _Jobs(deque(jobs))
    workers: list[_Worker] = []
    finished = False

    def start() -> _Worker:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, init_args), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def send(w: _Worker, message) -> None:
        with contextlib.suppress(ConnectionError):  # BrokenPipeError, ConnectionResetError: a dead worker
            w.conn.send(message)

    def release(w: _Worker) -> None:
        if w.lock is not None:
            w.lock.__exit__(None, None, None)
        w.job, w.lock, w.file = None, None, -1

    def assign(w: _Worker) -> None:
        while todo.pending and w.job is None:
            shard, indices = todo.pending.popleft()
            lock = acquire_lock(store / "shards", f"{shard:05d}")
            lock.__enter__()  # LockHeld: another run works on this shard
            if shard in done_shards(store):  # done by another task meanwhile
                lock.__exit__(None, None, None)
                continue
            remove_partial_shard(store, shard)  # left by a run killed while writing it
            w.job, w.lock, w.file, w.since = (shard, indices), lock, -1, time.monotonic()
            # A worker killed while idle cannot take the job: the send fails, or the job waits
            # unread in the pipe. Either way its death is seen below, as if it died on the shard.
            send(w, (shard, indices, todo.skips.get(shard, {})))

    def lost(w: _Worker, reason: str, how: str) -> None:
        """The worker is gone. On a file: that file is rejected and the shard redone without
        it. On none (before its first, writing the shard, or killed while idle and then given
        the shard): the shard is redone as it was, unless that was its MAX_SHARD_TRIES-th such
        death: then the run fails."""
        shard, indices = w.job
        if w.file >= 0:
            try:
                name = _W["source"][w.file].name
            except Exception:  # noqa: BLE001 - the name is only for the report
                name = f"#{w.file}"
            detail = f"{how}: the worker process died on this file" if reason == "crashed" else how
            log.warning("%s: %s (%s); the other files go on", name, reason, detail)
            todo.skips.setdefault(shard, {})[w.file] = {"name": name, "reason": reason, "detail": detail}
        else:
            todo.deaths[shard] += 1
            if todo.deaths[shard] >= MAX_SHARD_TRIES:  # `finally` below removes its partial files, releases its lock
                raise RuntimeError(
                    f"preprocessing workers died {todo.deaths[shard]} times on shard {shard} of {store} while on "
                    f"none of its files (last: {how}), e.g. killed by the out-of-memory killer while building or "
                    "writing the shard: give the run more memory or lower data.preprocess.shard_size or "
                    "num_workers, then re-run (finished shards are kept)"
                )
            log.warning(
                "a preprocessing worker died on shard %d while on none of its files (%s); the shard is redone",
                shard,
                how,
            )
        todo.pending.appendleft((shard, indices))
        w.lock.__exit__(None, None, None)
        w.job, w.lock = None, None

    try:
        for _ in range(min(num_workers, len(jobs))):
            workers.append(start())
        while todo.pending or any(w.job for w in workers):
            for w in workers:
                if w.job is None:
                    assign(w)
            busy = [w for w in workers if w.job is not None]
            if not busy:
                continue
            # A worker on a file is looked at every second at least (its CPU time is sampled).
            wait_s = min(1.0, timeout) if any(w.file >= 0 for w in busy) else None
            ready = wait([x for w in busy for x in (w.conn, w.proc.sentinel)], timeout=wait_s)
            for i, w in enumerate(workers):
                if w.job is None:
                    continue
                dead = w.proc.sentinel in ready
                # A dead worker's last messages (the file it started) are read before its death is judged.
                while (dead or w.conn in ready) and w.conn.poll():
                    try:
                        kind, payload = w.conn.recv()
                    except (EOFError, ConnectionError):
                        dead = True
                        break
                    if kind == "file":
                        w.start_file(payload)
                    elif kind == "done":
                        on_done(payload)
                        release(w)
                        break
                    else:
                        raise RuntimeError(f"preprocessing failed on shard {w.job[0]} of {store}:\n{payload}")
                if w.job is None:
                    continue
                if dead:
                    w.proc.join()
                    code = w.proc.exitcode
                    lost(w, "crashed", _signal_name(-code) if code and code < 0 else f"exit code {code}")
                elif w.file >= 0 and w.hung(timeout):
                    # Killed from here: a hang inside C code ignores anything the worker could do itself.
                    w.proc.kill()
                    w.proc.join()
                    lost(
                        w,
                        "timeout",
                        f"over file_timeout={timeout:g}s of CPU time, or that long without "
                        "using any: the worker was killed",
                    )
                else:
                    continue
                w.conn.close()
                workers[i] = start()
        for w in workers:
            send(w, None)  # one killed while idle has nothing left to do: its exit code is not looked at
        finished = True
    finally:  # normally the workers are idle and told to stop; after an error they are killed
        for w in workers:
            w.proc.join(timeout=10 if finished else 0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            if w.lock is not None:  # killed mid-shard: its half-written files go before the lock
                remove_partial_shard(store, w.job[0])
                w.lock.__exit__(None, None, None)


# ----------------------------------------------------------------------------- the store


def _manifest(source, tokenizer, data_cfg: Mapping, shard_size: int) -> dict:
    return {
        "format": STORE_FORMAT,
        "source": source.description,
        "source_fingerprint": source.fingerprint(),
        "num_files": len(source),
        "tokenizer": tokenizer_settings(tokenizer),
        "vocab_fingerprint": vocab_fingerprint(tokenizer),
        "shard_size": shard_size,
        "split": dict(data_cfg["split"]),
        "filters": {k: v for k, v in data_cfg["preprocess"].items() if k not in _RUN_KEYS},
    }


# Manifest key -> the setting a user changes.
_SETTING_NAMES = {
    "filters": "data.preprocess",
    "split": "data.split",
    "tokenizer": "tokenizer.params",
    "shard_size": "data.preprocess.shard_size",
}


def check_manifest(store: Path, manifest: dict) -> None:
    """Refuse a store made from other files, settings or by another store format, saying what changed."""
    previous = json.loads((store / "manifest.json").read_text())
    if previous == manifest:
        return
    changes = []
    if previous.get("format") != manifest["format"]:
        changes.append(f"store format {previous.get('format', 1)} -> {manifest['format']} (made by an older mmm)")
    elif (
        previous.get("source_fingerprint") != manifest["source_fingerprint"]
        or previous.get("num_files") != manifest["num_files"]
    ):
        changes.append(
            f"the source's files (data.source; store made from {previous.get('source')}, now {manifest['source']})"
        )
    for key, name in _SETTING_NAMES.items():
        if previous.get("format") == manifest["format"]:
            changes += setting_changes(previous.get(key), manifest[key], f"{name}." if key != "shard_size" else name)
    if not changes:
        changes.append("the tokenizer's base vocabulary (same settings: another miditok version?)")
    raise RuntimeError(
        f"the store at {store} was made from other data or settings; changed: {'; '.join(changes)}. "
        f"Rebuild it: delete {store} (and any tokenizer trained on it) and re-run, or point data.store "
        "(data.dir) elsewhere to keep both"
    )


def _write_if_changed(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if not path.is_file() or path.read_bytes() != data:
        atomic_write_bytes(path, data)


def preprocess(data_cfg: Mapping, tokenizer_cfg: Mapping, task: tuple[int, int] | None = None) -> dict:
    """Build (or complete, or check) the token store of `data_cfg`; returns the merged report.

    `task=(i, n)`: do only shards s with s % n == i (one task of a job array). The store is
    complete, `report.json` written, when the last shard is done, by whichever run does it.
    A complete store whose manifest matches is returned as is; one that does not is refused.
    """
    data_cfg, tokenizer_cfg = plain(data_cfg), plain(tokenizer_cfg)
    settings = dataclasses.asdict(check_section("data.preprocess", data_cfg["preprocess"], PreprocessConfig))
    check_section("data.split", data_cfg["split"], SplitConfig)
    store = Path(data_cfg["store"])
    settings["store"] = str(store)
    params = tokenizer_cfg["params"]
    tokenizer = build_tokenizer(params)  # validates the tokenizer config before any work
    source = build_source(data_cfg["source"])
    if settings["shard_size"] is None:
        # About 64 shards, 1 to 256 files each: small corpora still spread over every worker,
        # large ones do not drown the store in files. It depends on the corpus only, so the
        # same store can be resumed with another number of workers.
        settings["shard_size"] = max(1, min(256, -(-len(source) // 64)))
    manifest = _manifest(source, tokenizer, data_cfg, settings["shard_size"])
    size = settings["shard_size"]
    num_shards = (len(source) + size - 1) // size
    if (store / "manifest.json").is_file():
        check_manifest(store, manifest)
        if (store / "report.json").is_file() and len(done_shards(store)) == num_shards:
            # Complete and current: read only, so runs sharing the store need no lock.
            log.info("the store at %s is complete and made with these settings: nothing to do", store)
            return {
                **json.loads((store / "report.json").read_text()),
                "store": str(store),
                "seconds_this_run": 0.0,
                "files_processed_this_run": 0,
            }
    # A whole run owns the store; tasks of an array share it, each locking its shards only.
    lock = (
        acquire_lock(store, "preprocess")
        if task is None
        else acquire_lock(store / "shards", f"task-{task[0]}-of-{task[1]}")
    )
    with lock:
        if (store / "manifest.json").is_file():
            check_manifest(store, manifest)
        else:
            atomic_write_json(store / "manifest.json", manifest)
        return _build(store, source, tokenizer, settings, data_cfg, params, num_shards, task)


def _build(
    store: Path,
    source,
    tokenizer,
    settings: dict,
    data_cfg: dict,
    params: dict,
    num_shards: int,
    task: tuple[int, int] | None,
) -> dict:
    size = settings["shard_size"]
    files_of = lambda s: range(s * size, min((s + 1) * size, len(source)))  # noqa: E731
    mine = [s for s in range(num_shards) if task is None or s % task[1] == task[0]]
    done = done_shards(store)
    jobs = [(s, files_of(s)) for s in mine if s not in done]
    where = "" if task is None else f" (task {task[0]} of {task[1]}: {len(mine)} shards)"
    log.info(
        "%s: %d files, %d shards (%d already done)%s", source.description, len(source), num_shards, len(done), where
    )
    start = time.perf_counter()
    bar = tqdm(
        total=sum(len(files_of(s)) for s in mine),
        initial=sum(len(files_of(s)) for s in mine if s in done),
        desc="preprocess",
        unit="file",
    )
    init_args = (data_cfg["source"], params, settings, dict(data_cfg["split"]))
    _set_state(source, tokenizer, settings, dict(data_cfg["split"]))
    if jobs:
        _run_isolated(
            jobs,
            settings["num_workers"],
            float(settings["file_timeout"]),
            init_args,
            store,
            lambda report: bar.update(report["files"]),
        )
    bar.close()
    run = {
        "store": str(store),
        "seconds_this_run": round(time.perf_counter() - start, 2),
        "files_processed_this_run": sum(len(j[1]) for j in jobs),
    }
    missing = num_shards - len(done_shards(store))
    if missing:  # another task's shards are not done yet: the store is not complete
        log.info(
            "task %d of %d done; %d shards of the store are still to do by other tasks. The last task to "
            "finish writes report.json (or re-run without task settings to do what is left and merge)",
            task[0],
            task[1],
            missing,
        )
        return {**run, "complete": False, "shards_missing": missing}
    report = merge_reports(store, num_shards)
    _write_if_changed(store / "report.json", report)
    log.info(summary({**report, **run}))
    return {**report, **run}


def merge_reports(store: Path, num_shards: int) -> dict:
    """The store's report from its shards' reports. Of each group of exact duplicates (same
    tokenized content) one file is kept: the one in the most held-out split (test, then valid,
    then train; only differs when the source gives splits), then the first in source order."""
    kept, rejected = [], []
    for shard in range(num_shards):
        part = json.loads(shard_paths(store, shard)[1].read_text())
        kept += part["kept"]
        rejected += part["rejected"]
    rank = {"test": 0, "valid": 1, "train": 2}
    first: dict[str, dict] = {}
    for k in sorted(kept, key=lambda k: (rank[k["split"]], k["index"])):
        first.setdefault(k["content"], k)
    unique = [k for k in kept if first[k["content"]] is k]
    duplicates = [
        {"name": k["name"], "index": k["index"], "split": k["split"], "same_as": first[k["content"]]["name"]}
        for k in kept
        if first[k["content"]] is not k
    ]
    splits = {s: {"files": 0, "chunks": 0} for s in SPLITS}
    for k in unique:
        splits[k["split"]]["files"] += 1
        splits[k["split"]]["chunks"] += k["chunks"]
    return {
        "files": len(kept) + len(rejected),
        "kept": len(unique),
        "duplicates": len(duplicates),
        "duplicate_files": duplicates,
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
        "rejected_files": rejected,
        "splits": splits,
        "kept_files": unique,
    }


def summary(report: dict) -> str:
    lines = [
        f"store: {report['store']}",
        f"files: {report['files']}  kept: {report['kept']}  duplicates: {report['duplicates']}  rejected: {report['rejected']}",
        "splits: " + ", ".join(f"{s} {v['files']} files / {v['chunks']} chunks" for s, v in report["splits"].items()),
    ]
    for r in report["rejected_files"]:
        lines.append(f"  rejected {r['name']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else ""))
    for d in report["duplicate_files"]:
        lines.append(f"  duplicate {d['name']}: same music as {d['same_as']} (kept once)")
    return "\n".join(lines)
