"""Infills and new tracks on music outside the training corpus (a folder of MIDI files, e.g. the
shared test files), measured as a user would check them: silence, pitch range, exact structure;
then whether the model listens there, as `python -m mmm.evaluate` measures it on the test split.

    python experiments/shipped_model/outside_music.py models/mmm-music21-small ../shared/midi/multitrack

For each file: a 4-bar infill of the busiest pitched track in the middle of the piece, and a
new track (that track's program) over those bars and the 4 before them; seeds 0, 1, ... .
Prints a Markdown table and the totals. Then the listening benchmark on a window of
`--window-bars` bars in the middle of each file: 2 bars in the middle of every pitched track
infilled by the model under each prompt and by the naive baselines, judged against the real
piece (`mmm.evaluate.listening`); `--parts listening` runs that part alone.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from symusic import Score

from mmm import MMM
from mmm.evaluate.listening import Listening, ListeningConfig
from mmm.evaluate.report import listening_section
from mmm.generation.request import Request, SamplingConfig
from mmm.generation.scores import count_bars


def notes_in(track, start: int, end: int) -> np.ndarray:
    n = track.notes.numpy()
    inside = (n["time"] >= start) & (n["time"] < end)
    return np.stack([n["time"][inside], n["duration"][inside], n["pitch"][inside]], axis=1)


def empty_beats(notes: np.ndarray, start: int, end: int, tpq: int) -> float:
    beats = np.zeros(math.ceil((end - start) / tpq), dtype=bool)
    for t, d, _ in notes:
        beats[(t - start) // tpq : (min(t + max(d, 1), end) - 1 - start) // tpq + 1] = True
    return float(1 - beats.mean()) if len(beats) else math.nan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("folder", type=Path)
    p.add_argument("--bars", type=int, default=4)
    p.add_argument("--window-bars", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parts", nargs="+", choices=("table", "listening"), default=["table", "listening"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = MMM.from_pretrained(args.model, num_threads=args.threads)
    files = sorted(args.folder.glob("*.mid"))
    if "table" in args.parts:
        user_checks(model, files, args.bars)
    if "listening" in args.parts:
        print("\n".join(listening_outside(model, files, args.window_bars, args.seeds)))


def listening_outside(model: MMM, files: list[Path], window_bars: int, seeds: list[int]) -> list[str]:
    """The listening benchmark's table for a window of `window_bars` bars in the middle of each file."""
    listening = Listening(model, None, [], ListeningConfig(None, window_bars, 2, seeds), SamplingConfig())
    judged = 0
    for path in files:
        score = Score(str(path))
        grid = model.bar_grid(score)
        n = len(grid.starts) - 1
        first = max(0, n // 2 - window_bars // 2)
        last = min(n, first + window_bars)
        window = score.clip(grid.starts[first], grid.starts[last], clip_end=True).shift_time(-grid.starts[first])
        judged += listening.judge(window)
    return listening_section(listening.results(judged, f"files (a window of {window_bars} bars in the middle of each)"))


def user_checks(model: MMM, files: list[Path], bars: int) -> None:
    print(
        "| file | infilled track | empty beats (original / generated) | notes in range ±3 | exact bars | new track: notes, empty beats |"
    )
    print("|---|---|---|---|---|---|")
    totals = {"in_range": 0, "notes": 0, "exact": 0, "requests": 0, "gen_empty": [], "real_empty": []}
    for seed, path in enumerate(files):
        score = Score(str(path))
        pitched = [i for i, t in enumerate(score.tracks) if not t.is_drum and len(t.notes)]
        if not pitched:
            continue
        t = max(pitched, key=lambda i: len(score.tracks[i].notes))
        n = count_bars(score, model.tokenizer)
        a = max(0, n // 2 - bars // 2)
        b = min(n, a + bars)
        generation = model.run(Request("infill", track=t, bars=(a, b), seed=seed), score)
        out, steps = generation.output, generation.report.steps
        grid = model.bar_grid(score)
        start, end = grid.starts[a], grid.starts[b]
        real, gen = notes_in(score.tracks[t], start, end), notes_in(out.tracks[t], start, end)
        context = score.tracks[t].notes.numpy()["pitch"]
        inside = int(((gen[:, 2] >= context.min() - 3) & (gen[:, 2] <= context.max() + 3)).sum()) if len(gen) else 0
        exact = all(len(s.tokens[0]) > 0 for s in steps) and sum(s.bars[1] - s.bars[0] for s in steps) == b - a
        e_real, e_gen = empty_beats(real, start, end, score.tpq), empty_beats(gen, start, end, score.tpq)
        first = grid.starts[max(0, a - 4)]  # the 4 bars before the span and the span, from tick 0
        window = score.clip(first, end, clip_end=True).shift_time(-first)
        added = model.add_track(window, program=int(score.tracks[t].program), seed=seed)
        new = added.tracks[-1].notes.numpy()
        new_empty = (
            empty_beats(np.stack([new["time"], new["duration"], new["pitch"]], axis=1), 0, end - first, window.tpq)
            if len(new["time"])
            else 1.0
        )
        print(
            f"| {path.stem} | {t} ({score.tracks[t].name or '?'}), bars {a}-{b - 1} | {e_real:.0%} / {e_gen:.0%} | "
            f"{inside}/{len(gen)} | {'yes' if exact else 'NO'} | {len(new['time'])}, {new_empty:.0%} |"
        )
        totals["in_range"] += inside
        totals["notes"] += len(gen)
        totals["exact"] += exact
        totals["requests"] += 1
        totals["gen_empty"].append(e_gen)
        totals["real_empty"].append(e_real)
    print()
    print(
        f"{totals['requests']} infills: exact bars {totals['exact']}/{totals['requests']}, generated notes within the "
        f"track's range ±3: {totals['in_range']}/{totals['notes']}, empty beats generated "
        f"{np.nanmean(totals['gen_empty']):.1%} vs original {np.nanmean(totals['real_empty']):.1%}"
    )


if __name__ == "__main__":
    main()
