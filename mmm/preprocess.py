"""`python -m mmm.preprocess data=<source>`: music files -> token store.

Filters unreadable and unsuitable files (each reported with its reason), splits pieces into
train/valid/test by content hash, chunks them on bar boundaries and stores base token ids
per track and bar. Work is done in shards of files, in parallel; a shard is written
atomically, so an interrupted run resumes where it stopped and never duplicates a chunk.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import signal
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm import tqdm

from mmm.config import plain, require_keys
from mmm.data.checks import check_midi_header, check_score
from mmm.data.pieces import Rejected, tokenize_score
from mmm.data.sources import build_source
from mmm.data.store import SPLITS, atomic_write_json, done_shards, shard_paths, write_shard
from mmm.tokenizer import Vocab, build_tokenizer, vocab_fingerprint

log = logging.getLogger(__name__)

PREPROCESS_KEYS = {
    "num_workers", "shard_size", "min_bars", "min_notes", "max_notes", "max_tracks", "max_bars",
    "tempo_limits", "allow_drums_only", "chunk_max_tokens", "chunk_max_track_tokens", "chunk_min_bars",
    "file_timeout",
}


def split_of(md5: str, valid: float, test: float) -> str:
    """Deterministic split from a content hash: the same file always lands in the same split."""
    x = int(md5[:8], 16) / 2**32
    return "test" if x < test else "valid" if x < test + valid else "train"


class _FileTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _FileTimeout


# Worker state, set once per process by `_init_worker` (fork or spawn alike).
_W: dict[str, Any] = {}


def _init_worker(source_cfg: dict, tokenizer_cfg: dict, settings: dict, split_cfg: dict) -> None:
    tokenizer = build_tokenizer(tokenizer_cfg)
    _W.update(
        source=build_source(source_cfg),
        tokenizer=tokenizer,
        vocab=Vocab(tokenizer),
        settings=SimpleNamespace(**settings),
        split=split_cfg,
    )
    signal.signal(signal.SIGALRM, _on_alarm)


def _process_shard(job: tuple[int, range]) -> tuple[int, dict]:
    """Process the files of one shard and write it. Returns (shard, report)."""
    shard, indices = job
    source, settings = _W["source"], _W["settings"]
    rows, kept, rejected = [], [], []
    for i in indices:
        name = f"#{i}"
        try:
            item = source[i]
            name = item.name
            signal.alarm(int(settings.file_timeout))
            try:
                if item.fmt == "midi":
                    check_midi_header(item.data)
                score = item.load()
                check_score(score, vars(settings))
                chunks = tokenize_score(score, _W["tokenizer"], _W["vocab"], settings)
            finally:
                signal.alarm(0)
        except Rejected as err:
            rejected.append({"name": name, "reason": err.reason, "detail": err.detail})
            continue
        except _FileTimeout:
            rejected.append({"name": name, "reason": "timeout", "detail": f"over file_timeout={settings.file_timeout}s"})
            continue
        except Exception as err:  # unreadable, corrupt: never fatal for the run
            rejected.append({"name": name, "reason": "unreadable", "detail": f"{type(err).__name__}: {err}"})
            continue
        split = split_of(item.md5, _W["split"]["valid"], _W["split"]["test"])
        for c, chunk in enumerate(chunks):
            rows.append((item.name, item.md5, split, c, chunk))
        kept.append({"name": item.name, "split": split, "chunks": len(chunks), "notes": sum(ch.num_notes for ch in chunks)})
    report = {"files": len(indices), "kept": kept, "rejected": rejected}
    write_shard(Path(settings.store), shard, rows, report)
    return shard, report


def _manifest(source, tokenizer, data_cfg: Mapping, shard_size: int) -> dict:
    return {
        "source": source.description,
        "source_fingerprint": source.fingerprint(),
        "num_files": len(source),
        "vocab_fingerprint": vocab_fingerprint(tokenizer),
        "shard_size": shard_size,
        "split": dict(data_cfg["split"]),
        "filters": {k: v for k, v in data_cfg["preprocess"].items() if k not in ("num_workers", "shard_size")},
    }


def preprocess(data_cfg: Mapping, tokenizer_cfg: Mapping) -> dict:
    """Build (or complete) the token store of `data_cfg`; returns the merged report."""
    data_cfg, tokenizer_cfg = plain(data_cfg), plain(tokenizer_cfg)
    settings = dict(data_cfg["preprocess"])
    require_keys("data.preprocess", settings, PREPROCESS_KEYS)
    require_keys("data.split", data_cfg["split"], {"valid", "test"})
    if settings["num_workers"] < 1 or (settings["shard_size"] is not None and settings["shard_size"] < 1):
        raise ValueError("data.preprocess.num_workers must be >= 1 and data.preprocess.shard_size null or >= 1")
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
    manifest_path = store / "manifest.json"
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            raise RuntimeError(
                f"the store at {store} was made from other data or settings (changed: {', '.join(changed)}). "
                "Delete that folder to rebuild it, or point data.store elsewhere."
            )
    else:
        store.mkdir(parents=True, exist_ok=True)
        atomic_write_json(manifest_path, manifest)

    size = settings["shard_size"]
    num_shards = (len(source) + size - 1) // size
    done = done_shards(store)
    jobs = [(s, range(s * size, min((s + 1) * size, len(source)))) for s in range(num_shards) if s not in done]
    log.info("%s: %d files, %d shards (%d already done)", source.description, len(source), num_shards, len(done))
    start = time.perf_counter()
    init_args = (data_cfg["source"], params, settings, dict(data_cfg["split"]))
    bar = tqdm(total=len(source), initial=sum(len(range(s * size, min((s + 1) * size, len(source)))) for s in done),
               desc="preprocess", unit="file")
    if settings["num_workers"] == 1:
        _init_worker(*init_args)
        for job in jobs:
            _process_shard(job)
            bar.update(len(job[1]))
    elif jobs:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        with ctx.Pool(settings["num_workers"], initializer=_init_worker, initargs=init_args) as pool:
            for _, report in pool.imap_unordered(_process_shard, jobs):
                bar.update(report["files"])
    bar.close()
    seconds = time.perf_counter() - start
    report = merge_reports(store, num_shards)
    report["seconds_this_run"] = round(seconds, 2)
    report["files_processed_this_run"] = sum(len(j[1]) for j in jobs)
    atomic_write_json(store / "report.json", report)
    log.info(summary(report))
    return report


def merge_reports(store: Path, num_shards: int) -> dict:
    kept, rejected = [], []
    for shard in range(num_shards):
        part = json.loads(shard_paths(store, shard)[1].read_text())
        kept += part["kept"]
        rejected += part["rejected"]
    splits = {s: {"files": 0, "chunks": 0} for s in SPLITS}
    for k in kept:
        splits[k["split"]]["files"] += 1
        splits[k["split"]]["chunks"] += k["chunks"]
    return {
        "store": str(store),
        "files": len(kept) + len(rejected),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
        "rejected_files": rejected,
        "splits": splits,
        "kept_files": kept,
    }


def summary(report: dict) -> str:
    lines = [
        f"store: {report['store']}",
        f"files: {report['files']}  kept: {report['kept']}  rejected: {report['rejected']}",
        "splits: " + ", ".join(f"{s} {v['files']} files / {v['chunks']} chunks" for s, v in report["splits"].items()),
    ]
    for r in report["rejected_files"]:
        lines.append(f"  rejected {r['name']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else ""))
    return "\n".join(lines)


def main() -> None:
    import hydra

    @hydra.main(config_path="../configs", config_name="preprocess", version_base="1.3")
    def _run(cfg) -> None:
        preprocess(cfg.data, cfg.tokenizer)

    _run()


if __name__ == "__main__":
    main()
