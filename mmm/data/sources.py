"""Music sources: where the training MIDI/ABC files come from.

A *source* is a random-access, deterministically ordered list of :class:`MusicFile`
(``len(src)``, ``src[i]``) plus a cheap ``fingerprint()`` that changes whenever the
set or content of its files changes, so caches built from it can be invalidated.

Three sources exist, picked by ``build_source({"name": ..., **keys})``:

``folder``
    Every ``.mid``/``.midi``/``.abc`` file below a directory (recursive).

``gigamidi``
    The GigaMIDI parquet release (Metacreation/GigaMIDI, CC BY-NC 4.0). It is gated
    on the Hugging Face hub: log in, accept the terms on the dataset page, then::

        huggingface-cli login
        huggingface-cli download Metacreation/GigaMIDI --repo-type dataset \\
            --include "v1.1.0/*" --local-dir data/gigamidi

    (drop ``--include`` to fetch every version) and use
    ``{"name": "gigamidi", "path": "data/gigamidi"}``. The first use converts the
    selected parquet files to a memory-mapped Arrow cache (``datasets``); later uses
    open that cache directly.

``embedded``
    The offline default: works from the corpus shipped inside ``music21`` (Bach
    chorales, or a wider selection of multi-part classical works), converted to
    multi-track MIDI once into a cache directory.
"""

import hashlib
import inspect
import logging
import multiprocessing
import os
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from difflib import get_close_matches
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import symusic

from mmm.data.music21_corpus import EMBEDDED_CORPORA, convert_job, corpus_works

log = logging.getLogger(__name__)

FORMATS = ("midi", "abc")


@dataclass(frozen=True)
class MusicFile:
    """One music file held in memory, named uniquely within its source.

    ``split`` is the split the source itself assigns (GigaMIDI's train/validation/test
    files, as ``"train"``/``"valid"``/``"test"``); None for sources without splits, whose
    files preprocessing assigns by content hash.
    """

    name: str
    data: bytes
    fmt: str
    split: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"{self.name}: unknown format {self.fmt!r}, expected one of {FORMATS}")
        if self.split not in (None, "train", "valid", "test"):
            raise ValueError(f"{self.name}: unknown split {self.split!r}, expected train, valid, test or None")

    @cached_property
    def md5(self) -> str:
        """Hex MD5 of the raw bytes (the content hash the data split is based on)."""
        return hashlib.md5(self.data).hexdigest()

    def load(self) -> symusic.Score:
        """Parse the bytes; any parser failure becomes ``ValueError("<name>: <reason>")``."""
        try:
            if self.fmt == "abc":
                # ABC is text; a stray non-UTF-8 byte in a comment must not reject the tune.
                return symusic.Score.from_abc(self.data.decode("utf-8", errors="replace"))
            return symusic.Score.from_midi(self.data)
        except Exception as e:  # symusic raises RuntimeError/ValueError/... depending on the fault
            raise ValueError(f"{self.name}: {e}") from e


@runtime_checkable
class Source(Protocol):
    description: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> MusicFile: ...

    def fingerprint(self) -> str: ...


def _check_index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for a source of {n} files")
    return i % n


def _files_fingerprint(root: Path, names: Sequence[str], *extra: str, content: bool = False) -> str:
    """Hash of relative names plus sizes (or, with ``content``, MD5s of the bytes).

    Sizes keep it cheap for large collections and equal on every machine holding the
    same files (unlike modification times); an in-place edit that keeps a file's size
    goes unnoticed unless ``content`` is set.
    """
    h = hashlib.sha256("\0".join(extra).encode())
    for name in names:
        path = root / name
        token = hashlib.md5(path.read_bytes()).hexdigest() if content else str(path.stat().st_size)
        h.update(f"\0{name}\0{token}".encode())
    return h.hexdigest()


class _FileListSource:
    """Files listed by relative path below a root directory, read on access."""

    _hash_content = False

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root = root
        self._names = names

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> MusicFile:
        name = self._names[_check_index(i, len(self._names))]
        fmt = "abc" if name.lower().endswith(".abc") else "midi"
        return MusicFile(name=name, data=(self.root / name).read_bytes(), fmt=fmt)

    def fingerprint(self) -> str:
        return _files_fingerprint(self.root, self._names, type(self).__name__, content=self._hash_content)


# ----------------------------------------------------------------------------- folder


class FolderSource(_FileListSource):
    """All music files below ``path`` (recursive), sorted by relative POSIX path.

    Extensions match case-insensitively. Hidden files and folders (``.name``) are
    skipped: they are editor/OS debris such as macOS ``._song.mid`` forks, not music.
    """

    def __init__(
        self, path: str | Path, extensions: Sequence[str] = (".mid", ".midi", ".abc"), max_files: int | None = None
    ) -> None:
        """`max_files` keeps the first N files in sorted order (None: all)."""
        if max_files is not None and (isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1):
            raise ValueError(f"data.source.max_files must be a positive integer or null (all files), got {max_files!r}")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"music folder {str(root)!r} does not exist or is not a directory")
        exts = tuple("." + e.lower().lstrip(".") for e in extensions)
        names = []
        # followlinks: datasets are often assembled from symlinked folders.
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(exts):
                    names.append((Path(dirpath) / f).relative_to(root).as_posix())
        if not names:
            raise ValueError(f"music folder {str(root)!r} holds no file with extension {', '.join(exts)}")
        names = sorted(names)[:max_files]
        super().__init__(root, names)
        self.description = f"folder {root} ({len(names)} files)"


# ----------------------------------------------------------------------------- GigaMIDI

GIGAMIDI_SUBSETS = ("all-instruments-with-drums", "drums-only", "no-drums", "all")
GIGAMIDI_SPLITS = ("train", "validation", "test")
# Spellings of split names seen in GigaMIDI downloads (hub: "train"; raw zips: "training-V1.1-80%").
_SPLIT_ALIASES = {"train": ("train", "training"), "validation": ("validation", "valid", "val"), "test": ("test",)}
_OUR_SPLIT = {"train": "train", "validation": "valid", "test": "test"}  # store split names
# Integer codes of the category column in releases that store it as an int.
_CATEGORY_CODES = {"drums-only": 0, "all-instruments-with-drums": 1, "no-drums": 2}


def _has_token(text: str, token: str, joiners: str) -> bool:
    """``token`` occurs in ``text`` not glued to letters, digits or any of ``joiners``."""
    return re.search(rf"(?<![A-Za-z0-9{joiners}]){re.escape(token)}(?![A-Za-z0-9{joiners}])", text) is not None


def _split_of(rel: Path) -> str | None:
    # The component nearest the file decides: a split folder or file name is more
    # specific than whatever the folders above it happen to be called.
    for part in reversed(rel.parts):
        for split, aliases in _SPLIT_ALIASES.items():
            # "-" may follow a split name ("train-00000-of-00004.parquet").
            if any(_has_token(part.lower(), a, "") for a in aliases):
                return split
    return None


def _subset_in(rel: str, subset: str) -> bool:
    # "-" is part of subset names, so it must not count as a boundary here.
    return _has_token(rel, subset, "-")


class GigaMIDISource:
    """GigaMIDI rows from local parquet files, random access through a memory-mapped cache.

    Files are found by globbing ``*.parquet`` under ``path/version`` (or under ``path``
    itself when it is already that version's folder). A file's split is the split name
    in its path (``v1.0.0/train.parquet``, ``v1.1.0/train/0000.parquet``,
    ``.../training-V1.1-80%/...``). The subset is taken from the path when the files
    are laid out per subset (``v1.0.0/drums-only/test.parquet``); otherwise rows are
    filtered on the ``instrument_category`` column. Names are ``"<split>/<md5>"``, and each
    file carries its GigaMIDI split (preprocessing keeps it instead of hashing).

    ``cache_dir`` is where ``datasets`` keeps its Arrow cache (default: its own).
    """

    def __init__(
        self,
        path: str | Path,
        version: str = "v1.1.0",
        subset: str = "all-instruments-with-drums",
        splits: Sequence[str] | str = GIGAMIDI_SPLITS,
        cache_dir: str | Path | None = None,
    ) -> None:
        if not re.fullmatch(r"v\d+\.\d+\.\d+", version):
            raise ValueError(f"GigaMIDI version {version!r} is not of the form 'v1.1.0'")
        if subset not in GIGAMIDI_SUBSETS:
            raise ValueError(f"GigaMIDI subset {subset!r} unknown; allowed: {', '.join(GIGAMIDI_SUBSETS)}")
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        bad = [s for s in splits if s not in GIGAMIDI_SPLITS]
        if bad or not splits:
            raise ValueError(f"GigaMIDI splits {list(splits)} invalid; allowed: {', '.join(GIGAMIDI_SPLITS)}")
        self.path = Path(path).expanduser()
        self.version, self.subset, self.splits = version, subset, splits

        self._root = self._version_root()
        files_by_split, filters = self._select_files()
        self._fingerprint = _files_fingerprint(
            self._root,
            [f.relative_to(self._root).as_posix() for fs in files_by_split.values() for f in fs],
            "GigaMIDI",
            version,
            subset,
            *splits,
        )

        from datasets import load_dataset  # heavy import, only paid by GigaMIDI users

        loaded = load_dataset(
            "parquet",
            data_files={s: [str(f) for f in fs] for s, fs in files_by_split.items()},
            columns=["md5", "music"],
            filters=filters,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
        self._parts = [(s, loaded[s]) for s in splits]
        self._starts = []
        total = 0
        for _, ds in self._parts:
            self._starts.append(total)
            total += len(ds)
        self._len = total
        if total == 0:
            raise ValueError(f"GigaMIDI: no rows of subset {subset!r} in {sorted(files_by_split)} under {self._root}")
        self.description = f"GigaMIDI {version} {subset} {'+'.join(splits)} ({total} files) at {self.path}"

    def _version_root(self) -> Path:
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"GigaMIDI folder {str(self.path)!r} not found; download it first (see mmm.data.sources docs)"
            )
        if (self.path / self.version).is_dir():
            return self.path / self.version
        versions = sorted(p.name for p in self.path.iterdir() if p.is_dir() and re.fullmatch(r"v\d+\.\d+\.\d+", p.name))
        if versions:
            raise FileNotFoundError(f"GigaMIDI {self.version} not found in {self.path}; versions there: {versions}")
        return self.path  # the user pointed at the version folder itself

    def _select_files(self) -> tuple[dict[str, list[Path]], list[tuple] | None]:
        root = self._root
        found = sorted(
            p
            for p in root.rglob("*.parquet")
            # Skip hidden trees such as the ".cache/huggingface" folder `--local-dir` leaves behind.
            if not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise FileNotFoundError(
                f"GigaMIDI: no parquet file under {root}; download it first (see mmm.data.sources docs)"
            )
        rels = [p.relative_to(root).as_posix() for p in found]
        filters = None
        if self.subset != "all":
            if any(_subset_in(r, self.subset) for r in rels):
                found = [p for p, r in zip(found, rels) if _subset_in(r, self.subset)]
            elif not any(_subset_in(r, s) for r in rels for s in _CATEGORY_CODES):
                # Subsets are not in the layout: they are a column of every file.
                filters = self._category_filter(found)
            else:
                found = []
        by_split = {s: [p for p in found if _split_of(p.relative_to(root)) == s] for s in self.splits}
        missing = [s for s, fs in by_split.items() if not fs]
        if missing:
            shown = "\n  ".join(rels[:30]) + ("\n  ..." if len(rels) > 30 else "")
            raise FileNotFoundError(
                f"GigaMIDI: no parquet file for subset {self.subset!r} and split(s) {missing} under {root}; "
                f"found {len(rels)} parquet file(s):\n  {shown or '(none)'}"
            )
        return by_split, filters

    def _category_filter(self, files: list[Path]) -> list[tuple]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(files[0])
        # Older files name the column "instrument_category" (string); newer ones use a
        # long name starting with it and store 0/1/2 codes.
        columns = [n for n in schema.names if n.startswith("instrument_category")]
        if not columns:
            raise ValueError(
                f"GigaMIDI files under {self._root} name no subset in their paths and have no "
                f"instrument_category column; use subset='all' or a per-subset layout"
            )
        column = "instrument_category" if "instrument_category" in columns else columns[0]
        kind = schema.field(column).type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        return [(column, "==", self.subset if is_text else _CATEGORY_CODES[self.subset])]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> MusicFile:
        i = _check_index(i, self._len)
        k = bisect_right(self._starts, i) - 1
        split, ds = self._parts[k]
        row = ds[i - self._starts[k]]
        # GigaMIDI's own split is kept, so test figures compare with published GigaMIDI results.
        return MusicFile(name=f"{split}/{row['md5']}", data=row["music"], fmt="midi", split=_OUR_SPLIT[split])

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------- embedded music21 corpus
class EmbeddedSource(_FileListSource):
    """music21's built-in corpus converted to MIDI once and cached in ``cache_dir``.

    ``corpus="bach"``: the 410 Bach chorales (the quick one to convert).
    ``corpus="all"``: 1963 works, adding Palestrina, Monteverdi, Josquin, Trecento,
    string quartets (Haydn, Mozart, Beethoven) and other multi-part pieces (much longer
    to convert, mostly a few whole Beethoven quartets that music21 takes minutes each to
    write). A work that fails or has fewer than two parts with notes is
    logged and skipped. ``max_files`` keeps the first N works in sorted order (the
    source then holds those of them that converted). Works are converted in
    ``num_workers`` processes (default: all cores); converted works and recorded
    failures (``*.mid.failed``) are not redone, so delete the cache to retry.
    """

    # The converted files are small, so the fingerprint hashes their bytes: it then stays
    # the same when the cache is deleted and rebuilt identically.
    _hash_content = True

    def __init__(
        self,
        cache_dir: str | Path,
        corpus: str = "bach",
        max_files: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        if corpus not in EMBEDDED_CORPORA:
            raise ValueError(f"embedded corpus {corpus!r} unknown; allowed: {', '.join(EMBEDDED_CORPORA)}")
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files must be a positive integer or None, got {max_files}")
        root = Path(cache_dir).expanduser()
        works = corpus_works(corpus)[:max_files]
        todo = [
            (str(src), str(root / name))
            for name, src in works
            if not (root / name).exists() and not (root / (name + ".failed")).exists()
        ]
        if todo:
            for _, out in todo:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
            self._convert(todo, num_workers or os.cpu_count() or 1)
        names = [name for name, _ in works if (root / name).exists()]
        if not names:
            raise ValueError(f"no work of the music21 {corpus!r} corpus could be converted into {root}")
        super().__init__(root, names)
        self.description = f"music21 corpus {corpus!r} ({len(names)} works) cached in {root}"

    @staticmethod
    def _convert(todo: list[tuple[str, str]], num_workers: int) -> None:
        from tqdm import tqdm

        workers = min(num_workers, len(todo))
        log.info("converting %d music21 works to MIDI with %d process(es)", len(todo), workers)
        pool = None
        if workers == 1:
            results = map(convert_job, todo)
        else:
            # fork where available (as mmm.preprocess does): spawn would re-run the caller's
            # main module in every worker. An executor, unlike multiprocessing.Pool, fails
            # (BrokenProcessPool) instead of hanging when a worker dies.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
            # As completed, so that one long work (minutes for a whole quartet) does not freeze the bar.
            results = (f.result() for f in as_completed([pool.submit(convert_job, job) for job in todo]))
        try:
            for out, error in tqdm(results, total=len(todo), desc="music21 -> MIDI", unit="work"):
                if error is not None:
                    log.warning("skipped %s: %s", out, error)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)  # on an interrupt, do not finish the queue


# ----------------------------------------------------------------------------- config

SOURCES: dict[str, type] = {"folder": FolderSource, "gigamidi": GigaMIDISource, "embedded": EmbeddedSource}


def build_source(cfg: Mapping[str, Any]) -> Source:
    """Build a source from ``{"name": "folder" | "gigamidi" | "embedded", **its keys}``.

    The allowed keys are the constructor's parameters; a misspelled or missing key is
    a ``ValueError`` that names it, so a config typo never silently falls back to a default.
    """
    if "name" not in cfg:
        raise ValueError(f"source config needs a 'name' key, one of: {', '.join(SOURCES)}")
    kind = cfg["name"]
    if kind not in SOURCES:
        raise ValueError(f"unknown source name {kind!r}; allowed: {', '.join(SOURCES)}")
    cls = SOURCES[kind]
    params = inspect.signature(cls).parameters
    allowed = ["name", *params]
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    for key in kwargs:
        if key not in params:
            close = get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r} for source {kind!r}{hint}; allowed keys: {', '.join(allowed)}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(
            f"source {kind!r} needs key(s) {', '.join(map(repr, missing))}; allowed keys: {', '.join(allowed)}"
        )
    return cls(**kwargs)
