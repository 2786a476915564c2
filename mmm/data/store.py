"""The token store: Arrow IPC shards of chunks, memory-mapped when read.

Layout of a store folder:
    manifest.json          what made it (source fingerprint, vocab fingerprint, settings)
    shards/00042.arrow     the chunks of one shard of source files
    shards/00042.json      that shard's report; written last, so it marks the shard done
    report.json            the merged report of all shards

Every file is written to a temporary name then renamed: a killed run leaves either a whole
shard or no shard, never a truncated one, and re-running processes only missing shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mmm.data.pieces import Chunk

SPLITS = ("train", "valid", "test")

_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("md5", pa.string()),
        ("split", pa.string()),
        ("chunk", pa.int32()),
        ("tpq", pa.int32()),
        ("start_tick", pa.int64()),
        ("num_notes", pa.int32()),
        ("programs", pa.list_(pa.int16())),
        ("bar_ticks", pa.list_(pa.int64())),
        ("bars", pa.list_(pa.list_(pa.list_(pa.int32())))),
        ("track_acs", pa.list_(pa.list_(pa.list_(pa.int32())))),
        ("bar_acs", pa.list_(pa.list_(pa.list_(pa.list_(pa.int32()))))),
    ]
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def shard_paths(store: Path, shard: int) -> tuple[Path, Path]:
    return store / "shards" / f"{shard:05d}.arrow", store / "shards" / f"{shard:05d}.json"


def write_shard(store: Path, shard: int, rows: Sequence[tuple[str, str, str, int, Chunk]], report: dict) -> None:
    """Write one shard's chunks (`(name, md5, split, chunk_index, chunk)` rows) then its report."""
    arrow_path, report_path = shard_paths(store, shard)
    arrow_path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {f.name: [] for f in _SCHEMA}
    for name, md5, split, index, chunk in rows:
        columns["name"].append(name)
        columns["md5"].append(md5)
        columns["split"].append(split)
        columns["chunk"].append(index)
        columns["tpq"].append(chunk.tpq)
        columns["start_tick"].append(chunk.start_tick)
        columns["num_notes"].append(chunk.num_notes)
        columns["programs"].append(chunk.programs)
        columns["bar_ticks"].append(chunk.bar_ticks)
        columns["bars"].append(chunk.bars)
        columns["track_acs"].append(chunk.track_acs)
        columns["bar_acs"].append(chunk.bar_acs)
    table = pa.table(columns, schema=_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, _SCHEMA) as writer:
        writer.write_table(table)
    atomic_write_bytes(arrow_path, sink.getvalue().to_pybytes())
    atomic_write_json(report_path, report)


def done_shards(store: Path) -> set[int]:
    folder = store / "shards"
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if shard_paths(store, int(p.stem))[0].is_file()}


class Store:
    """Read-only view of one split of a store; `store[i]` is a dict of python lists."""

    def __init__(self, path: str | Path, split: str) -> None:
        self.path = Path(path)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        manifest = self.path / "manifest.json"
        if not manifest.is_file() or not (self.path / "report.json").is_file():
            raise FileNotFoundError(
                f"no complete token store at {self.path}: run `python -m mmm.preprocess` (or let "
                "`python -m mmm.train` do it) first"
            )
        self.manifest = json.loads(manifest.read_text())
        tables = []
        for shard in sorted(done_shards(self.path)):
            source = pa.memory_map(str(shard_paths(self.path, shard)[0]), "r")
            tables.append(pa.ipc.open_file(source).read_all())
        table = pa.concat_tables(tables) if tables else _SCHEMA.empty_table()
        mask = pc.equal(table["split"], split)
        self.table = table.filter(mask)
        self.split = split

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} out of range for {len(self)} chunks in split {self.split!r}")
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def num_tokens(self) -> int:
        """Base tokens of all chunks (all tracks), without attribute controls."""
        flat = pc.list_flatten(pc.list_flatten(pc.list_flatten(self.table["bars"])))
        return len(flat)
