"""Music files -> token store: the work of `python -m mmm.preprocess` (its docstring says what
the command does). Here: what a worker does with a shard (`ShardWriter`: file checks,
tokenization, the shard written atomically) and the claim on a shard (`shard_claim`, its lock),
both handed to the worker supervisor (`mmm.data.workers`: hang and crash isolation); the
manifest that refuses a store made with other settings; and the merged report."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm import tqdm

from mmm.config import at_least, check_section, interval, plain, within
from mmm.data.checks import Rejected, check_midi_header, check_score
from mmm.data.chunks import tokenize_score
from mmm.data.sources import MusicFile, build_source
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
from mmm.data.workers import Supervisor
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
    """(index, count) of this task's share of the shards; None for a whole run.

    The share of a job-array task comes from the arguments or else Slurm's array variables.
    Slurm numbers tasks from SLURM_ARRAY_TASK_MIN (`--array=1-4` too); the array must be
    contiguous (no `:step`). The tasks of one `srun` step (`srun -n 4 python -m mmm.preprocess`:
    same SLURM_JOB_ID and SLURM_STEP_ID, SLURM_PROCID 0 to SLURM_STEP_NUM_TASKS - 1) share
    the work the same way, dividing the array task's share when both are given: each would
    otherwise be a whole run of its own, and all but the first would stop at once on the
    store's lock."""
    if task_index is None and task_count is None and "SLURM_ARRAY_TASK_ID" in env:
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        task_count = int(env.get("SLURM_ARRAY_TASK_COUNT", 0))
    if task_index is not None or task_count is not None:
        if not isinstance(task_index, int) or not isinstance(task_count, int) or not 0 <= task_index < task_count:
            raise ValueError(
                f"task_index={task_index!r}, task_count={task_count!r}: both must be set, with "
                "0 <= task_index < task_count (or leave both null for a whole run)"
            )
    step = _step_task(env)
    if step is None:
        return None if task_index is None else (task_index, task_count)
    if task_index is None:
        return step
    return task_index * step[1] + step[0], task_count * step[1]


def _step_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(SLURM_PROCID, SLURM_STEP_NUM_TASKS) inside an `srun` step of several tasks, else None
    (a batch script's own process is no step task, whatever SLURM_NTASKS says)."""
    if "SLURM_STEP_ID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None
    try:
        rank, count = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    except (KeyError, ValueError):
        raise ValueError(
            f"srun step {env.get('SLURM_JOB_ID')}.{env['SLURM_STEP_ID']}: SLURM_PROCID="
            f"{env.get('SLURM_PROCID')!r} and SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']!r} must be "
            "integers: they tell this task's share of the shards"
        ) from None
    if count <= 1:
        return None
    if not 0 <= rank < count:
        raise ValueError(f"SLURM_PROCID={rank} is not in [0, SLURM_STEP_NUM_TASKS={count})")
    return rank, count


# ----------------------------------------------------------------------------- one shard


def tokenize_file(item: MusicFile, tokenizer, vocab: Vocab, settings: SimpleNamespace) -> list:
    """The chunks of one file, after its checks; raises `Rejected` (or any error of a corrupt
    file) when it is not kept. Runs in a worker process (`mmm.data.workers`)."""
    if item.fmt == "midi":
        check_midi_header(item.data)
    score = item.load()
    check_score(score, vars(settings))
    return tokenize_score(score, tokenizer, vocab, settings)


class ShardWriter:
    """The work of a worker process (`mmm.data.workers.ShardWork`): the files of one shard
    checked, tokenized and written as the shard, with its report."""

    def __init__(self, source, tokenizer, settings: dict, split_cfg: Mapping) -> None:
        self.source, self.tokenizer, self.vocab = source, tokenizer, Vocab(tokenizer)
        self.settings, self.split = SimpleNamespace(**settings), dict(split_cfg)

    @classmethod
    def from_configs(cls, source_cfg: dict, tokenizer_cfg: dict, settings: dict, split_cfg: dict) -> ShardWriter:
        """Built in a spawned worker, which inherits nothing."""
        return cls(build_source(source_cfg), build_tokenizer(tokenizer_cfg), settings, split_cfg)

    def __call__(self, shard: int, files: range, skip: Mapping[int, dict], starting: Callable[[int], None]) -> dict:
        """Process the files of one shard and write it; returns its report. Files in `skip`
        (those that hung or crashed a worker before) are reported as they are, not retried."""
        rows, kept, rejected = [], [], []
        for i in files:
            if i in skip:
                rejected.append(skip[i])
                continue
            starting(i)
            name = f"#{i}"
            try:
                item = self.source[i]
                name = item.name
                chunks = tokenize_file(item, self.tokenizer, self.vocab, self.settings)
            except Rejected as err:
                rejected.append({"name": name, "reason": err.reason, "detail": err.detail})
                continue
            except Exception as err:  # unreadable, corrupt: never fatal for the run
                rejected.append({"name": name, "reason": "unreadable", "detail": f"{type(err).__name__}: {err}"})
                continue
            content = content_hash(chunks)
            split = item.split or split_of(content, self.split["valid"], self.split["test"])
            rows += [(item.name, i, item.md5, split, c, chunk) for c, chunk in enumerate(chunks)]
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
        report = {"files": len(files), "kept": kept, "rejected": rejected}
        write_shard(Path(self.settings.store), shard, rows, report)
        return report


@contextlib.contextmanager
def shard_claim(store: Path, shard: int) -> Iterator[bool]:
    """Hold the shard's lock while a worker is on it (`LockHeld`: another run works on it).
    Yields False when the shard is done already (by another task meanwhile). Whatever a worker
    killed while writing the shard left (in this run or an earlier one) is removed before the
    shard is written and when the claim is let go unfinished."""
    with acquire_lock(store / "shards", f"{shard:05d}"):
        if shard in done_shards(store):
            yield False
            return
        remove_partial_shard(store, shard)
        try:
            yield True
        finally:
            if shard not in done_shards(store):
                remove_partial_shard(store, shard)


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

    `task=(i, n)`: do only shards s with s % n == i (one task of a job array or of an `srun`
    step, `array_task`). The store is complete, `report.json` written, when the last shard is
    done, by whichever run does it.
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
    if jobs:
        supervisor = Supervisor(
            ShardWriter(source, tokenizer, settings, data_cfg["split"]),
            setup=(ShardWriter.from_configs, data_cfg["source"], params, settings, dict(data_cfg["split"])),
            num_workers=settings["num_workers"],
            timeout=float(settings["file_timeout"]),
            claim=lambda shard: shard_claim(store, shard),
            file_name=lambda i: source[i].name,
            where=str(store),
        )
        supervisor.run(jobs, lambda report: bar.update(report["files"]))
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
