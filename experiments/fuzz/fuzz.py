"""Fuzz preprocessing with N mutated MIDI files; count crashes, hangs, rejections, kept files.

    nice -n 15 .venv/bin/python experiments/fuzz/fuzz.py --count 5000 --midi ../shared/midi --write-readme

Mutants are made from seed files (the `.mid` files under `--midi`, else synthetic pieces),
one mutation each, in turn:
  flip       random bytes overwritten, the header included
  truncate   cut at a random byte
  header     an absurd header field: track count, format, division, header length
  delta      a huge delta time (0x0FFFFFFF ticks) before a random event
  status     running-status misuse: a status byte removed, so data bytes follow another
             event kind (or none at all)
  track_len  a track's length field zeroed, made too long or too short, or empty tracks added
  score      still a valid file: notes moved far, absurd durations and pitches, odd tempos
             and time signatures (the tokenizer meets odd but readable content)
All go through `mmm.preprocess` with 2 workers; a worker that dies is counted as a crash, one
killed at `file_timeout` as a hang. Peak memory is the largest resident set of a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("flip", "truncate", "header", "delta", "status", "track_len", "score")


def tracks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each MTrk chunk's data, by the length fields (stops at the first bad one)."""
    out, pos = [], 8 + struct.unpack(">I", data[4:8])[0] if len(data) >= 8 else len(data)
    while pos + 8 <= len(data) and data[pos : pos + 4] == b"MTrk":
        length = struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        out.append((pos + 8, min(pos + 8 + length, len(data))))
        pos += 8 + length
    return out


def with_track(data: bytearray, start: int, end: int, body: bytes) -> bytearray:
    """Replace a track's data and fix its length field."""
    return data[: start - 4] + struct.pack(">I", len(body)) + body + data[end:]


def event_starts(body: bytes) -> list[int]:
    """Offsets of status bytes in a track (a rough scan: bytes >= 0x80 after a delta time)."""
    return [i for i in range(1, len(body)) if 0x80 <= body[i] < 0xF0 and body[i - 1] < 0x80]


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    data = bytearray(data)
    spans = tracks(bytes(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 40)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        data = data[: rng.randrange(1, len(data))]
    elif kind == "header":
        field = rng.choice(["ntracks", "format", "division", "length"])
        if field == "ntracks":
            data[10:12] = struct.pack(">H", rng.choice([0, 1000, 65535]))
        elif field == "format":
            data[8:10] = struct.pack(">H", rng.choice([2, 3, 255, 65535]))
        elif field == "division":
            data[12:14] = struct.pack(">H", rng.choice([0, 1, 0x7FFF, 0x8000, 0xE250, 0xFFFF]))
        else:
            data[4:8] = struct.pack(">I", rng.choice([0, 5, 7, 1000, 0xFFFFFFFF]))
    elif kind == "delta" and spans:
        start, end = rng.choice(spans)
        body = bytes(data[start:end])
        events = event_starts(body) or [1]
        at = rng.choice(events) - 1  # the delta byte before that event
        huge = bytes([0x8F, 0xFF, 0xFF, 0x7F])  # 0x0FFFFFFF, the largest legal delta
        data = with_track(data, start, end, body[:at] + huge + body[at + 1 :])
    elif kind == "status" and spans:
        start, end = rng.choice(spans)
        body = bytes(data[start:end])
        events = event_starts(body)
        if events:
            for at in sorted(rng.sample(events, k=min(len(events), rng.randint(1, 5))), reverse=True):
                body = body[:at] + body[at + 1 :]
        else:
            body = b"\x00\x40\x40" + body  # data bytes with no status at all
        data = with_track(data, start, end, body)
    elif kind == "track_len" and spans:
        start, end = rng.choice(spans)
        how = rng.choice(["zero", "long", "short", "empty_tracks"])
        if how == "empty_tracks":
            data = data + b"MTrk\0\0\0\0" * rng.randint(1, 50)
            data[10:12] = struct.pack(">H", min(65535, len(spans) + 50))
        else:
            length = {
                "zero": 0,
                "long": end - start + rng.randint(1, 10**6),
                "short": rng.randrange(0, max(1, end - start)),
            }[how]
            data[start - 4 : start] = struct.pack(">I", length)
    elif kind == "score":
        return mutate_score(bytes(data), rng)
    return bytes(data)


def mutate_score(data: bytes, rng: random.Random) -> bytes:
    from symusic import Note, Score, Tempo, TimeSignature

    score = Score.from_midi(data)
    for track in score.tracks:
        notes = list(track.notes)
        for note in rng.sample(notes, k=min(len(notes), rng.randint(0, 30))):
            note.time = max(0, note.time + rng.choice([-1, 1]) * rng.randint(0, 10 ** rng.randint(1, 6)))
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
    return score.dumps_midi()


def seeds(midi: Path | None, tmp: Path) -> list[bytes]:
    files = sorted(p for p in midi.rglob("*.mid") if p.parent.name != "invalid") if midi else []
    if not files:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import write_synthetic_midi

        files = [write_synthetic_midi(tmp / f"seed_{i}.mid", i, 16) for i in range(8)]
    return [p.read_bytes() for p in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, required=True, help="number of mutants")
    ap.add_argument("--midi", type=Path, help="folder of seed MIDI files (default: synthetic pieces)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--file-timeout", type=float, default=20)
    ap.add_argument("--out", type=Path, help="where mutants and the store go (default: a temporary folder)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()

    from mmm.data.store_writer import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        mutants = out / "mutants"
        mutants.mkdir(parents=True, exist_ok=True)
        originals = seeds(args.midi, out)
        rng = random.Random(args.seed)
        made = Counter()
        for i in range(args.count):
            kind = KINDS[i % len(KINDS)]
            try:
                data = mutate(rng.choice(originals), kind, rng)
            except Exception:  # noqa: BLE001 - a seed symusic cannot rewrite: fall back to flips
                kind, data = "flip", mutate(rng.choice(originals), "flip", rng)
            made[kind] += 1
            (mutants / f"{kind}_{i:06d}.mid").write_bytes(data)

        # `python -m mmm.preprocess` on the mutants: the repository's configs, composed by Hydra.
        overrides = [
            "data=folder",
            f"data.path={mutants.resolve()}",
            f"data.store={(out / 'store').resolve()}",
            f"data.preprocess.num_workers={args.workers}",
            "data.preprocess.shard_size=64",
            f"data.preprocess.file_timeout={args.file_timeout}",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("preprocess", overrides=overrides)
        start = time.perf_counter()
        report = preprocess(cfg.data, cfg.tokenizer)
        seconds = time.perf_counter() - start

    by_kind = {k: Counter() for k in KINDS}
    for r in report["rejected_files"]:
        by_kind[r["name"].rsplit("_", 1)[0]][r["reason"]] += 1
    for k in report["kept_files"] + report["duplicate_files"]:
        by_kind[k["name"].rsplit("_", 1)[0]]["kept" if "chunks" in k else "duplicate"] += 1
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reasons = report["rejected_by_reason"]
    result = {
        "mutants": args.count,
        "processed": report["files"],
        "crashes": reasons.get("crashed", 0),
        "hangs": reasons.get("timeout", 0),
        "kept": report["kept"],
        "duplicates": report["duplicates"],
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "seconds": round(seconds, 1),
        "peak_rss_mb": {"worker": round(worker_mb), "parent": round(parent_mb)},
    }
    print(json.dumps(result, indent=1))
    reasons_all = sorted({r for c in by_kind.values() for r in c})
    table = "\n".join(
        [
            "| mutation | mutants | " + " | ".join(reasons_all) + " |",
            "|---|---|" + "---|" * len(reasons_all),
            *(f"| {k} | {made[k]} | " + " | ".join(str(by_kind[k][r]) for r in reasons_all) + " |" for k in KINDS),
        ]
    )
    print(table)
    if args.write_readme:
        readme = Path(__file__).with_name("README.md")
        head = readme.read_text().split("<!-- results -->")[0]
        faults = [r["name"] for r in report["rejected_files"] if r["reason"] in ("crashed", "timeout")]
        readme.write_text(
            f"{head}<!-- results -->\n"
            f"Command: `nice -n 15 .venv/bin/python experiments/fuzz/fuzz.py --count {args.count}"
            f"{' --midi ' + str(args.midi) if args.midi else ''} --seed {args.seed} --write-readme`; "
            f"{len(originals)} seed files; machine: {os.cpu_count()} CPU cores shared with other work "
            f"(load average {os.getloadavg()[0]:.1f} at the end).\n\n"
            f"- files processed: {report['files']} of {args.count}; kept {report['kept']}, duplicates "
            f"{report['duplicates']}, rejected {report['rejected']}\n"
            f"- crashes (a worker died): {result['crashes']}; hangs (killed at file_timeout="
            f"{args.file_timeout:g} s): {result['hangs']}" + (f" ({', '.join(faults[:10])})" if faults else "") + "\n"
            f"- rejected by reason: {json.dumps(result['rejected_by_reason'])}\n"
            f"- peak resident memory: worker {result['peak_rss_mb']['worker']} MB, parent "
            f"{result['peak_rss_mb']['parent']} MB; wall time {seconds:.0f} s with {args.workers} workers\n\n"
            f"Outcome per mutation (kept, duplicate or rejection reason):\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
