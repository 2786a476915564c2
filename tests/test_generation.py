"""Generation: grammar (`mmm.generation.grammar`), sampling loop (`mmm.generation.sampling`), API (`mmm.generation.api`).

Proves, with untrained random-weight models (whose logits are close to uniform, so only the
grammar can make the structure hold):
- grammar: random and adversarial walks over every kind of plan (time signatures, drums,
  forced ACs, budgets down to the minimum) never meet an empty mask, end within budget, and
  give exactly the requested bars, each with its TimeSig, positions increasing inside the bar
  length, REMI order, Pitch/PitchDrum by track kind, no foreign token; the bar length in
  positions matches miditok's decoder; BPE ids hold at most one Bar_None, at their start;
- sampling: top-k/top-p/temperature/mask semantics, KV-cache decoding equals full recompute,
  seeds reproduce, variations differ;
- API, on a synthetic multi-track score and on EVERY file of $MMM_TEST_MIDI/multitrack:
  infill writes exactly the requested bars in the right track and place, every other track
  and every note outside the span is unchanged note for note, the new notes are the decoded
  generated tokens; a new track ends with Track_End within its budget and covers every bar;
  from-scratch generation; prompts are the training format token for token; context windows
  fit the model; controls are validated and land where training puts them; bad requests fail
  with clear messages; from_pretrained / save_pretrained / hub id / miditok loading.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import preprocess_settings, synthetic_score, tiny_model
from miditok import MMM as MiditokMMM
from miditok.utils import get_bars_ticks
from symusic import Note, Score, Tempo, TimeSignature, Track

from mmm.controls.measure import bar_controls, track_controls
from mmm.data.chunks import tokenize_score
from mmm.data.layout import piece_from_score
from mmm.generation.api import MMM, Controls
from mmm.generation.grammar import BarGrammar, BarPlan, GrammarTables
from mmm.generation.request import Request, SamplingConfig
from mmm.generation.sampling import generate_ids, make_generator, sample_next

MULTITRACK = (
    sorted((Path(os.environ["MMM_TEST_MIDI"]) / "multitrack").glob("*.mid")) if os.environ.get("MMM_TEST_MIDI") else []
)


class Recorded(MMM):
    """An `MMM` that keeps the report of its last call for the assertions below (the library
    returns it from `run` instead: one result per call, see the two-threads test)."""

    last_report = None

    def run(self, *args, **kwargs):
        generation = super().run(*args, **kwargs)
        self.last_report = generation.report
        return generation


@pytest.fixture(scope="module")
def mmm(bpe_tokenizer, bpe_vocab) -> MMM:
    return Recorded(tiny_model(bpe_vocab.size), bpe_tokenizer, max_bar_tokens=24, num_threads=1)


@pytest.fixture(scope="module")
def mmm_base(tokenizer, vocab) -> MMM:
    """Without BPE: model ids are base ids."""
    return Recorded(tiny_model(vocab.size), tokenizer, max_bar_tokens=24, num_threads=1)


# -- an independent checker of generated tokens (token strings, not the grammar's tables) ---------
NOTE_ORDER = {
    "Position": {"Tempo", "Pitch", "PitchDrum"},
    "Tempo": {"Pitch", "PitchDrum", "Position"},
    "Pitch": {"Velocity"},
    "PitchDrum": {"Velocity"},
    "Velocity": {"Duration"},
    "Duration": {"Pitch", "PitchDrum", "Position"},
    "TimeSig": {"Position"},
}


def check_generated(base_ids, vocab, time_signatures, drums: bool, end: str) -> list[list[str]]:
    """Assert the structural guarantees on generated base ids; returns the bars as tokens."""
    tokens = [vocab.token_of[i] for i in base_ids]
    assert tokens and tokens[-1] == end, f"does not end with {end}: {tokens[-5:]}"
    bars: list[list[str]] = []
    for tok in tokens[:-1]:
        if tok == "Bar_None":
            bars.append([tok])
        else:
            assert bars, f"{tok} before the first bar"
            bars[-1].append(tok)
    assert len(bars) == len(time_signatures), f"{len(bars)} bars for {len(time_signatures)} requested"
    res = vocab.tokenizer.config.max_num_pos_per_beat
    for bar, ts in zip(bars, time_signatures):
        assert bar[1] == vocab.token_of[ts], f"TimeSig {bar[1]} instead of {vocab.token_of[ts]}"
        num = int(bar[1].split("_")[1].split("/")[0])
        rest = bar[2:]
        while rest and rest[0].startswith("AC"):
            rest = rest[1:]
        prev, pos = "TimeSig", -1
        for tok in rest:
            kind = tok.split("_")[0]
            assert kind in NOTE_ORDER[prev], f"{tok} after {prev} in {bar}"
            assert kind != ("Pitch" if drums else "PitchDrum"), f"{tok} in a {'drum' if drums else 'pitched'} track"
            if kind == "Position":
                value = int(tok.split("_")[1])
                assert pos < value < num * res, f"position {value} after {pos} in a {num}-beat bar"
                pos = value
            prev = kind
        assert prev in ("TimeSig", "Tempo", "Duration"), f"bar ends after {prev}"
    return bars


# -- grammar ------------------------------------------------------------------------------
def _walk(tables: GrammarTables, plan: BarPlan, budget: int, rng: random.Random, policy: str) -> list[int]:
    g = BarGrammar(tables, plan, budget)
    out = []
    while not g.done:
        allowed = np.flatnonzero(g.allowed())
        assert len(allowed) > 0, f"empty mask in state {g.key()}"
        if policy == "random":
            i = int(rng.choice(allowed))
        else:  # adversarial: longest ids, preferring ones that leave a note open (need grows)
            score = tables.length[allowed] + 10 * (tables.exit[g.phase, allowed] == 5)
            best = allowed[score == score.max()]
            i = int(rng.choice(best))
        g.advance(i)
        out.append(i)
    assert len(out) <= budget
    return out


@pytest.mark.parametrize("which", ["base", "bpe"])
def test_grammar_walks_always_well_formed(which, vocab, bpe_vocab):
    v = vocab if which == "base" else bpe_vocab
    tables = GrammarTables.of(v)
    rng = random.Random(0)
    ts_ids = [i for i in range(v.base_size) if v.is_time_sig[i]]
    acs = [tables.model_id(i) for i in range(v.base_size) if v.is_ac[i]]
    for trial in range(160):
        n = rng.randint(1, 5)
        tss = [rng.choice(ts_ids) for _ in range(n)]
        bar_acs = [sorted(rng.sample(acs, rng.choice([0, 0, 1, 3]))) for _ in range(n)]
        drums = trial % 3 == 0
        end = v.fill_end if trial % 2 else v.track_end
        plan = BarPlan(tss, bar_acs, end, drums)
        minimum = BarGrammar(tables, plan, 10**6).need()
        budget = minimum + rng.choice([0, 1, 2, 3, 10, 80])
        policy = "adversarial" if trial % 4 == 1 else "random"
        ids = _walk(tables, plan, budget, rng, policy)
        base = v.to_base(ids)
        bars = check_generated(base, v, tss, drums, v.token_of[end])
        for bar, wanted in zip(bars, bar_acs):  # forced ACs, in order, right after TimeSig
            assert bar[2 : 2 + len(wanted)] == [v.token_of[v.model_to_base[i][0]] for i in wanted]
        body = [b for b in base[:-1] if not v.is_ac[b]]
        program = v.program_id[-1 if drums else 0]
        v.tokenizer.decode([v.track_start, program, *body, v.track_end])  # always decodes
    with pytest.raises(ValueError, match="budget"):
        BarGrammar(tables, BarPlan(ts_ids[:1] * 4, [[]] * 4, v.fill_end, False), 3)
    bounded = GrammarTables(v)  # a bounded mask cache evicts and still gives the same masks
    bounded.max_cached = 8
    plan = BarPlan(ts_ids[:3], [[], [], []], v.fill_end, False)
    ids = _walk(bounded, plan, 200, random.Random(1), "random")
    check_generated(v.to_base(ids), v, ts_ids[:3], False, "FillBar_End")
    assert len(bounded._masks) <= 8


def test_grammar_rejects_what_it_does_not_allow(bpe_vocab):
    v = bpe_vocab
    tables = GrammarTables.of(v)
    ts = v.tokenizer.vocab["TimeSig_4/4"]
    tok = v.tokenizer.vocab

    def at_bar_content(drums=False, n=2):
        g = BarGrammar(tables, BarPlan([ts] * n, [[]] * n, v.fill_end, drums), 100)
        for i in (v.bar, ts):
            g.advance(tables.model_id(i))
        return g

    g = at_bar_content()
    for bad in (
        v.fill_end,
        tok["PitchDrum_36"],
        tok["Pitch_60"],
        tok["Program_0"],
        tok["ACBarNoteDensity_3"],
        v.track_end,
        v.eos,
        v.infill_bar,
        tok["Position_48"],
    ):
        with pytest.raises(ValueError, match="not allowed"):
            g.advance(bad)
    g.advance(tok["Position_10"])
    g.advance(tok["Pitch_60"])
    with pytest.raises(ValueError):
        g.advance(v.bar)  # inside a note
    g.advance(tables.model_id(int(v.velocity_ids[0])))
    g.advance(tok["Duration_1.0.4"])
    for bad in (tok["Position_10"], tok["Position_3"], v.fill_end):  # not after position 10; bar 2 missing
        with pytest.raises(ValueError):
            g.advance(bad)
    g = at_bar_content(drums=True)
    g.advance(tok["Position_0"])
    with pytest.raises(ValueError):
        g.advance(tok["Pitch_60"])
    g.advance(tok["PitchDrum_36"])


def test_bpe_ids_hold_at_most_one_bar_at_their_start(bpe_vocab):
    merged = 0
    for bases in bpe_vocab.model_to_base:
        bars = [k for k, b in enumerate(bases) if b == bpe_vocab.bar]
        assert bars in ([], [0])
        merged += len(bases) > 1 and bars == [0]
    assert merged > 0  # BPE did merge Bar_None with what follows


def test_bar_length_in_positions_matches_miditok(vocab, tokenizer):
    tables = GrammarTables.of(vocab)
    tok = tokenizer.vocab
    for ts, positions in tables.bar_positions.items():
        last = tok.get(f"Position_{positions - 1}")
        assert last is not None
        ids = [
            vocab.track_start,
            tok["Program_0"],
            vocab.bar,
            ts,
            last,
            tok["Pitch_60"],
            int(vocab.velocity_ids[5]),
            tok["Duration_0.1.12"],
            vocab.bar,
            ts,
            tok["Position_0"],
            tok["Pitch_62"],
            int(vocab.velocity_ids[5]),
            tok["Duration_0.1.12"],
            vocab.track_end,
        ]
        notes = tokenizer.decode(ids).tracks[0].notes
        step = notes[1].time - notes[0].time  # last position of bar 1 -> first of bar 2: one position
        assert step > 0 and notes[0].time == positions * step - step


# -- sampling -------------------------------------------------------------------------------
def test_sample_next_semantics():
    gen = make_generator(0, torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    assert set(sample_next(logits, SamplingConfig(1.0, 1, None), gen).tolist()) == {0}
    assert set(sample_next(logits, SamplingConfig(1.0, None, 1e-6), gen).tolist()) == {0}
    assert set(sample_next(logits, SamplingConfig(0.0, None, None), gen).tolist()) == {0}
    assert set(sample_next(logits, SamplingConfig(1.0, None, 0.7), gen).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingConfig(1.0, 3, None), gen).tolist()) == {0, 1, 2}
    masked = logits.clone()
    masked[:, 0] = float("-inf")
    draws = sample_next(masked, SamplingConfig(1.0, None, 0.95), gen)
    assert 0 not in draws.tolist()
    hot = sample_next(logits, SamplingConfig(5.0, None, None), gen)  # high temperature flattens
    assert Counter(hot.tolist())[3] > Counter(sample_next(logits, SamplingConfig(1.0, None, None), gen).tolist())[3]
    for bad in (
        SamplingConfig(-1.0),
        SamplingConfig(1.0, 0),
        SamplingConfig(1.0, None, 0.0),
        SamplingConfig(1.0, None, 1.5),
    ):
        with pytest.raises(ValueError):
            bad.check()


def test_kv_cache_loop_matches_full_recompute(bpe_vocab):
    model = tiny_model(bpe_vocab.size, seed=3)
    prompt = list(range(5, 40))
    out = generate_ids(model, prompt, 20, sampling=SamplingConfig(temperature=0.0), num_threads=1)
    ids = list(prompt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(20):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    finally:
        torch.set_num_threads(threads)
    assert out.ids[0] == ids[len(prompt) :]
    assert out.steps == 19 and out.prompt_len == len(prompt) and out.new_tokens == 20


def test_seed_reproduces_and_variations_differ(bpe_vocab):
    model = tiny_model(bpe_vocab.size)
    prompt = list(range(5, 30))

    def run(seed):
        return generate_ids(
            model,
            prompt,
            30,
            num_variations=3,
            generator=make_generator(seed, torch.device("cpu")),
            sampling=SamplingConfig(1.0, None, None),
            num_threads=1,
        ).ids

    first = run(0)
    assert first == run(0)
    assert len({tuple(r) for r in first}) == 3
    assert first != run(1)


# -- API: structure of infills / new tracks ------------------------------------------------
def _notes(track: Track) -> np.ndarray:
    n = track.notes.numpy()
    return (
        np.stack([n["time"], n["duration"], n["pitch"], n["velocity"]], axis=1)
        if len(n["time"])
        else np.zeros((0, 4), int)
    )


def _span_ticks(mmm: MMM, score: Score, a: int, b: int) -> tuple[int, int | None]:
    piece = piece_from_score(score, mmm.tokenizer, mmm.vocab)
    start = round(piece.bar_ticks[a] * score.tpq / piece.tpq)
    end = round(piece.bar_ticks[b] * score.tpq / piece.tpq) if b < piece.num_bars else None
    return start, end


def assert_infill_ok(
    mmm: MMM, score: Score, out: Score, t: int, a: int, b: int, steps=None, clip_notes: bool = True
) -> None:
    """Exactly bars a..b-1 of track t were generated; nothing else changed."""
    v = mmm.vocab
    piece = piece_from_score(score, mmm.tokenizer, v)
    steps = [s for s in (steps or mmm.last_report.steps) if s.track == t and a <= s.bars[0] < b]
    assert sorted(s.bars for s in steps) == [s.bars for s in sorted(steps, key=lambda s: s.bars)]
    covered = [bar for s in steps for bar in range(*s.bars)]
    assert sorted(set(covered)) == list(range(a, b))
    generated = []
    for s in steps:
        for tokens in s.tokens:
            assert len(tokens) > 0
            check_generated(tokens, v, piece.time_sigs[s.bars[0] : s.bars[1]], piece.programs[t] < 0, "FillBar_End")
            assert s.prompt_tokens + s.budget <= mmm.model.config.max_seq_len
            assert s.window[0] <= s.bars[0] and s.bars[1] <= s.window[1]
        assert s.timings["new_tokens"] <= s.budget * len(s.variations)  # model ids, every row within budget
        generated.append((s.bars, s.tokens[0]))
    assert len(out.tracks) == len(score.tracks)
    if all(f"TimeSig_{ts.numerator}/{ts.denominator}" in v.tokenizer.vocab for ts in score.time_signatures):
        assert _span_ticks(mmm, score, a, b)[0] == list(get_bars_ticks(score))[a]  # the score's own bar a
    assert list(out.tempos) == list(score.tempos) and list(out.time_signatures) == list(score.time_signatures)
    start, end = _span_ticks(mmm, score, a, b)
    for i, (old, new) in enumerate(zip(score.tracks, out.tracks)):
        assert (old.name, old.program, old.is_drum) == (new.name, new.program, new.is_drum)
        if i != t:
            assert np.array_equal(_notes(old), _notes(new)), f"track {i} changed"
            continue
        o, n = _notes(old), _notes(new)
        inside_o = (o[:, 0] >= start) & (o[:, 0] < (end if end is not None else np.inf))
        inside_n = (n[:, 0] >= start) & (n[:, 0] < (end if end is not None else np.inf))
        assert np.array_equal(o[~inside_o], n[~inside_n]), "a note outside the span changed"
        expected = Counter()  # the generated tokens, decoded independently, cut at the span's end
        piece_end = round(piece.end_tick(v) * score.tpq / piece.tpq)
        clip = (end if end is not None else piece_end) if clip_notes else None
        # a monophonic track (its notes outside the span: more than one, no two starting
        # together) stays one: each new note ends where the next one starts
        kept = o[~inside_o]
        monophonic = not old.is_drum and len(kept) > 1 and len(np.unique(kept[:, 0])) == len(kept)
        for (s_a, _s_b), tokens in generated:
            body = [i for i in tokens[:-1] if not v.is_ac[i]]
            dec = mmm.tokenizer.decode([v.track_start, v.program_id[piece.programs[t]], *body, v.track_end])
            offset = round(piece.bar_ticks[s_a] * score.tpq / piece.tpq)
            step_notes = []
            for note in dec.tracks[0].notes if dec.tracks else []:
                duration = max(1, round(note.duration * score.tpq / dec.tpq))
                time = round(note.time * score.tpq / dec.tpq) + offset
                if clip is not None:
                    duration = max(1, min(duration, clip - time))
                step_notes.append([time, duration, note.pitch, note.velocity])
            step_notes.sort(key=lambda note: note[0])
            for note, following in zip(step_notes, step_notes[1:]):
                if monophonic:
                    note[1] = max(1, min(note[1], following[0] - note[0]))
            expected.update(tuple(note) for note in step_notes)
        assert Counter(tuple(int(x) for x in row) for row in n[inside_n]) == expected
        if clip is not None:  # no generated note sounds over the kept bars after the span
            assert (n[inside_n, 0] + n[inside_n, 1] <= clip).all()
    Score.from_midi(out.dumps_midi())  # writes and reads back


def assert_new_track_ok(mmm: MMM, score: Score, out: Score, program: int) -> None:
    v = mmm.vocab
    piece = piece_from_score(score, mmm.tokenizer, v)
    assert len(out.tracks) == len(score.tracks) + 1
    for old, new in zip(score.tracks, out.tracks):
        assert np.array_equal(_notes(old), _notes(new))
    new = out.tracks[-1]
    assert new.is_drum == (program < 0) and (program < 0 or new.program == program)
    steps = mmm.last_report.steps
    assert steps[0].task == "track" and steps[0].bars[0] == 0
    assert [bar for s in steps for bar in range(*s.bars)] == list(range(piece.num_bars))
    for k, s in enumerate(steps):
        end = "Track_End" if k == 0 else "FillBar_End"
        for tokens in s.tokens:
            check_generated(tokens, v, piece.time_sigs[s.bars[0] : s.bars[1]], program < 0, end)
        assert s.timings["new_tokens"] <= s.budget * len(s.variations)
        assert s.prompt_tokens + s.budget <= mmm.model.config.max_seq_len
        assert s.track == len(score.tracks)
    if len(new.notes):
        last = round((piece.bar_ticks[-1] + 4 * piece.tpq * 4) * score.tpq / piece.tpq)
        assert max(n.time for n in new.notes) < last
    Score.from_midi(out.dumps_midi())


def _targets(score: Score, mmm: MMM) -> list[int]:
    """The drum track with most notes (if any) and the pitched track with most notes."""
    piece = piece_from_score(score, mmm.tokenizer, mmm.vocab)
    with_notes = [i for i in range(len(score.tracks)) if not piece.empty[i]]
    drums = [i for i in with_notes if piece.programs[i] < 0]
    pitched = [i for i in with_notes if piece.programs[i] >= 0]
    out = []
    for group in (drums, pitched):
        if group:
            out.append(max(group, key=lambda i: len(score.tracks[i].notes)))
    return out


def _check_piece(mmm: MMM, score: Score, seed: int) -> None:
    piece = piece_from_score(score, mmm.tokenizer, mmm.vocab)
    nb = piece.num_bars
    for k, t in enumerate(_targets(score, mmm)):
        a = min(nb - 3, nb // 2 + k)
        out = mmm.infill(score, track=t, bars=(a, a + 3), seed=seed)
        assert_infill_ok(mmm, score, out, t, a, a + 3)
    out = mmm.add_track(score, program=33, seed=seed, max_bar_tokens=8)
    assert_new_track_ok(mmm, score, out, 33)


def test_synthetic_piece_infill_and_new_track(mmm):
    score = synthetic_score(0, 12)
    before = [_notes(t).copy() for t in score.tracks]
    _check_piece(mmm, score, seed=0)
    assert all(np.array_equal(b, _notes(t)) for b, t in zip(before, score.tracks))  # the input is not modified
    # the bars the API counts are the score's bars
    piece = piece_from_score(score, mmm.tokenizer, mmm.vocab)
    assert [round(t * score.tpq / piece.tpq) for t in piece.bar_ticks] == list(get_bars_ticks(score))[: piece.num_bars]
    # last bars of the piece, drums, several spans
    out = mmm.infill(score, track=2, bars=(piece.num_bars - 2, piece.num_bars), seed=1)
    assert_infill_ok(mmm, score, out, 2, piece.num_bars - 2, piece.num_bars)


def test_bars_cut_short_by_the_budget_are_reported(bpe_tokenizer, bpe_vocab, caplog):
    """A row that runs out of context is closed with the exact bar count, and the bars written
    under that pressure are named in the report and in a warning, never silently."""
    cramped = Recorded(tiny_model(bpe_vocab.size, max_seq_len=160), bpe_tokenizer, max_bar_tokens=8, num_threads=1)
    score = synthetic_score(0, 12)
    with caplog.at_level("WARNING", logger="mmm.generation.api"):
        out = cramped.infill(score, track=0, bars=(2, 6), seed=0, bars_before=1, bars_after=1)
    assert_infill_ok(cramped, score, out, 0, 2, 6)
    starved = cramped.last_report.summary()["starved_bars"]
    assert starved and all(t == 0 and 2 <= b < 6 for t, b in starved), starved
    assert "may be cut short" in caplog.text
    roomy = Recorded(tiny_model(bpe_vocab.size, max_seq_len=2048), bpe_tokenizer, max_bar_tokens=8, num_threads=1)
    roomy.infill(score, track=0, bars=(2, 3), seed=0, bars_before=0, bars_after=0)
    assert roomy.last_report.summary()["starved_bars"] == []


def test_generated_notes_end_at_the_span_end_unless_asked(mmm):
    """The model may write a note that lasts past its bar; spliced into the piece it would
    sound over the kept bars after the span. Such notes are cut at the span's end, unless
    `clip_notes=False`."""
    score = synthetic_score(0, 12)
    t, a, b = 0, 3, 5
    start, end = _span_ticks(mmm, score, a, b)

    def notes_past_the_end(seed: int, clip_notes: bool) -> int:
        out = mmm.infill(score, track=t, bars=(a, b), seed=seed, clip_notes=clip_notes, temperature=1.5)
        assert_infill_ok(mmm, score, out, t, a, b, clip_notes=clip_notes)
        n = _notes(out.tracks[t])
        generated = (n[:, 0] >= start) & (n[:, 0] < end)
        return int((n[generated, 0] + n[generated, 1] > end).sum())

    # The (untrained) model writes such a note for some seeds: the first one that does, clipped.
    seed = next((s for s in range(40) if notes_past_the_end(s, clip_notes=False) > 0), None)
    assert seed is not None, "no seed gave a note lasting past the span: the test needs one"
    assert notes_past_the_end(seed, clip_notes=True) == 0


@pytest.mark.slow
@pytest.mark.parametrize("path", MULTITRACK or [None], ids=[p.stem for p in MULTITRACK] or ["unset"])
def test_every_multitrack_file(path, mmm):
    if path is None:
        pytest.skip("MMM_TEST_MIDI is not set")
    _check_piece(mmm, Score(str(path)), seed=0)


def mixed_meter_score() -> Score:
    """3 bars of 3/4, 4 bars of 6/8, 3 bars of 4/4; a melody and drums."""
    tpq = 480
    score = Score(tpq)
    score.tempos.append(Tempo(0, 100.0))
    lengths = [3 * tpq] * 3 + [3 * tpq] * 4 + [4 * tpq] * 3
    score.time_signatures.append(TimeSignature(0, 3, 4))
    score.time_signatures.append(TimeSignature(sum(lengths[:3]), 6, 8))
    score.time_signatures.append(TimeSignature(sum(lengths[:7]), 4, 4))
    melody, drums = Track("melody", 0, False), Track("drums", 0, True)
    start = 0
    rng = random.Random(0)
    for length in lengths:
        for k in range(0, length, tpq // 2):
            melody.notes.append(Note(start + k, tpq // 2, rng.randint(60, 72), 80))
            drums.notes.append(Note(start + k, tpq // 4, 42, 90))
        start += length
    score.tracks.extend([melody, drums])
    return score


def test_mixed_time_signatures(mmm):
    score = mixed_meter_score()
    piece = piece_from_score(score, mmm.tokenizer, mmm.vocab)
    assert [mmm.vocab.token_of[i][8:] for i in piece.time_sigs] == ["3/4"] * 3 + ["6/8"] * 4 + ["4/4"] * 3
    for t, (a, b) in ((0, (2, 5)), (1, (6, 8)), (0, (7, 10))):
        out = mmm.infill(score, track=t, bars=(a, b), seed=0)
        assert_infill_ok(mmm, score, out, t, a, b)
    out = mmm.add_track(score, program=33, seed=0, max_bar_tokens=8)
    assert_new_track_ok(mmm, score, out, 33)


def test_base_tokenizer_without_bpe(mmm_base):
    score = synthetic_score(1, 9)
    out = mmm_base.infill(score, track=0, bars=(2, 4), seed=0)
    assert_infill_ok(mmm_base, score, out, 0, 2, 4)


def test_several_tracks_and_spans_one_after_the_other(mmm):
    score = synthetic_score(2, 16)
    out = mmm.infill(score, track=[0, 2], bars=[(1, 3), (8, 10)], seed=0)
    steps = mmm.last_report.steps
    assert [(s.track, s.bars) for s in steps] == [(0, (1, 3)), (0, (8, 10)), (2, (1, 3)), (2, (8, 10))]
    # each later generation sees the earlier results: its prompt holds the generated bars
    v = mmm.vocab
    first_bars = [i for i in steps[0].tokens[0][:-1] if not v.is_ac[i]]
    assert v.encode_words([first_bars[: first_bars.index(v.bar, 1)]])[0] in steps[2].prompt
    for t in (0, 2):
        for a, b in ((1, 3), (8, 10)):
            piece_steps = [s for s in steps if s.track == t and s.bars == (a, b)]
            assert_infill_ok(mmm, _with_other_spans(score, out, t, a, b, mmm), out, t, a, b, piece_steps)


def _with_other_spans(score: Score, out: Score, t: int, a: int, b: int, mmm: MMM) -> Score:
    """`score` with every change of `out` except track t's span a..b (to check one span)."""
    mixed = out.copy()
    start, end = _span_ticks(mmm, score, a, b)
    old, new = score.tracks[t].notes.numpy(), out.tracks[t].notes.numpy()
    keep_new = (new["time"] < start) | (new["time"] >= end)
    take_old = (old["time"] >= start) & (old["time"] < end)
    merged = {
        k: np.concatenate([new[k][keep_new], old[k][take_old]]) for k in ("time", "duration", "pitch", "velocity")
    }
    order = np.argsort(merged["time"], kind="stable")
    mixed.tracks[t].notes = Note.from_numpy(**{k: x[order] for k, x in merged.items()})
    return mixed


@pytest.mark.slow
def test_generate_from_scratch(mmm):
    for ts, bar_tokens, num_bars in (("4/4", 8, 6), ("3/4", 48, 12)):  # one segment / several
        out = mmm.generate(
            [0, 33, -1], num_bars=num_bars, time_signature=ts, tempo=100, seed=0, max_bar_tokens=bar_tokens
        )
        num, den = (int(x) for x in ts.split("/"))
        assert [(t.program, t.is_drum) for t in out.tracks] == [(0, False), (33, False), (0, True)]
        assert (out.time_signatures[0].numerator, out.time_signatures[0].denominator) == (num, den)
        assert abs(out.tempos[0].qpm - 100) < 1e-6
        bar = num * out.tpq * 4 // den
        for t in out.tracks:
            assert all(n.time < num_bars * bar for n in t.notes)
        steps = mmm.last_report.steps
        ts_id = mmm.tokenizer.vocab[f"TimeSig_{ts}"]
        for k, program in enumerate((0, 33, -1)):
            mine = [s for s in steps if s.track == k]
            assert [bar_ for s in mine for bar_ in range(*s.bars)] == list(range(num_bars))
            for s in mine:
                check_generated(
                    s.tokens[0],
                    mmm.vocab,
                    [ts_id] * (s.bars[1] - s.bars[0]),
                    program < 0,
                    "Track_End" if s.task == "track" else "FillBar_End",
                )
        assert len([s for s in steps if s.track == 0]) == (1 if bar_tokens == 8 else 3)


def test_two_threads_on_one_model_each_get_their_own_report(bpe_tokenizer, bpe_vocab):
    """`MMM.run` returns the scores with the report of that call: two requests running at once
    on one `MMM` (threads, a server) never see each other's report nor progress."""
    import threading

    shared = MMM(tiny_model(bpe_vocab.size), bpe_tokenizer, max_bar_tokens=24, num_threads=1)
    score = synthetic_score(1, 12)
    requests = {
        "infill": Request("infill", track=1, bars=(2, 5), seed=3),
        "add_track": Request("add_track", program=33, seed=4),
    }
    results, progress, errors = {}, {name: 0 for name in requests}, []
    barrier = threading.Barrier(len(requests))

    def work(name: str) -> None:
        def on_step(grammars) -> None:
            progress[name] += 1

        try:
            barrier.wait()
            results[name] = shared.run(requests[name], score, on_step)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    infill, added = results["infill"].report, results["add_track"].report
    assert {s.task for s in infill.steps} == {"infill"} and {(s.track, s.bars) for s in infill.steps} == {(1, (2, 5))}
    assert infill.steps[0].context_tracks and added.steps[0].task == "track"
    assert all(s.track == len(score.tracks) for s in added.steps)
    # each progress hook counted its own tokens only
    assert progress["infill"] == sum(s.timings["new_tokens"] for s in infill.steps)
    assert progress["add_track"] == sum(s.timings["new_tokens"] for s in added.steps)
    assert len(results["add_track"].scores[0].tracks) == len(score.tracks) + 1
    assert len(results["infill"].scores[0].tracks) == len(score.tracks)


def test_variations_differ_and_seed_reproduces(mmm):
    score = synthetic_score(0, 12)
    outs = mmm.infill(score, track=0, bars=(3, 6), seed=7, num_variations=3)
    assert isinstance(outs, list) and len(outs) == 3
    notes = [tuple(map(tuple, _notes(o.tracks[0]))) for o in outs]
    assert len(set(notes)) == 3
    for o, tokens in zip(outs, mmm.last_report.steps[0].tokens):
        assert_infill_ok(mmm, score, o, 0, 3, 6, [_one(mmm.last_report.steps[0], tokens)])
    again = mmm.infill(score, track=0, bars=(3, 6), seed=7, num_variations=3)
    assert [tuple(map(tuple, _notes(o.tracks[0]))) for o in again] == notes
    other = mmm.infill(score, track=0, bars=(3, 6), seed=8, num_variations=3)
    assert [tuple(map(tuple, _notes(o.tracks[0]))) for o in other] != notes
    # several generations per call with variations: each variation continues its own piece
    outs = mmm.add_track(score, program=-1, seed=0, num_variations=2, max_bar_tokens=48)
    assert len(outs) == 2 and all(len(o.tracks) == len(score.tracks) + 1 for o in outs)
    assert [s.variations for s in mmm.last_report.steps] == [[0, 1], [0], [1], [0], [1]]


def _one(step, tokens):
    return dataclasses.replace(step, tokens=[tokens])


# -- prompts are the training format ------------------------------------------------------
def test_prompts_are_training_samples(bpe_tokenizer, bpe_vocab):
    v = bpe_vocab
    big = Recorded(tiny_model(v.size, max_seq_len=4096), bpe_tokenizer, max_bar_tokens=24, num_threads=1)
    score = synthetic_score(0, 12)
    settings = preprocess_settings(min_notes=1, min_bars=1, chunk_max_tokens=10**9, chunk_max_track_tokens=10**9)
    (chunk,) = tokenize_score(score, bpe_tokenizer, v, settings)  # the training path
    tacs = {"note_density_min": 2, "polyphony_max": 3}
    big.infill(score, track=1, bars=(4, 7), track_controls=tacs, controls={"note_density": 4}, seed=0)
    step = big.last_report.steps[0]
    track_ac_ids = big.controls.track_ids(tacs)
    words = [[v.bos]]
    for t, (program, bars) in enumerate(zip(chunk.programs, chunk.bars)):
        words += [[v.track_start], [v.program_id[program]]]
        if t == 1:
            words += [[i] for i in track_ac_ids]
            words += [list(b) for b in bars[:4]] + [[v.infill_bar]] * 3 + [list(b) for b in bars[7:]]
        else:
            words += [list(b) for b in bars]
        words.append([v.track_end])
    words.append([v.fill_start])
    assert step.prompt == v.encode_words(words)
    # new track: context tracks then Track_Start Program [track ACs]
    big.add_track(score, program=40, track_controls=tacs, seed=0)
    step = big.last_report.steps[0]
    words = [[v.bos]]
    for program, bars in zip(chunk.programs, chunk.bars):
        words += [[v.track_start], [v.program_id[program]], *[list(b) for b in bars], [v.track_end]]
    words += [[v.track_start], [v.program_id[40]], *[[i] for i in track_ac_ids]]
    assert step.prompt == v.encode_words(words)


def test_context_window_fits_the_model(bpe_tokenizer, bpe_vocab):
    small = Recorded(tiny_model(bpe_vocab.size, max_seq_len=256), bpe_tokenizer, max_bar_tokens=16, num_threads=1)
    score = synthetic_score(3, 24)
    out = small.infill(score, track=0, bars=(10, 12), bars_before=2, bars_after=1, seed=0)
    step = small.last_report.steps[0]
    assert 8 <= step.window[0] <= 10 and 12 <= step.window[1] <= 13
    assert step.prompt_tokens + step.budget <= 256
    assert_infill_ok(small, score, out, 0, 10, 12)
    out = small.infill(score, track=3, bars=(0, 24), seed=0)  # a long span: several segments
    assert len(small.last_report.steps) > 1
    assert len(small.last_report.steps[0].context_tracks) < len(score.tracks) - 1  # tracks were dropped
    assert_infill_ok(small, score, out, 3, 0, 24)


def test_infill_of_an_empty_track(mmm):
    score = synthetic_score(0, 8)
    score.tracks.append(Track("empty", 40, False))
    t = len(score.tracks) - 1
    out = mmm.infill(score, track=t, bars=(2, 4), seed=0)
    assert_infill_ok(mmm, score, out, t, 2, 4)


# -- controls -------------------------------------------------------------------------------
def test_controls_map_to_the_tokens_training_uses(bpe_tokenizer, bpe_vocab):
    """Controls named after the values miditok computed give back exactly miditok's AC ids."""
    v = bpe_vocab
    controls = Controls(bpe_tokenizer, v)
    score = bpe_tokenizer.preprocess_score(synthetic_score(4, 8))
    ticks = list(get_bars_ticks(score))
    checked = 0
    for track in score.tracks:
        computed = [[i for fam in bar for i in fam] for bar in bar_controls(bpe_tokenizer, v, track, score.tpq, ticks)]
        for ids in computed:
            if ids:
                assert controls.bar_ids(_as_controls(ids, v, "Bar"), [0])[0] == ids
                checked += 1
        tids = [i for fam in track_controls(bpe_tokenizer, v, track, score.tpq, ticks) for i in fam]
        assert controls.track_ids(_as_controls(tids, v, "Track")) == tids
    assert checked > 10


def _as_controls(ids, v, level):
    names = {
        "OnsetPolyphonyMin": "polyphony_min",
        "OnsetPolyphonyMax": "polyphony_max",
        "NoteDensity": "note_density",
        "NoteDensityMin": "note_density_min",
        "NoteDensityMax": "note_density_max",
        "Repetition": "repetition",
    }
    durations = {"Whole": "whole", "Half": "half", "Quarter": "quarter", "Eight": "eighth", "Sixteenth": "sixteenth"}
    out: dict = {}
    for i in ids:
        kind, value = v.token_of[i].removeprefix(f"AC{level}").split("_")
        if kind == "PitchClass":
            out.setdefault("pitch_classes", []).append(int(value))
        elif kind.startswith("NoteDuration"):
            present = out.setdefault("note_durations", [])
            if value == "1":
                present.append(durations[kind.removeprefix("NoteDuration")])
        elif kind == "Repetition":
            out["repetition"] = float(value)
        else:
            out[names[kind]] = int(value.rstrip("+"))
    return out


def test_controls_are_forced_after_each_timesig(mmm):
    v = mmm.vocab
    score = synthetic_score(0, 12)
    mmm.infill(score, track=1, bars=(4, 7), controls={"note_density": 6, "pitch_classes": [7, 0, 4]}, seed=0)
    expected = [
        v.tokenizer.vocab[t]
        for t in ("ACBarPitchClass_0", "ACBarPitchClass_4", "ACBarPitchClass_7", "ACBarNoteDensity_6")
    ]
    bars = check_generated(
        mmm.last_report.steps[0].tokens[0], v, [v.tokenizer.vocab["TimeSig_4/4"]] * 3, False, "FillBar_End"
    )
    for bar in bars:
        assert bar[2:6] == [v.token_of[i] for i in expected]
    mmm.infill(
        score, track=1, bars=(4, 7), controls={4: {"polyphony_max": 2}, 6: {"note_durations": ["quarter"]}}, seed=0
    )
    bars = check_generated(
        mmm.last_report.steps[0].tokens[0], v, [v.tokenizer.vocab["TimeSig_4/4"]] * 3, False, "FillBar_End"
    )
    assert bar_acs(bars[0]) == ["ACBarOnsetPolyphonyMax_2"]
    assert bar_acs(bars[1]) == []
    assert bar_acs(bars[2]) == [
        "ACBarNoteDurationWhole_0",
        "ACBarNoteDurationHalf_0",
        "ACBarNoteDurationQuarter_1",
        "ACBarNoteDurationEight_0",
        "ACBarNoteDurationSixteenth_0",
    ]


def bar_acs(bar):
    return [t for t in bar[2:] if t.startswith("AC")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(controls={"density": 3}), "unknown control 'density'.*note_density"),
        (dict(controls={"note_density": 19}), "invalid value 19 for note_density: int 0..18"),
        (dict(controls={"note_density": -1}), "invalid value"),
        (dict(controls={"note_density": True}), "invalid value"),
        (dict(controls={"polyphony_max": 7}), "polyphony_max: int 1..6"),
        (dict(controls={"pitch_classes": [0, 12]}), "pitch_classes"),
        (dict(controls={"pitch_classes": "C"}), "pitch_classes"),
        (dict(controls={"note_durations": ["thirty_second"]}), "note_durations: list among"),
        (dict(controls={9: {"note_density": 2}}), r"bar\(s\) \[9\] that are not generated"),
        (dict(controls={4: {"note_density": 2}, "note_density": 3}), "either one mapping"),
        (dict(track_controls={"repetition": 1.5}), "repetition: float in"),
        (dict(track_controls={"note_density": 3}), "valid track-level controls:.*note_density_min"),
        (dict(track_controls={"polyphony_min": 0}), "polyphony_min: int 1..6"),
    ],
)
def test_controls_validation(mmm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mmm.infill(synthetic_score(0, 12), track=1, bars=(4, 7), **kwargs)


def test_controls_valid_values_accepted(mmm):
    ids = mmm.controls.track_ids(
        {"repetition": 0.5, "note_density_min": 18, "note_density_max": 18, "note_durations": []}
    )
    tokens = [mmm.vocab.token_of[i] for i in ids]
    assert tokens[:2] == ["ACTrackNoteDensityMin_18+", "ACTrackNoteDensityMax_18+"]
    assert tokens[-1] in ("ACTrackRepetition_0.44", "ACTrackRepetition_0.56")


# -- bad requests ---------------------------------------------------------------------------
def _silent() -> Score:
    score = Score(480)
    score.tracks.append(Track("silent", 0, False))
    return score


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, s: m.infill(s, track=9, bars=(1, 2)), "unknown track 9: the score has 6 track"),
        (lambda m, s: m.infill(s, track=-1, bars=(1, 2)), "unknown track -1"),
        (lambda m, s: m.infill(s, track=[0, 0], bars=(1, 2)), "duplicated"),
        (lambda m, s: m.infill(s, track=0, bars=(10, 13)), r"bars \(10, 13\) out of range: the piece has 12 bars"),
        (lambda m, s: m.infill(s, track=0, bars=(3, 3)), "out of range"),
        (lambda m, s: m.infill(s, track=0, bars=[(1, 4), (3, 5)]), "overlap"),
        (lambda m, s: m.infill(s, track=0, bars="1-3"), "bars must be"),
        (lambda m, s: m.infill(s, track=0, bars=(1, 2), num_variations=0), "num_variations"),
        (lambda m, s: m.infill(s, track=0, bars=(1, 2), temperature=-1), "temperature"),
        (lambda m, s: m.infill(s, track=0, bars=(1, 2), top_p=0), "top_p"),
        (lambda m, s: m.infill(s, track=0, bars=(1, 2), bars_before=-2), "bars_before"),
        (lambda m, s: m.add_track(s, program=128), "program 128 is not valid"),
        (lambda m, s: m.add_track(s, program=-2), "program -2"),
        (lambda m, s: m.generate([], num_bars=4), "programs"),
        (lambda m, s: m.generate([0], num_bars=0), "num_bars"),
        (lambda m, s: m.generate([0], num_bars=4, time_signature="11/8"), "time_signature '11/8'.*valid"),
        (lambda m, s: m.generate([0], num_bars=4, controls=[{}, {}]), "one mapping per program"),
        (lambda m, s: m.infill(Score(480), track=0, bars=(0, 1)), "unknown track 0"),
        (lambda m, s: m.infill(_silent(), track=0, bars=(0, 1)), "no note the tokenizer can represent"),
        (lambda m, s: m.generate([0], num_bars=4, tempo=0), "tempo"),
    ],
)
def test_bad_requests(mmm, call, message):
    with pytest.raises(ValueError, match=message):
        call(mmm, synthetic_score(0, 12))


def test_bad_input_files(mmm, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        mmm.infill(tmp_path / "missing.mid", track=0, bars=(0, 1))
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd this is not a midi file")
    with pytest.raises(ValueError, match="cannot read"):
        mmm.infill(bad, track=0, bars=(0, 1))
    path = tmp_path / "ok.mid"
    synthetic_score(0, 6).dump_midi(path)
    out = mmm.infill(path, track=0, bars=(0, 1), seed=0)  # a path works like a Score
    assert isinstance(out, Score)


# -- loading and saving ---------------------------------------------------------------------
def test_save_and_load_pretrained(mmm, tmp_path, monkeypatch):
    folder = mmm.save_pretrained(tmp_path / "model")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    loaded = MMM.from_pretrained(folder, num_threads=1)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), mmm.model(ids))
    # miditok loads the tokenizer from the same folder
    tok = MiditokMMM.from_pretrained(folder)
    assert tok.vocab == mmm.tokenizer.vocab and tok.is_trained
    assert tok._model.get_vocab_size() == mmm.vocab.size
    score = synthetic_score(0, 6)
    assert tok.encode(score).ids == mmm.tokenizer.encode(score).ids
    # a Lightning .ckpt (what training writes) loads too
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "hyper_parameters": {
                "model_config": mmm.model.config.to_dict(),
                "tokenizer_json": (folder / "tokenizer.json").read_text(),
            },
            "state_dict": {f"model.{k}": t for k, t in mmm.model.state_dict().items()},
        },
        ckpt,
    )
    from_ckpt = MMM.from_pretrained(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt.model(ids), mmm.model(ids))
    assert from_ckpt.vocab.size == mmm.vocab.size
    # a hub id goes through snapshot_download
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, token=None):
        calls.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    hub = MMM.from_pretrained("someone/mmm-demo", revision="v1")
    assert calls == [("someone/mmm-demo", "v1")] and hub.vocab.size == mmm.vocab.size
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        MMM.from_pretrained(tmp_path / "nothing" / "here")
    # push_to_hub uploads the same folder (HfApi mocked: no network here)
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads.append(("create", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://hub/commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert mmm.push_to_hub("someone/mmm-demo") == "https://hub/commit"
    assert uploads == [
        ("create", "someone/mmm-demo", True),
        ("upload", "someone/mmm-demo", ["config.json", "model.safetensors", "tokenizer.json"]),
    ]


def test_import_mmm_is_light():
    import subprocess
    import sys

    import mmm as package
    import mmm.generation.api

    code = "import sys, mmm; assert 'torch' not in sys.modules and 'mmm.generation.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert package.MMM is mmm.generation.api.MMM
