"""The token store: Arrow IPC shards of chunks, memory-mapped when read.

Layout of a store folder:
    manifest.json          what made it (source, tokenizer settings, filters, format)
    shards/00042.arrow     the chunks of one shard of source files
    shards/00042.json      that shard's report; written last, so it marks the shard done
    report.json            the merged report, once every shard is done (duplicates listed)

Readers skip the rows of the exact duplicates that report.json lists.

Every file is written to a temporary name then renamed: a killed run leaves either a whole
shard or no shard, never a truncated one, and re-running processes only missing shards.
While a run works on a store it holds `preprocess.lock` (a whole run) and
`shards/<shard>.lock` (each shard in flight; see `mmm.files.locks`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mmm.data.chunks import Chunk
from mmm.files.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401 (mmm.data.store_writer imports them from here)

SPLITS = ("train", "valid", "test")
# Version of the layout and of what decides a row's place (split, duplicates); a store of
# another format is refused like one made with other settings.
STORE_FORMAT = 2

_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("index", pa.int64()),  # the file's index in its source (duplicates are listed by it)
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


def shard_paths(store: Path, shard: int) -> tuple[Path, Path]:
    return store / "shards" / f"{shard:05d}.arrow", store / "shards" / f"{shard:05d}.json"


def write_shard(store: Path, shard: int, rows: Sequence[tuple[str, int, str, str, int, Chunk]], report: dict) -> None:
    """Write one shard's chunks (`(name, index, md5, split, chunk_index, chunk)` rows) then its report."""
    arrow_path, report_path = shard_paths(store, shard)
    arrow_path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {f.name: [] for f in _SCHEMA}
    for name, index, md5, split, chunk_index, chunk in rows:
        columns["name"].append(name)
        columns["index"].append(index)
        columns["md5"].append(md5)
        columns["split"].append(split)
        columns["chunk"].append(chunk_index)
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


def remove_partial_shard(store: Path, shard: int) -> None:
    """Delete the temporary files a killed writer of `shard` left (`.<shard>.arrow.tmp<pid>`...).
    Only the holder of the shard's lock may call this: nobody else is writing them."""
    for tmp in (store / "shards").glob(f".{shard:05d}.*.tmp*"):
        tmp.unlink(missing_ok=True)


def done_shards(store: Path) -> set[int]:
    folder = store / "shards"
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if shard_paths(store, int(p.stem))[0].is_file()}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def setting_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf setting that differs between two JSON-like mappings."""
    a, b = _flat(json.loads(json.dumps(old)), prefix), _flat(json.loads(json.dumps(new)), prefix)
    return [
        f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """The settings of a miditok tokenizer that shape its base vocabulary (BPE state left out)."""
    config = tokenizer.config.to_dict(serialize=True)
    config.pop("additional_params", None)
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def check_vocab(path: str | Path, tokenizer: Any, tokenizer_path: str | Path | None = None) -> None:
    """Refuse a store tokenized with another base vocabulary than `tokenizer`'s, naming the
    settings that differ (a store read with the wrong vocabulary decodes as nonsense)."""
    from mmm.tokenizer import vocab_fingerprint

    path = Path(path)
    if not (path / "manifest.json").is_file():
        return  # no store: `Store` says how to make one
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("vocab_fingerprint") == vocab_fingerprint(tokenizer):
        return
    changes = setting_changes(manifest.get("tokenizer", {}), tokenizer_settings(tokenizer), "tokenizer.params.")
    what = f" ({'; '.join(changes)})" if changes else " (same settings, another miditok version?)"
    raise ValueError(
        f"the store at {path} was tokenized with other tokenizer settings than the tokenizer "
        f"{tokenizer_path or ''}{what}. Rebuild both for the settings you want: delete {path} and that "
        "tokenizer file, then re-run (python -m mmm.train rebuilds both); or point data.dir elsewhere"
    )


class Store:
    """Read-only view of one split of a store; `store[i]` is a dict of python lists.

    Rows of files reported as exact duplicates (`report.json`) are left out."""

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
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(
                f"the store at {self.path} was written by an older version of mmm (format "
                f"{self.manifest.get('format', 1)}, this one reads {STORE_FORMAT}): delete it and re-run "
                "python -m mmm.preprocess (python -m mmm.train does it for you)"
            )
        report = json.loads((self.path / "report.json").read_text())
        duplicates = pa.array([d["index"] for d in report.get("duplicate_files", [])], pa.int64())
        tables = []
        for shard in sorted(done_shards(self.path)):
            source = pa.memory_map(str(shard_paths(self.path, shard)[0]), "r")
            tables.append(pa.ipc.open_file(source).read_all())
        table = pa.concat_tables(tables) if tables else _SCHEMA.empty_table()
        mask = pc.and_(pc.equal(table["split"], split), pc.invert(pc.is_in(table["index"], value_set=duplicates)))
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
