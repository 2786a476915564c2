"""`python -m mmm.sample ckpt=... input=song.mid task=infill track=1 bars=[8,12]`: generate with
a checkpoint and write MIDI output(s), a piano roll PNG per output and `summary.json`.

The request and the input file are checked before the model is loaded (missing or corrupt
file, bars out of range, unknown track, bad program or controls), so a typo costs no load.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmm.api import (
    MMM,
    Controls,
    check_program,
    check_spans,
    check_tracks,
    count_bars,
    read_score,
)
from mmm.config import plain, require_keys

log = logging.getLogger(__name__)

TASKS = ("infill", "add_track", "generate")
KEYS = {"ckpt", "input", "task", "track", "bars", "bars_before", "bars_after", "program", "programs", "num_bars",
        "time_signature", "tempo", "controls", "track_controls", "num_variations", "seed", "temperature", "top_k",
        "top_p", "max_bar_tokens", "device", "num_threads", "out_dir", "render", "soundfont", "paths"}


def _tokenizer_if_cheap(ckpt: str):
    """The tokenizer of a checkpoint folder (a small JSON file), to check the request with it;
    None for .ckpt files and hub ids (their tokenizer comes with the weights)."""
    from mmm.tokenizer import TOKENIZER_FILE, load_tokenizer

    path = Path(ckpt)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        return load_tokenizer(path)
    return None


def validate(cfg: Mapping[str, Any]):
    """Check the request without loading the model; returns (score or None, tokenizer or None)."""
    require_keys("sample", cfg, KEYS, required={"ckpt", "task"})
    task = cfg["task"]
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(TASKS)}")
    ckpt = cfg["ckpt"]
    if not ckpt or (not Path(str(ckpt)).exists() and str(ckpt).count("/") != 1):
        raise FileNotFoundError(f"ckpt={ckpt!r}: no such checkpoint folder or file (nor a hub id 'owner/name')")
    for key in ("num_variations", "max_bar_tokens"):
        value = cfg[key]
        if key == "max_bar_tokens" and value is None:  # the checkpoint's own, measured on its training data
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: expected a positive integer")
    if cfg["render"]:  # a missing FluidSynth fails here, not after minutes of generation
        from mmm.audio import find_fluidsynth, find_soundfont

        find_fluidsynth()
        find_soundfont(cfg["soundfont"])
    tokenizer = _tokenizer_if_cheap(str(ckpt))
    controls = Controls(tokenizer, _vocab(tokenizer)) if tokenizer is not None else None
    score = None
    if task in ("infill", "add_track"):
        if not cfg["input"]:
            raise ValueError(f"task={task} needs input=<MIDI file>")
        score = read_score(cfg["input"])
        num_bars = count_bars(score, tokenizer)
        if num_bars == 0:
            raise ValueError(f"{cfg['input']}: no notes{' the tokenizer can represent' if tokenizer else ''}")
    if task == "infill":
        tracks = check_tracks(cfg["track"], score)
        spans = check_spans(cfg["bars"], num_bars)
        if controls is not None:
            for bar_ctl, track_ctl in zip(_each(cfg["controls"], len(tracks)), _each(cfg["track_controls"], len(tracks))):
                controls.bar_ids(bar_ctl, [b for a, e in spans for b in range(a, e)])
                controls.track_ids(track_ctl)
    elif task == "add_track":
        check_program(cfg["program"], tokenizer)
        if controls is not None:
            controls.bar_ids(cfg["controls"], range(num_bars))
            controls.track_ids(cfg["track_controls"])
    else:
        programs = cfg["programs"]
        if not isinstance(programs, list) or not programs:
            raise ValueError(f"programs={programs!r}: expected a non-empty list such as [0, 33, -1]")
        for p in programs:
            check_program(p, tokenizer)
        if isinstance(cfg["num_bars"], bool) or not isinstance(cfg["num_bars"], int) or cfg["num_bars"] < 1:
            raise ValueError(f"num_bars={cfg['num_bars']!r}: expected a positive integer")
        if controls is not None:
            for bar_ctl, track_ctl in zip(_each(cfg["controls"], len(programs)), _each(cfg["track_controls"], len(programs))):
                controls.bar_ids(bar_ctl, range(cfg["num_bars"]))
                controls.track_ids(track_ctl)
    return score, tokenizer


def _vocab(tokenizer):
    from mmm.tokenizer import Vocab

    return Vocab(tokenizer)


def _each(value: Any, n: int) -> list:
    """Controls are one mapping or a list with one per track: the mapping of each track."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"a list of controls needs one mapping per track ({n}), got {len(value)}")
        return value
    return [value] * n


def sample(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one request (see configs/sample.yaml); returns the summary also written as JSON."""
    cfg = plain(cfg)
    score, _ = validate(cfg)
    t0 = time.perf_counter()
    budget = {} if cfg["max_bar_tokens"] is None else {"max_bar_tokens": cfg["max_bar_tokens"]}
    model = MMM.from_pretrained(cfg["ckpt"], device=cfg["device"], num_threads=cfg["num_threads"], **budget)
    load_s = time.perf_counter() - t0
    common = dict(temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"], seed=cfg["seed"],
                  num_variations=cfg["num_variations"])
    controls, track_controls = cfg["controls"] or None, cfg["track_controls"] or None
    task = cfg["task"]
    t0 = time.perf_counter()
    if task == "infill":
        bars = cfg["bars"]
        outputs = model.infill(score, cfg["track"], [tuple(s) for s in bars] if isinstance(bars[0], list) else tuple(bars),
                               controls, track_controls, bars_before=cfg["bars_before"], bars_after=cfg["bars_after"],
                               **common)
    elif task == "add_track":
        outputs = model.add_track(score, cfg["program"], controls, track_controls, **common)
    else:
        outputs = model.generate(cfg["programs"], cfg["num_bars"], controls, track_controls,
                                 time_signature=cfg["time_signature"], tempo=cfg["tempo"], **common)
    total_s = time.perf_counter() - t0
    outputs = outputs if isinstance(outputs, list) else [outputs]
    report = model.last_report

    from mmm.pianoroll import plot_pianoroll

    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(cfg["input"]).stem if task != "generate" else "generated"
    files = []
    for v, out in enumerate(outputs):
        name = f"{stem}_{task}_{v}"
        midi = out_dir / f"{name}.mid"
        out.dump_midi(str(midi))
        png = plot_pianoroll(out, out_dir / f"{name}.png", report.regions[v], title=f"{stem}: {task} (variation {v})")
        files.append({"midi": str(midi), "png": str(png), "generated_regions": [list(r) for r in report.regions[v]]})
        if cfg["render"]:
            from mmm.audio import render_wav

            files[-1]["wav"] = str(render_wav(out, out_dir / f"{name}.wav", soundfont=cfg["soundfont"]))
    summary = {
        "request": {k: cfg[k] for k in sorted(KEYS - {"paths"}) if k in cfg},
        "seed": cfg["seed"],
        "timings": {"load_s": round(load_s, 4), "total_s": round(total_s, 4), **report.summary()},
        "tokens_per_s": report.summary()["tokens_per_s"],
        "generations": [
            {"task": s.task, "track": s.track, "bars": list(s.bars), "variations": s.variations,
             "prompt_tokens": s.prompt_tokens, "budget": s.budget, "window": list(s.window),
             "context_tracks": s.context_tracks, **s.timings}
            for s in report.steps
        ],
        "outputs": files,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary_path"] = str(out_dir / "summary.json")
    log.info("wrote %d output(s) to %s", len(files), out_dir)
    return summary


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from mmm.audio import AudioDependencyError

    @hydra.main(config_path="../configs", config_name="sample", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        try:
            summary = sample(cfg)
        except (ValueError, FileNotFoundError, AudioDependencyError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps({"outputs": summary["outputs"], "timings": summary["timings"]}, indent=2))

    _run()


if __name__ == "__main__":
    main()
