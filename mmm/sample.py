"""`python -m mmm.sample ckpt=... input=song.mid task=infill track=1 bars=[8,12]`: generate with
a checkpoint and write MIDI output(s), a piano roll PNG per output and `summary.json`.

The request and the input file are checked before the model is loaded (missing or corrupt
file, bars out of range, unknown track, bad program or controls), so a typo costs no load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symusic import Score

from mmm.config import at_least, check_section
from mmm.controls.table import Controls
from mmm.generation.api import MMM
from mmm.generation.request import Request, SamplingConfig, check_request
from mmm.generation.scores import count_bars, read_score
from mmm.model.pretrained import checkpoint_location
from mmm.tokenizer import Vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    """configs/sample.yaml. The request fields (track ... track_controls) are checked as a
    `mmm.generation.request.Request`; the rest here."""

    ckpt: str
    input: str | None
    task: str
    track: Any
    bars: Any
    bars_before: Any
    bars_after: Any
    program: Any
    programs: Any
    num_bars: Any
    time_signature: str
    tempo: float
    controls: dict | list | None
    track_controls: dict | list | None
    num_variations: int = field(metadata=at_least(1))
    seed: int
    temperature: float
    top_k: int | None
    top_p: float | None
    max_bar_tokens: int | None = field(metadata=at_least(4))
    pitch_range: Any
    monophonic: bool | None
    device: str
    num_threads: int | None = field(metadata=at_least(1))
    out_dir: str
    render: bool
    soundfont: str | None
    paths: dict  # Hydra's paths group (out_dir is made from it)

    def request(self) -> Request:
        bars = self.bars
        if isinstance(bars, list) and bars and isinstance(bars[0], list):
            bars = [tuple(span) for span in bars]
        return Request(
            self.task,
            track=self.track,
            bars=bars,
            program=self.program,
            programs=self.programs,
            num_bars=self.num_bars,
            time_signature=self.time_signature,
            tempo=self.tempo,
            controls=self.controls or None,
            track_controls=self.track_controls or None,
            bars_before=self.bars_before,
            bars_after=self.bars_after,
            num_variations=self.num_variations,
            seed=self.seed,
            sampling=SamplingConfig(self.temperature, self.top_k, self.top_p),
            max_bar_tokens=self.max_bar_tokens,
            pitch_range=tuple(self.pitch_range) if isinstance(self.pitch_range, list) else self.pitch_range,
            monophonic=self.monophonic,
        )


def _tokenizer_if_cheap(ckpt: str):
    """The tokenizer of a checkpoint folder (a small JSON file), to check the request with it;
    None for .ckpt files and hub ids (their tokenizer comes with the weights)."""
    from mmm.tokenizer import TOKENIZER_FILE, load_tokenizer

    path = Path(ckpt)
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        return load_tokenizer(path)
    return None


def validate(cfg: Any) -> tuple[SampleConfig, Score | None]:
    """Check the config and the request without loading the model; returns them with the input
    score (None for generate)."""
    cfg = check_section("sample", cfg, SampleConfig)
    checkpoint_location(cfg.ckpt)
    if cfg.render:  # a missing FluidSynth fails here, not after minutes of generation
        from mmm.render.audio import find_fluidsynth, find_soundfont

        find_fluidsynth()
        find_soundfont(cfg.soundfont)
    tokenizer = _tokenizer_if_cheap(cfg.ckpt)
    score, num_bars = None, None
    if cfg.task in ("infill", "add_track"):
        if not cfg.input:
            raise ValueError(f"task={cfg.task} needs input=<MIDI file>")
        score = read_score(cfg.input)
        num_bars = count_bars(score, tokenizer)
        if num_bars == 0:
            raise ValueError(f"{cfg.input}: no notes{' the tokenizer can represent' if tokenizer else ''}")
    # Without the tokenizer (a .ckpt or hub id) the controls and time signature wait for the model.
    controls = Controls(tokenizer, Vocab(tokenizer)) if tokenizer is not None else None
    check_request(cfg.request(), tokenizer, controls, score, num_bars)
    return cfg, score


def sample(cfg: Any) -> dict[str, Any]:
    """Run one request (see configs/sample.yaml); returns the summary also written as JSON."""
    cfg, score = validate(cfg)
    t0 = time.perf_counter()
    model = MMM.from_pretrained(cfg.ckpt, device=cfg.device, num_threads=cfg.num_threads)
    load_s = time.perf_counter() - t0
    task = cfg.task
    t0 = time.perf_counter()
    generation = model.run(cfg.request(), score)
    total_s = time.perf_counter() - t0
    outputs, report = generation.scores, generation.report

    from mmm.render.pianoroll import plot_pianoroll

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(cfg.input).stem if task != "generate" else "generated"
    files = []
    for v, out in enumerate(outputs):
        name = f"{stem}_{task}_{v}"
        midi = out_dir / f"{name}.mid"
        out.dump_midi(str(midi))
        png = plot_pianoroll(out, out_dir / f"{name}.png", report.regions[v], title=f"{stem}: {task} (variation {v})")
        files.append({"midi": str(midi), "png": str(png), "generated_regions": [list(r) for r in report.regions[v]]})
        if cfg.render:
            from mmm.render.audio import render_wav

            files[-1]["wav"] = str(render_wav(out, out_dir / f"{name}.wav", soundfont=cfg.soundfont))
    summary = {
        "request": {k: v for k, v in sorted(dataclasses.asdict(cfg).items()) if k != "paths"},
        "seed": cfg.seed,
        "timings": {"load_s": round(load_s, 4), "total_s": round(total_s, 4), **report.summary()},
        "tokens_per_s": report.summary()["tokens_per_s"],
        "bar_grid_warning": report.bar_grid_warning,  # the bars rewritten are not the file's bars (logged too)
        "generations": [
            {
                "task": s.task,
                "track": s.track,
                "bars": list(s.bars),
                "variations": s.variations,
                "prompt_tokens": s.prompt_tokens,
                "budget": s.budget,
                "window": list(s.window),
                "context_tracks": s.context_tracks,
                **s.timings,
            }
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

    from mmm.render.audio import AudioDependencyError

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
