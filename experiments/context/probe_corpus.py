"""A synthetic corpus where the answer is in another track: each piece has a melody, the same
melody an octave lower (same onsets and durations: the doubling track) and an independent bass.
A model that listens can write the doubling track's bars from the melody's; one that does not can
only guess. Used by experiments/context/run.sh to probe each alignment design.

    python experiments/context/probe_corpus.py OUT_DIR [--pieces 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from symusic import Note, Score, Tempo, TimeSignature, Track

TPQ = 480
SCALE = (0, 2, 4, 5, 7, 9, 11)


def melody(rng: random.Random, bars: int) -> list[tuple[int, int, int]]:
    """(onset, duration, pitch) of a random walk on a major scale, in 8ths and quarters."""
    key = rng.randrange(12)
    degree, out, t = rng.randrange(7, 14), [], 0
    while t < bars * 4 * TPQ:
        duration = rng.choice((TPQ // 2, TPQ // 2, TPQ, TPQ, 2 * TPQ))
        duration = min(duration, bars * 4 * TPQ - t)
        degree = max(0, min(20, degree + rng.choice((-2, -1, -1, 0, 1, 1, 2))))
        out.append((t, duration, 60 + key + 12 * (degree // 7) + SCALE[degree % 7] - 12))
        t += duration
    return out


def piece(rng: random.Random) -> Score:
    bars = rng.randrange(8, 17)
    score = Score(TPQ)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, float(rng.randrange(70, 140))))
    lead, double, bass = Track("melody", 40, False), Track("doubling", 42, False), Track("bass", 32, False)
    for onset, duration, pitch in melody(rng, bars):
        lead.notes.append(Note(onset, duration, pitch, 80))
        double.notes.append(Note(onset, duration, pitch - 12, 80))
    for onset in range(0, bars * 4 * TPQ, TPQ):  # independent: quarter notes from the low register
        bass.notes.append(Note(onset, TPQ, rng.randrange(36, 49), 80))
    score.tracks.extend([lead, double, bass])
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pieces", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i in range(args.pieces):
        piece(rng).dump_midi(args.out / f"probe_{i:04d}.mid")
    print(f"{args.pieces} pieces in {args.out}")


if __name__ == "__main__":
    main()
