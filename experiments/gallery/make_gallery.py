"""Make a gallery (by default docs/gallery/): infills, a new track and a piece from scratch
written by a model (the demo model by default), as piano rolls (original vs generated) and
short audio excerpts.

    python experiments/gallery/make_gallery.py
    python experiments/gallery/make_gallery.py --model models/mmm-music21-small --data-name music21_all \
        --out models/mmm-music21-small/gallery --no-train

Inputs are the first bars of chorales of the model's store's held-out splits (valid/test), so the
model never trained on them. Audio: mmm.render.audio.render_wav (FluidSynth, GM soundfont), then Ogg
Vorbis (oggenc, Debian package vorbis-tools) to keep the files small; without oggenc the WAVs
are kept. The page docs/gallery.rst shows what docs/gallery/gallery.json lists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "gallery"
MADE_HERE = (".png", ".ogg", ".wav", ".mid")  # what a re-run deletes first (with gallery.json)


def parse_args() -> argparse.Namespace:
    data_dir = Path(os.environ.get("MMM_DATA_DIR", REPO / "data"))
    runs_dir = Path(os.environ.get("MMM_RUNS_DIR", REPO / "runs"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=runs_dir / "demo" / "model",
        help="checkpoint folder or .ckpt (default: $MMM_RUNS_DIR/demo/model, trained first when missing)",
    )
    p.add_argument("--data-dir", type=Path, default=data_dir, help="the data folder ($MMM_DATA_DIR)")
    p.add_argument(
        "--data-name",
        default="embedded",
        help="the model's data source name: inputs come from <data-dir>/<data-name>/store's held-out splits",
    )
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--bars", type=int, default=6, help="bars per excerpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="fail instead of training the demo model when missing")
    return p.parse_args()


def ensure_model(args: argparse.Namespace) -> None:
    if (args.model / "config.json").is_file() or args.model.suffix == ".ckpt" and args.model.is_file():
        return
    if args.no_train:
        sys.exit(f"no checkpoint folder at {args.model}: run `python -m mmm.train +experiment=demo` first")
    print(f"no model at {args.model}: training the demo model (python -m mmm.train +experiment=demo)", flush=True)
    env = {**os.environ, "MMM_DATA_DIR": str(args.data_dir), "MMM_RUNS_DIR": str(args.model.parent.parent)}
    subprocess.run([sys.executable, "-m", "mmm.train", "+experiment=demo"], cwd=REPO, env=env, check=True)


def held_out_chorales(data_dir: Path, data_name: str) -> list[Path]:
    """Four-voice chorales of the store's valid/test splits (then the others), most notes first."""
    from symusic import Score

    report = json.loads((data_dir / data_name / "store" / "report.json").read_text())
    kept = sorted(
        (k for k in report["kept_files"] if k["split"] != "train" and k["name"].startswith("bach/")),
        key=lambda k: -k["notes"],
    )
    paths = [data_dir / "music21_midi" / k["name"] for k in kept]
    return sorted(paths, key=lambda p: len(Score(str(p)).tracks) != 4)


def excerpt(path: Path, num_bars: int):
    """The first `num_bars` bars of a MIDI file (as the tokenizer counts bars)."""
    from miditok.utils import get_bars_ticks
    from symusic import Score

    score = Score(str(path))
    ticks = list(get_bars_ticks(score, only_notes_onsets=True))
    end = ticks[num_bars] if len(ticks) > num_bars else score.end() + 1
    return score.clip(0, end, clip_end=True)


class Gallery:
    def __init__(self, out: Path, model, seed: int) -> None:
        self.out, self.model, self.seed = out, model, seed
        self.items: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="mmm-gallery-"))
        self.oggenc = shutil.which("oggenc")

    def audio(self, score, name: str) -> str:
        from mmm.render.audio import render_wav

        wav = render_wav(score, self.tmp / f"{name}.wav", sample_rate=22050)
        if self.oggenc is None:
            shutil.copy2(wav, self.out / f"{name}.wav")
            return f"{name}.wav"
        # Mono, quality 1 (~45 kbit/s): a 20 s excerpt is about 100 kB.
        subprocess.run(
            [self.oggenc, "-Q", "--downmix", "-q", "1", "-o", str(self.out / f"{name}.ogg"), str(wav)], check=True
        )
        return f"{name}.ogg"

    def roll(self, score, name: str, title: str, regions=()) -> str:
        from mmm.render.pianoroll import plot_pianoroll

        plot_pianoroll(score, self.out / f"{name}.png", regions, title=title)
        return f"{name}.png"

    def add(self, item_id: str, title: str, description: str, command: str, original, generation) -> None:
        generated, report = generation.output, generation.report
        regions = report.regions[0]
        media = []
        if original is not None:
            media += [
                {"kind": "image", "file": self.roll(original, f"{item_id}_original", "original"), "label": "Original"},
                {"kind": "audio", "file": self.audio(original, f"{item_id}_original"), "label": "Original"},
            ]
        media += [
            {
                "kind": "image",
                "file": self.roll(generated, f"{item_id}_generated", "generated (orange)", regions),
                "label": "Generated",
            },
            {"kind": "audio", "file": self.audio(generated, f"{item_id}_generated"), "label": "Generated"},
        ]
        generated.dump_midi(str(self.out / f"{item_id}_generated.mid"))
        self.items.append(
            {
                "id": item_id,
                "title": title,
                "description": description,
                "command": command,
                "media": media,
                "tokens_per_s": report.summary()["tokens_per_s"],
            }
        )
        print(f"{item_id}: {report.summary()}", flush=True)


def main() -> None:
    args = parse_args()
    ensure_model(args)
    from mmm import MMM
    from mmm.generation.request import Request, describe_tracks

    model = MMM.from_pretrained(args.model)
    chorales = held_out_chorales(args.data_dir, args.data_name)
    # Made in a folder of its own, which replaces the old gallery's files only once complete.
    new = Path(tempfile.mkdtemp(prefix="new-gallery-"))
    gallery = Gallery(new, model, args.seed)
    seed, n = args.seed, args.bars
    start = time.perf_counter()

    # 1. Rewrite two bars of the soprano (the top voice).
    first = excerpt(chorales[0], n)
    soprano = _voice(first, "Soprano", default=0)
    out = model.run(Request("infill", track=soprano, bars=(2, 4), seed=seed), first)
    gallery.add(
        "infill_soprano",
        f"Infill: soprano, bars 2–3 of {chorales[0].stem}",
        f"The first {n} bars of chorale {chorales[0].stem} (held out from training; tracks: "
        f"{describe_tracks(first)}). The model rewrites bars 2 and 3 of track {soprano}, seeing "
        "every other bar and voice.",
        f"model.infill(score, track={soprano}, bars=(2, 4), seed={seed})",
        first,
        out,
    )

    # 2. Rewrite the bass line of the second half, with a note-density control.
    second = excerpt(chorales[1], n)
    bass = _voice(second, "Bass", default=len(second.tracks) - 1)
    out = model.run(Request("infill", track=bass, bars=(n // 2, n), controls={"note_density": 4}, seed=seed), second)
    gallery.add(
        "infill_bass",
        f"Infill with a control: bass, bars {n // 2}–{n - 1} of {chorales[1].stem}",
        f"The bass (track {bass}) of the last {n - n // 2} bars is rewritten, asking for 4 notes per bar "
        "(`controls={'note_density': 4}`).",
        f"model.infill(score, track={bass}, bars=({n // 2}, {n}), controls={{'note_density': 4}}, seed={seed})",
        second,
        out,
    )

    # 3. A new top voice over the three lower ones.
    third = excerpt(chorales[2], n)
    top = _voice(third, "Soprano", default=0)
    program = int(third.tracks[top].program)
    lower = third.copy()
    lower.tracks = [t for i, t in enumerate(third.tracks) if i != top]
    out = model.run(Request("add_track", program=program, seed=seed), lower)
    gallery.add(
        "new_track",
        f"New track: a melody over the lower voices of {chorales[2].stem}",
        f"The soprano is removed and the model writes a new track (program {program}) over the alto, "
        "tenor and bass. The original shown here is the chorale with its own soprano.",
        f"model.add_track(score_without_soprano, program={program}, seed={seed})",
        third,
        out,
    )

    # 4. From scratch: four string voices, as the chorales were converted.
    programs = [int(t.program) for t in first.tracks if not t.is_drum][:4]
    out = model.run(Request("generate", programs=programs, num_bars=n, tempo=76.0, seed=seed))
    gallery.add(
        "from_scratch",
        "From scratch: a four-voice piece",
        f"No input: {n} bars of 4/4 at 76 quarter notes per minute, one track per program {programs}, "
        "each track written after the previous ones.",
        f"model.generate(programs={programs}, num_bars={n}, tempo=76.0, seed={seed})",
        None,
        out,
    )

    training = {}
    if (args.model / "config.json").is_file():
        training = json.loads((args.model / "config.json").read_text()).get("training", {})
    experiment = training.get("experiment", "demo")
    trained = (
        f", trained {training['global_step']} steps to a validation loss of {training['val_loss']:.3f}"
        if "global_step" in training and "val_loss" in training
        else ""
    )
    manifest = {
        "about": f"Made by experiments/gallery/make_gallery.py in {time.perf_counter() - start:.0f} s on a CPU "
        f"with the {experiment} model ({model.model.num_parameters():,} parameters{trained}); "
        f"seed {seed}, temperature 1.0, top-p 0.95. Inputs: the first {n} bars of chorales held out "
        "from training.",
        "items": gallery.items,
    }
    (new / "gallery.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(gallery.tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():
        if old.suffix in MADE_HERE or old.name == "gallery.json":
            old.unlink()
    for made in new.iterdir():
        shutil.move(made, args.out / made.name)
    new.rmdir()
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {len(list(args.out.iterdir()))} files, {total / 1e6:.2f} MB, to {args.out}")


def _voice(score, name: str, default: int) -> int:
    names = [t.name for t in score.tracks]
    return names.index(name) if name in names else default


if __name__ == "__main__":
    main()
