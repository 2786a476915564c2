"""Which time signatures of real MIDI files the tokenizer misses, and what that does to bar numbers.

    python experiments/serve/time_signatures.py <folder> [<folder> ...] [--tokenizer configs/tokenizer/mmm.yaml]

For every .mid/.midi/.abc file: its time signatures (files and bars in each, on the file's own
bar grid), whether each is in the vocabulary of (a) miditok's default `time_signature_range`
and (b) the tokenizer config given, and for each of the two whether the model's bar grid
(`mmm.generation.scores.bar_grid`) differs from the file's: the bars a musician reads in a DAW are then not
the bars the API rewrites. Prints two markdown tables.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import yaml
from symusic import Score

from mmm.generation.scores import bar_grid
from mmm.tokenizer import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=Path("configs/tokenizer/mmm.yaml"))
    args = parser.parse_args()
    params = yaml.safe_load(args.tokenizer.read_text())["params"]
    default = {k: v for k, v in params.items() if k != "time_signature_range"}
    tokenizers = {"miditok default": build_tokenizer(default), args.tokenizer.name: build_tokenizer(params)}
    known = {
        name: {t.split("_", 1)[1] for t in tok.vocab if t.startswith("TimeSig_")} for name, tok in tokenizers.items()
    }

    files = sorted(
        p for folder in args.folders for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi", ".abc")
    )
    ts_files: dict[str, set[str]] = defaultdict(set)
    ts_bars: Counter = Counter()
    differs: dict[str, list[str]] = {name: [] for name in tokenizers}
    read = 0
    for path in files:
        try:
            score = Score(str(path))
        except Exception:
            continue
        if not any(len(t.notes) for t in score.tracks):
            continue
        read += 1
        grid = None
        for name, tok in tokenizers.items():
            try:
                grid = bar_grid(score, tok)
            except ValueError:
                continue
            if grid.first_difference is not None:
                differs[name].append(f"{path.name} (bar {grid.first_difference})")
        if grid is None:
            continue
        for ts in grid.file_time_signatures:
            text = f"{ts[0]}/{ts[1]}"
            ts_files[text].add(path.name)
            ts_bars[text] += 1

    names = list(tokenizers)
    print(f"{read} files read of {len(files)}\n")
    print(f"| time signature | files | bars | in {names[0]} | in {names[1]} |")
    print("|---|---:|---:|:-:|:-:|")
    for text, bars in ts_bars.most_common():
        marks = ["yes" if text in known[n] else "**no**" for n in names]
        print(f"| {text} | {len(ts_files[text])} | {bars} | {marks[0]} | {marks[1]} |")
    print("\n| tokenizer | files whose model bar grid differs from the file's (first differing bar) |")
    print("|---|---|")
    for n in names:
        print(f"| {n} | {len(differs[n])}: {', '.join(differs[n]) or '-'} |")


if __name__ == "__main__":
    main()
