"""Generation through the `mmm.MMM` API on test windows, each output checked and measured.

Infill requests (a span of bars of one track) and add-track requests (one track regenerated
over a window of bars), each once without controls and once per attribute-control family with
a value drawn from the evaluated split's own AC values. Every output is checked for structure
(`structure`); each control is recomputed on the output (`mmm.controls.measure`, named by
`mmm.controls.table.Controls`) beside the output of the same request without it; the uncontrolled
infills are compared with the real bars they replace (musical statistics).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig
from symusic import Score

from mmm.config import plain
from mmm.controls.measure import bar_controls, track_controls
from mmm.data.layout import InputTracks, bar_ticks_of, input_tracks
from mmm.data.store import Store
from mmm.evaluate.analysis import note_arrays, pitch_in_range, span_stats, window_score
from mmm.evaluate.metrics import MUSICAL_STATS, adherence, histogram_overlap, summarize
from mmm.generation.request import Request, SamplingConfig
from mmm.generation.scores import count_bars
from mmm.tokenizer import Vocab


def _jsonable(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def structure(
    inp: Score,
    out: Any,
    report,
    tokenizer,
    vocab: Vocab,
    expected_bars: int,
    keep: Callable[[int, dict], np.ndarray],
    num_tracks: int,
) -> dict[str, bool]:
    """Checks of one API output: it decodes (and survives a MIDI round trip); exactly
    `expected_bars` bars were generated and the output has no bar beyond the input's; the
    input notes that `keep(track, notes)` selects, the tempos and time signatures are
    unchanged and the output has `num_tracks` tracks."""
    decoded = isinstance(out, Score)
    if decoded:
        try:
            again = Score.from_midi(out.dumps_midi())
            decoded = sum(len(t.notes) for t in again.tracks) == sum(len(t.notes) for t in out.tracks)
        except Exception:  # noqa: BLE001 - any failure to write/read back is "does not decode"
            decoded = False
    if not decoded:
        return {"decoded": False, "exact_bars": False, "untouched": False}
    bars = sum(sum(1 for i in step.tokens[0] if i == vocab.bar) for step in report.steps)
    exact = bars == expected_bars and count_bars(out, tokenizer) <= max(count_bars(inp, tokenizer), expected_bars)
    untouched = (
        len(out.tracks) == num_tracks
        and list(out.time_signatures) == list(inp.time_signatures)
        and list(out.tempos) == list(inp.tempos)
    )
    for k, track in enumerate(inp.tracks):
        if not untouched:
            break
        a, b = note_arrays(track), note_arrays(out.tracks[k])
        ka, kb = keep(k, a), keep(k, b)
        untouched = all(np.array_equal(a[f][ka], b[f][kb]) for f in a)
    return {"decoded": True, "exact_bars": bool(exact), "untouched": bool(untouched)}


class Requests:
    """Runs the API requests and collects everything the report needs."""

    def __init__(self, mmm, store: Store, chunks: Sequence[int], cfg: DictConfig) -> None:
        """Requests on `chunks` of `store` (their windows, and the control values drawn)."""
        self.mmm, self.store, self.cfg = mmm, store, cfg
        self.tokenizer, self.vocab = mmm.tokenizer, mmm.vocab
        self.controls = mmm.controls
        self.sampling = SamplingConfig(**plain(cfg.sampling))
        self.max_bar_tokens = None if cfg.max_bar_tokens is None else int(cfg.max_bar_tokens)
        self.chunks = list(chunks)
        self.pools = self._pools()
        self.structure: dict[str, list[dict]] = defaultdict(list)
        self.failures: list[str] = []
        self.adherence: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.stats: dict[str, dict[str, list[float]]] = {"real": defaultdict(list), "generated": defaultdict(list)}
        self.generation = {"calls": 0, "new_tokens": 0, "decode_s": 0.0, "prefill_s": 0.0}
        self.in_range = [0, 0]  # uncontrolled infills: generated notes within the track's range +-3, all notes

    def _pools(self) -> dict[tuple[str, str], list]:
        """Every value each control takes in the evaluated chunks: requests draw from them."""
        pools: dict[tuple[str, str], list] = defaultdict(list)
        for i in self.chunks:
            chunk = self.store[i]
            for t in range(len(chunk["programs"])):
                for name, value in self.controls.values([x for f in chunk["track_acs"][t] for x in f]).items():
                    pools["track", name].append(value)
                for bar in chunk["bar_acs"][t]:
                    for name, value in self.controls.values([x for f in bar for x in f]).items():
                        pools["bar", name].append(value)
        return dict(pools)

    def _call(self, task: str, score: Score, **kwargs) -> tuple[Any, Any]:
        """Run one request; (output score, report), or (None, None) when it failed (recorded)."""
        try:
            generation = self.mmm.run(
                Request(task, sampling=self.sampling, max_bar_tokens=self.max_bar_tokens, **kwargs), score
            )
        except Exception as err:  # noqa: BLE001 - a failed generation is a structure failure, reported
            self.failures.append(f"{task}: {type(err).__name__}: {err}")
            return None, None
        out, report = generation.scores[0], generation.report
        summary = report.summary()
        self.generation["calls"] += 1
        self.generation["new_tokens"] += summary["new_tokens"]
        self.generation["decode_s"] += summary["decode_s"]
        self.generation["prefill_s"] += summary["prefill_s"]
        return out, report

    def _check(
        self,
        task: str,
        inp: Score,
        out: Any,
        report: Any,
        expected_bars: int,
        keep: Callable[[int, dict], np.ndarray],
        num_tracks: int,
    ) -> None:
        if out is None:
            self.structure[task].append({"decoded": False, "exact_bars": False, "untouched": False})
            return
        self.structure[task].append(
            structure(inp, out, report, self.tokenizer, self.vocab, expected_bars, keep, num_tracks)
        )

    def _window(self, kind: str, r: int, max_bars: int):
        """Request r's seeded rng, test chunk and window of at most `max_bars` bars as a Score."""
        rng = random.Random(f"{self.cfg.seed}-{kind}-{r}")
        chunk = self.store[self.chunks[r % len(self.chunks)]]
        nb = len(chunk["bars"][0])
        n = min(max_bars, nb)
        first = rng.randrange(0, nb - n + 1)
        score, kept = window_score(chunk, first, n, self.tokenizer, self.vocab)
        return rng, chunk, first, n, score, kept

    # -- infill: bar controls, musical statistics -------------------------------------------------
    def infill(self, r: int) -> None:
        cfg, vocab = self.cfg, self.vocab
        rng, chunk, first, n, score, kept = self._window("infill", r, cfg.piece_bars)
        n = min(n, count_bars(score, self.tokenizer))  # trailing bars without notes do not exist for the API
        if not kept or n < 1:
            return
        k = min(cfg.infill_bars, n)
        for _ in range(20):  # a span where some track has notes
            a = rng.randrange(0, n - k + 1)
            b = a + k
            candidates = [
                j
                for j, t in enumerate(kept)
                if any(vocab.is_note_start[i] for bar in chunk["bars"][t][first + a : first + b] for i in bar)
            ]
            if candidates:
                break
        else:
            return
        target = rng.choice(candidates)
        seed = rng.randrange(2**31)
        real = input_tracks(score, self.tokenizer)
        ticks = bar_ticks_of(real.score, n)
        raw_ticks = [int(round(t * score.tpq / real.score.tpq)) for t in ticks]
        start, end = raw_ticks[a], (raw_ticks[b] if b < n else None)

        def keep(track: int, notes: dict) -> np.ndarray:
            if track != target:
                return np.ones(len(notes["time"]), dtype=bool)
            return (notes["time"] < start) | ((notes["time"] >= end) if end is not None else False)

        def run(controls: Mapping | None) -> InputTracks | None:
            out, report = self._call("infill", score, track=target, bars=(a, b), controls=controls, seed=seed)
            self._check("infill", score, out, report, b - a, keep, len(score.tracks))
            if out is None:
                return None
            result = input_tracks(out, self.tokenizer)
            if result.score.tpq != real.score.tpq:
                raise RuntimeError("the output score is preprocessed to another resolution than its input")
            return result

        baseline = run(None)
        is_drum = score.tracks[target].is_drum
        per_bar = ticks[a + 1] - ticks[a]
        real_stats = span_stats(real.tracks.get(target), is_drum, ticks[a], ticks[b], real.score.tpq, per_bar)
        if baseline is not None and not is_drum:
            inside, total = pitch_in_range(real.tracks.get(target), baseline.tracks.get(target), ticks[a], ticks[b])
            self.in_range[0] += inside
            self.in_range[1] += total
        if baseline is not None:
            gen_stats = span_stats(baseline.tracks.get(target), is_drum, ticks[a], ticks[b], real.score.tpq, per_bar)
            for m in MUSICAL_STATS:
                self.stats["real"][m].append(real_stats[m])
                self.stats["generated"][m].append(gen_stats[m])
        if not cfg.measure_controls:
            return
        without = self._bar_values(baseline, target, ticks, a, b)
        for name in self.controls.bar:
            pool = self.pools.get(("bar", name))
            if not pool:
                continue
            requested = {bar: rng.choice(pool) for bar in range(a, b)}
            out = run({bar: {name: _jsonable(v)} for bar, v in requested.items()})
            achieved = self._bar_values(out, target, ticks, a, b)
            record = self.adherence["bar", name]
            for j, bar in enumerate(range(a, b)):
                record["requested"].append(requested[bar])
                record["with"].append(
                    achieved[j].get(name, self.controls.empty_value("bar", name)) if achieved else None
                )
                record["without"].append(
                    without[j].get(name, self.controls.empty_value("bar", name)) if without else None
                )

    def _bar_values(
        self, result: InputTracks | None, target: int, ticks: list[int], a: int, b: int
    ) -> list[dict] | None:
        if result is None:
            return None
        track = result.tracks.get(target)
        if track is None:
            return [{} for _ in range(a, b)]
        per_bar = bar_controls(self.tokenizer, self.vocab, track, result.score.tpq, ticks[:-1])
        return [self.controls.values([i for family in per_bar[bar] for i in family]) for bar in range(a, b)]

    # -- add track: track controls ----------------------------------------------------------------
    def add_track(self, r: int) -> None:
        cfg, vocab = self.cfg, self.vocab
        rng, chunk, first, n, full, kept = self._window("track", r, cfg.track_bars)
        if not kept:
            return
        removed = rng.randrange(len(kept))
        program = chunk["programs"][kept[removed]]
        score = full.copy()
        if len(score.tracks) > 1:  # regenerate that track; a lone track gets a second one
            del score.tracks[removed]
        n = count_bars(score, self.tokenizer)  # the bars the API writes the new track over
        if n < 1:
            return
        seed = rng.randrange(2**31)
        ticks = bar_ticks_of(input_tracks(score, self.tokenizer).score, n)
        new = len(score.tracks)

        def keep(track: int, notes: dict) -> np.ndarray:
            return np.ones(len(notes["time"]), dtype=bool)

        def run(controls: Mapping | None) -> dict | None:
            out, report = self._call("add_track", score, program=program, track_controls=controls, seed=seed)
            self._check("add_track", score, out, report, n, keep, len(score.tracks) + 1)
            if out is None:
                return None
            result = input_tracks(out, self.tokenizer)
            track = result.tracks.get(new)
            if track is None:
                return {}
            families = track_controls(self.tokenizer, vocab, track, result.score.tpq, ticks[:-1])
            return self.controls.values([i for family in families for i in family])

        without = run(None)
        if not cfg.measure_controls:
            return
        for name in self.controls.track:
            pool = self.pools.get(("track", name))
            if not pool:
                continue
            value = rng.choice(pool)
            achieved = run({name: _jsonable(value)})
            record = self.adherence["track", name]
            record["requested"].append(value)
            record["with"].append(achieved.get(name) if achieved is not None else None)
            record["without"].append(without.get(name) if without is not None else None)

    # -- results ----------------------------------------------------------------------------------
    def results(self, max_failures: int) -> dict[str, Any]:
        structure_out: dict[str, Any] = {}
        everything = [c for checks in self.structure.values() for c in checks]
        for task, checks in [("all", everything), *sorted(self.structure.items())]:
            structure_out[task] = {
                "outputs": len(checks),
                **{
                    key: (float(np.mean([c[key] for c in checks])) if checks else math.nan)
                    for key in ("decoded", "exact_bars", "untouched")
                },
            }
        structure_out["failures"] = self.failures[:max_failures]
        controls: dict[str, Any] = {"bar": {}, "track": {}}
        for (level, name), record in sorted(self.adherence.items()):
            kind = self.controls.table(level)[name].kind
            bins = self.controls.bins(level, name)
            controls[level][name] = {
                "kind": kind,
                "with_control": adherence(record["requested"], record["with"], kind, bins),
                "without_control": adherence(record["requested"], record["without"], kind, bins),
                "pairs": [
                    [_jsonable(r), _jsonable(w), _jsonable(wo)]
                    for r, w, wo in zip(record["requested"], record["with"], record["without"])
                ],
            }
        stats: dict[str, Any] = {}
        real, gen = summarize(self.stats["real"]), summarize(self.stats["generated"])
        for m in MUSICAL_STATS:
            stats[m] = {
                "real_mean": real.get(m, math.nan),
                "generated_mean": gen.get(m, math.nan),
                "abs_diff": abs(real.get(m, math.nan) - gen.get(m, math.nan)),
                "overlap": histogram_overlap(self.stats["real"][m], self.stats["generated"][m]),
                "n_real": int(sum(not math.isnan(x) for x in self.stats["real"][m])),
                "n_generated": int(sum(not math.isnan(x) for x in self.stats["generated"][m])),
            }
        inside, total = self.in_range
        in_range = {"generated_notes": total, "within_3_semitones": inside / total if total else math.nan}
        return {
            "structure": structure_out,
            "controls": controls,
            "musical_stats": stats,
            "pitch_in_context_range": in_range,
        }
