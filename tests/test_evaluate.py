"""`mmm.evaluate` and `mmm.evaluate.metrics`: n-gram baselines and musical statistics on hand-computed
cases, control scores, and the whole evaluation on a tiny random model over a synthetic store
(metrics keys and sanity, determinism, report and plots, vocabulary mismatch)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, compose_config, synthetic_score, write_synthetic_midi

from mmm.data.prepare import train_tokenizer
from mmm.data.sequences import IGNORE_INDEX
from mmm.evaluate import check_config, evaluate
from mmm.evaluate.metrics import BigramKN, UnigramLM, adherence, histogram_overlap, musical_stats, spearman
from mmm.model import MMMTransformer, model_config_from_preset
from mmm.model.pretrained import save_pretrained
from mmm.tokenizer import Vocab, load_tokenizer

X = IGNORE_INDEX


# --- n-gram baselines -------------------------------------------------------------------------
# Two sequences over V = 4 ids; a hidden label (X) is a prompt-only position, never a target.
# Targets are positions 1.. (previous id -> id):
#   seq 1: ids 0 1 2 1 2, labels of positions 1..4 = 1 X 1 2 -> (0->1), (2->1), (1->2)
#   seq 2: ids 0 1 1,     labels of positions 1..2 = 1 1     -> (0->1), (1->1)
TOY = [
    (np.array([0, 1, 2, 1, 2]), np.array([0, 1, X, 1, 2])),
    (np.array([0, 1, 1]), np.array([0, 1, 1])),
]


def test_unigram_add_one_by_hand():
    lm = UnigramLM(4).fit(TOY)
    # target counts: id1 x4, id2 x1 -> N = 5, V = 4
    assert lm.counts.tolist() == [0, 4, 1, 0]
    bits = lm.bits(np.array([3, 1, 0]), np.array([3, 1, 0]))  # targets 1 then 0
    assert np.allclose(bits, [-math.log2(5 / 9), -math.log2(1 / 9)])


def test_bigram_kneser_ney_by_hand():
    d = 0.5
    lm = BigramKN(4, discount=d).fit(TOY)
    # bigrams: (0,1) x2, (2,1) x1, (1,2) x1, (1,1) x1 -> B = 4 types
    # continuation N1+(., w): w=1: {0,2,1} = 3, w=2: {1} = 1 -> Pc = (n + 1) / (4 + 4)
    pc = np.array([1, 4, 2, 1]) / 8
    assert np.allclose(lm.p_cont, pc)
    # context 1: c = 2, T = 2 (-> 2 and -> 1)
    p = lm.prob(np.array([1, 1, 1, 1]), np.arange(4))
    expected = [d * 2 / 2 * pc[0], (1 - d) / 2 + d * pc[1], (1 - d) / 2 + d * pc[2], d * pc[3]]
    assert np.allclose(p, expected)
    # context 0: c = 2, T = 1
    assert np.isclose(lm.prob(np.array([0]), np.array([1]))[0], (2 - d) / 2 + d * 1 / 2 * pc[1])
    # unseen context 3: the continuation distribution
    assert np.allclose(lm.prob(np.full(4, 3), np.arange(4)), pc)
    bits = lm.bits(*TOY[1])
    assert np.allclose(bits, -np.log2([(2 - d) / 2 + d / 2 * pc[1], (1 - d) / 2 + d * pc[1]]))


def test_ngram_distributions_sum_to_one():
    rng = np.random.default_rng(0)
    seqs = [(ids := rng.integers(0, 30, 60), np.where(rng.random(60) < 0.2, X, ids)) for _ in range(20)]
    uni, bi = UnigramLM(30).fit(seqs), BigramKN(30).fit(seqs)
    w = np.arange(30)
    assert np.isclose(uni.prob(w, w).sum(), 1)
    for v in range(30):
        assert np.isclose(bi.prob(np.full(30, v), w).sum(), 1)
        assert (bi.prob(np.full(30, v), w) > 0).all()


# --- musical statistics -----------------------------------------------------------------------
TPQ = 4  # ticks per beat; bars of 16 ticks


def stats(notes, length=32, drums=()):
    time, duration, pitch = (np.array(x) for x in zip(*notes)) if notes else ([], [], [])
    is_drum = [i in drums for i in range(len(notes))]
    return musical_stats(time, duration, pitch, is_drum, length, TPQ, 4 * TPQ)


def test_musical_stats_of_hand_made_bars():
    # bar 0: C-E-G quarter notes on beats 0, 1, 2 (nothing on beat 3); bar 1: the same rhythm,
    # C-E-G as one chord held for beat 0 only
    bar0 = [(0, 4, 60), (4, 4, 64), (8, 4, 67)]
    bar1 = [(16, 4, 60), (16, 4, 64), (16, 4, 67), (20, 2, 72), (24, 2, 71)]
    s = stats(bar0 + bar1)
    # pitch classes C x3, E x2, G x2, B x1 -> entropy of (3, 2, 2, 1) / 8
    p = np.array([3, 2, 2, 1]) / 8
    assert s["pitch_class_entropy"] == pytest.approx(-(p * np.log2(p)).sum())
    assert s["scale_consistency"] == 1.0  # all in C major
    assert s["pitch_range"] == 72 - 60
    # sounding pitches per tick: 12 ticks x 1 (bar 0), 4 x 3, 2 x 1, 2 x 1 (bar 1)
    assert s["polyphony"] == pytest.approx((12 + 12 + 2 + 2) / (12 + 4 + 2 + 2))
    # beats 4, 5, 6 hold the chord and the two eighths: only beats 3 and 7 are empty
    assert s["empty_beat_rate"] == pytest.approx(2 / 8)
    # onsets bar 0 at 0, 4, 8; bar 1 at 0, 4, 8: identical patterns
    assert s["groove_consistency"] == 1.0


def test_musical_stats_edge_cases():
    s = stats([], length=32)
    assert math.isnan(s["pitch_class_entropy"]) and math.isnan(s["polyphony"]) and math.isnan(s["pitch_range"])
    assert s["empty_beat_rate"] == 1.0  # an empty span is all empty beats
    assert s["groove_consistency"] == 1.0
    one_bar = stats([(0, 2, 60)], length=16)
    assert math.isnan(one_bar["groove_consistency"])  # needs two bars
    # a drum note counts for beats and groove, not for pitch statistics
    drum = stats([(0, 2, 36), (16, 2, 38)], drums=(0, 1))
    assert math.isnan(drum["pitch_class_entropy"]) and drum["empty_beat_rate"] == pytest.approx(6 / 8)
    # groove: bar 0 onsets {0, 8}, bar 1 onsets {4}: 3 of 16 positions differ
    assert stats([(0, 1, 60), (8, 1, 60), (20, 1, 60)])["groove_consistency"] == pytest.approx(1 - 3 / 16)
    # off-scale: C C# D -> best scale holds 2 of 3
    assert stats([(0, 1, 60), (1, 1, 61), (2, 1, 62)])["scale_consistency"] == pytest.approx(2 / 3)
    # notes running past the span end are cut at the span end for empty beats
    assert stats([(0, 64, 60)], length=32)["empty_beat_rate"] == 0.0


def test_musical_stats_match_muspy_where_definitions_agree():
    """MusPy measures a whole piece up to its last note end: with the last note ending inside
    the last beat of the span and no note ending on a beat boundary, both must agree."""
    muspy = pytest.importorskip("muspy")
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(3, 25))
        time = np.sort(rng.integers(0, 60, n))
        duration = rng.integers(1, 9, n)
        ends = time + duration
        bad = (ends % TPQ == 0) | (ends >= 64)
        duration[bad] = np.maximum(1, duration[bad] - 1 - (ends[bad] - 63).clip(0))
        ends = time + duration
        keep = (ends % TPQ != 0) & (ends < 64)
        time, duration = time[keep], duration[keep]
        pitch = rng.integers(40, 90, len(time))
        time = np.append(time, 62)  # the last note ends at 63: inside beat 15, the piece has 64 ticks
        duration = np.append(duration, 1)
        pitch = np.append(pitch, 60)
        ours = musical_stats(time, duration, pitch, [False] * len(time), 64, TPQ, 16)
        music = muspy.Music(
            resolution=TPQ,
            tracks=[
                muspy.Track(
                    notes=[
                        muspy.Note(time=int(t), pitch=int(p), duration=int(d), velocity=64)
                        for t, d, p in zip(time, duration, pitch)
                    ]
                )
            ],
        )
        assert ours["pitch_class_entropy"] == pytest.approx(muspy.pitch_class_entropy(music)), trial
        assert ours["scale_consistency"] == pytest.approx(muspy.scale_consistency(music)), trial
        assert ours["polyphony"] == pytest.approx(muspy.polyphony(music)), trial
        assert ours["pitch_range"] == muspy.pitch_range(music), trial
        assert ours["empty_beat_rate"] == pytest.approx(muspy.empty_beat_rate(music)), trial
        assert ours["groove_consistency"] == pytest.approx(muspy.groove_consistency(music, 16)), trial


# --- control scores ---------------------------------------------------------------------------
def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # ties get average ranks: x ranks 1, 2.5, 2.5, 4; y ranks 1, 2, 3, 4
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.arange(1, 5)
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side
    assert math.isnan(spearman([1, 2], [1, 2]))  # too few pairs


def test_adherence_scores():
    r = adherence([1, 2, 3, 4], [1, 3, None, 4], "int")
    assert r["exact"] == 0.5 and r["within_1"] == 0.75 and r["spearman"] == pytest.approx(1)
    bins = [0.0, 0.11, 0.22, 0.33]
    r = adherence([0.0, 0.11, 0.33], [0.11, 0.11, 0.0], "float", bins)
    assert r["exact"] == pytest.approx(1 / 3) and r["within_1"] == pytest.approx(2 / 3)
    r = adherence([frozenset({0, 4, 7}), frozenset({2})], [frozenset({0, 4, 7}), frozenset({2, 5})], "set")
    assert r["exact"] == 0.5 and r["jaccard"] == pytest.approx((1 + 0.5) / 2)
    assert histogram_overlap([1, 2, 3], [1, 2, 3]) == pytest.approx(1)
    assert histogram_overlap([0, 0], [10, 10]) == 0


# --- model NLL --------------------------------------------------------------------------------
def test_model_nll_is_the_training_objective_per_target():
    """Evaluation scores sequences in padded batches with `next_token_nll`, the training loss:
    each sequence's per-target NLL is the same as scored alone, and sums to the batch loss."""
    from mmm.data.datamodule import collate
    from mmm.evaluate.likelihood import model_nll
    from mmm.model import next_token_nll

    torch.manual_seed(0)
    config = model_config_from_preset(
        "tiny",
        vocab_size=50,
        max_seq_len=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )
    model = MMMTransformer(config).eval()
    rng = np.random.default_rng(0)
    seqs = []
    for length in (9, 30, 17, 30, 5):
        ids = rng.integers(1, 50, length)
        seqs.append((ids, np.where(rng.random(length) < 0.3, X, ids)))
    batched = model_nll(model, seqs, 2, 0, "")
    for (ids, labels), nll in zip(seqs, batched):
        assert len(nll) == (labels[1:] != X).sum()
        assert np.allclose(nll, model_nll(model, [(ids, labels)], 1, 0, "")[0], atol=1e-5)
    batch = collate([{"input_ids": i, "labels": lab, "num_notes": 0, "index": k} for k, (i, lab) in enumerate(seqs)], 0)
    with torch.no_grad():
        total = next_token_nll(model, batch["input_ids"], batch["labels"], IGNORE_INDEX, reduction="sum")
    assert float(total) == pytest.approx(sum(float(n.sum()) for n in batched), rel=1e-5)


# --- the whole evaluation ---------------------------------------------------------------------
def data_overrides(corpus: Path, data_dir: Path) -> list[str]:
    return [
        "data=folder",
        f"data.path={corpus}",
        f"paths.data_dir={data_dir}",
        "data.split.valid=0.1",
        "data.split.test=0.3",
        "data.preprocess.num_workers=1",
        "data.preprocess.min_notes=16",
        "tokenizer.vocab_size=800",
    ]


def small_eval(ckpt: Path, corpus: Path, data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Every part of the evaluation, shrunk to seconds on a CPU."""
    return [
        f"ckpt={ckpt}",
        f"out_dir={out_dir}",
        *data_overrides(corpus, data_dir),
        "samples_per_chunk=2",
        "baseline_samples_per_chunk=1",
        "batch_size=4",
        "num_requests=1",
        "infill_bars=2",
        "piece_bars=6",
        "track_bars=3",
        "max_bar_tokens=8",
        "num_threads=1",
        "listening.max_pieces=2",
        "listening.window_bars=8",
        "listening.seeds=[0]",
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic corpus, its store and BPE tokenizer, and a tiny random checkpoint folder."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = root / "corpus"
    for seed in range(10):
        write_synthetic_midi(corpus / f"piece_{seed}.mid", seed, 10)
    cfg = compose_config("evaluate", [f"ckpt={root / 'model'}", *data_overrides(corpus, root / "data")])
    train_tokenizer(cfg.data, cfg.tokenizer)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    torch.manual_seed(0)
    config = model_config_from_preset(
        "tiny",
        vocab_size=Vocab(tokenizer).size,
        max_seq_len=256,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )
    save_pretrained(MMMTransformer(config), tokenizer, root / "model")
    return root, corpus


@pytest.fixture(scope="module")
def evaluated(setup):
    root, corpus = setup
    threads = torch.get_num_threads()
    runs = [
        evaluate(compose_config("evaluate", small_eval(root / "model", corpus, root / "data", root / f"run{k}")))
        for k in (0, 1)
    ]
    return root, runs, threads


@pytest.mark.slow
def test_evaluate_gives_back_the_callers_torch_threads(evaluated):
    """It runs with `num_threads` (1 here) and restores the caller's count: a training later in
    the same process would otherwise compute with other reductions (resume tests compare bits)."""
    assert torch.get_num_threads() == evaluated[2]


def test_metrics_keys_and_sanity(evaluated):
    root, (metrics, _), _ = evaluated
    written = json.loads((root / "run0" / "metrics.json").read_text())
    assert written == metrics
    lik = metrics["likelihood"]
    for name in ("model", "bigram", "unigram"):
        for key in ("nats_per_token", "bits_per_token", "bits_per_note", "bits_per_bar"):
            assert lik[name][key] > 0, (name, key)
        assert lik[name]["bits_per_token"] == pytest.approx(lik[name]["nats_per_token"] / math.log(2), rel=1e-5)
        assert set(lik["augmented"][name]) >= {"bits_per_token", "bits_per_note"}
    # every model is scored on the same targets
    assert lik["model"]["tokens"] == lik["bigram"]["tokens"] == lik["unigram"]["tokens"] > 0
    assert lik["model"]["notes"] > 0 and lik["model"]["bars"] > 0
    ic = lik["infill_context"]
    assert ic["samples"] > 0 and ic["with_context"]["tokens"] == ic["without_context"]["tokens"] > 0
    # every condition scores the same fill ids
    assert {c["tokens"] for c in ic["conditions"].values()} == {ic["with_context"]["tokens"]}
    assert set(ic["ratio_to_real"]) == {"shifted", "other_piece", "alone"}
    listening = metrics["listening"]["rows"]
    original = listening["the original bars"]
    assert original["spans"] > 0 and original["onset_pitch_f1"] == original["onset_f1"] == 1.0
    assert original["notes_per_original"] == 1.0 and 0 <= original["consonance"] <= 1
    for name, row in listening.items():
        assert row["spans"] > 0, name
        assert 0 <= row["onset_f1"] <= 1 and row["onset_pitch_f1"] <= row["onset_pitch_class_f1"] <= 1, name
    kept = listening["model, track's range and monophony kept"]
    assert kept["in_range"] == 1.0  # the grammar keeps the range
    for task in ("all", "infill", "add_track"):
        s = metrics["structure"][task]
        assert s["outputs"] > 0
        assert s["decoded"] == s["exact_bars"] == s["untouched"] == 1.0, metrics["structure"]
    bar, track = metrics["controls"]["bar"], metrics["controls"]["track"]
    assert {"note_density", "polyphony_min", "polyphony_max", "pitch_classes", "note_durations"} <= set(bar)
    assert {"note_density_min", "repetition", "note_durations"} <= set(track)
    assert bar["note_density"]["with_control"]["n"] == 2  # one request x 2 bars
    assert set(bar["note_density"]["without_control"]) >= {"exact", "within_1", "spearman"}
    assert set(metrics["musical_stats"]) == {
        "pitch_class_entropy",
        "scale_consistency",
        "polyphony",
        "pitch_range",
        "empty_beat_rate",
        "groove_consistency",
    }
    # one uncontrolled infill: one real and one generated span (pitch statistics skip drums)
    assert (
        metrics["musical_stats"]["empty_beat_rate"]["n_real"]
        == metrics["musical_stats"]["empty_beat_rate"]["n_generated"]
        == 1
    )
    assert set(metrics["pitch_in_context_range"]) == {"generated_notes", "within_3_semitones"}


def test_pitch_in_range_counts_generated_notes_against_the_track_around_the_span():
    from symusic import Note, Track

    from mmm.evaluate.analysis import pitch_in_range

    def track(notes):
        t = Track("x", 0, False)
        for time, pitch in notes:
            t.notes.append(Note(time, 10, pitch, 64))
        return t

    real = track([(0, 60), (50, 67), (100, 99), (200, 64)])  # 99 sits inside the span: not context
    generated = track([(0, 60), (100, 56), (110, 57), (120, 70), (130, 71), (200, 99)])
    assert pitch_in_range(real, generated, 100, 200) == (2, 4)  # 57 and 70 in [57, 70]; 56 and 71 out
    assert pitch_in_range(None, generated, 100, 200) == (0, 0)
    assert pitch_in_range(track([(150, 60)]), generated, 100, 200) == (0, 0)  # no context note


@pytest.mark.slow
def test_listening_judges_a_score_that_is_not_in_a_store(setup):
    """Music from a file (outside any store) is judged as the store's pieces are: every pitched
    track's middle bars under every row; a lone track or a piece too short is refused."""
    from mmm import MMM
    from mmm.evaluate.listening import MODEL_ROWS, REAL_ROW, Listening, ListeningConfig
    from mmm.generation.request import SamplingConfig

    root, _ = setup
    mmm = MMM.from_pretrained(root / "model", num_threads=1)
    listening = Listening(mmm, None, [], ListeningConfig(None, 8, 2, [0]), SamplingConfig())
    score = synthetic_score(3, 10)
    alone = score.copy()
    alone.tracks = [alone.tracks[0]]
    assert not listening.judge(alone)
    assert not listening.judge(score, num_bars=3)  # 2 bars need one before and one after them
    assert all(t.spans == 0 for t in listening.tallies.values())
    assert listening.judge(score, num_bars=8)
    rows = listening.results(1)["rows"]
    judged = rows[REAL_ROW]["spans"]
    assert judged >= 3  # the pitched tracks with notes in bars 3-4
    assert rows[REAL_ROW]["onset_pitch_f1"] == 1.0
    for row in MODEL_ROWS:
        assert rows[row]["spans"] + len(listening.failures) >= judged


def test_two_runs_give_identical_metrics(evaluated):
    _, (a, b), _ = evaluated
    a, b = dict(a), dict(b)
    assert a.pop("timings") and b.pop("timings")
    assert a == b


def test_report_and_plots_are_written(evaluated):
    root, (metrics, _), _ = evaluated
    report = (root / "run0" / "report.md").read_text()
    for heading in ("## Likelihood", "## Structure", "## Attribute-control adherence", "## Musical statistics"):
        assert heading in report
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert {"likelihood.png", "controls_accuracy.png", "musical_stats.png"} <= set(pngs)
    for png in pngs:
        assert (root / "run0" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| bigram |" in report and "| unigram |" in report


def test_vocabulary_mismatch_is_a_clear_error(setup, tmp_path):
    """A store preprocessed (here by evaluate itself: it is missing) with another base
    vocabulary than the checkpoint's is refused, naming both and the setting that differs."""
    root, corpus = setup
    ours = load_tokenizer(root / "model" / "tokenizer.json").config.num_velocities
    cfg = compose_config(
        "evaluate",
        small_eval(root / "model", corpus, tmp_path / "data", tmp_path / "out", "tokenizer.params.num_velocities=16"),
    )
    with pytest.raises(ValueError, match="vocabulary mismatch") as error:
        evaluate(cfg)
    assert f"tokenizer.params.num_velocities: 16 -> {ours}" in str(error.value)  # store -> checkpoint
    assert (Path(cfg.data.store) / "manifest.json").is_file()  # it was preprocessed first
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_config_keys_are_commented_and_checked(setup, tmp_path):
    root, corpus = setup
    lines = (CONFIGS / "evaluate.yaml").read_text().splitlines()
    top = [line for line in lines if re.match(r"^[a-z_]+:", line) and not line.startswith(("defaults", "hydra"))]
    for line in top:
        assert "#" in line or line.rstrip().endswith(":"), f"evaluate.yaml: no comment on {line!r}"
    cfg = compose_config("evaluate", small_eval(root / "model", corpus, root / "data", tmp_path, "+num_request=3"))
    with pytest.raises(ValueError, match=r"evaluate\.num_request \(did you mean evaluate\.num_requests\?\)"):
        check_config(cfg)
    cfg = compose_config("evaluate", small_eval(root / "model", corpus, root / "data", tmp_path, "sampling.top_p=2"))
    with pytest.raises(ValueError, match=r"evaluate\.sampling\.top_p must be in \(0, 1\]"):
        check_config(cfg)
    cfg = compose_config("evaluate", small_eval(root / "model", corpus, root / "data", tmp_path, "infill_bars=0"))
    with pytest.raises(ValueError, match="infill_bars"):
        check_config(cfg)


@pytest.mark.subprocess
def test_cli_shows_the_options():
    out = subprocess.run(
        [sys.executable, "-m", "mmm.evaluate", "--cfg", "job", "ckpt=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for key in ("num_requests:", "samples_per_chunk:", "kn_discount:", "sampling:"):
        assert key in out


# -- listening measures, on notes written by hand ----------------------------------------------
def notes(*rows):
    """Note arrays from (time, duration, pitch) rows."""
    array = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return {"time": array[:, 0], "duration": array[:, 1], "pitch": array[:, 2], "velocity": np.full(len(array), 64)}


def test_consonance_counts_pairs_with_the_notes_sounding_then():
    from mmm.evaluate.listening import consonance

    generated = notes((0, 10, 60), (10, 10, 66), (40, 5, 60))
    other = notes((0, 20, 64), (20, 10, 48))  # E4 under the first two, nothing at 40
    # C4/E4: a third (consonant); F#4/E4: a second (dissonant); at 40 nothing sounds
    assert consonance(generated, [other]) == (1, 2)
    assert consonance(generated, [other, notes((0, 50, 48))]) == (1 + 2, 2 + 3)  # C3 under all three: C, F#, C


def test_the_naive_baselines():
    from mmm.evaluate.listening import copy_previous, most_common_pitch, other_track_moved

    ticks = [0, 100, 200, 300, 400]
    own = notes((0, 50, 60), (50, 50, 62), (100, 100, 64), (200, 100, 65), (350, 50, 67))
    copied = copy_previous(own, ticks, 2, 4)  # bars 0-1 into bars 2-3
    assert copied["time"].tolist() == [200, 250, 300] and copied["pitch"].tolist() == [60, 62, 64]
    first = copy_previous(own, ticks, 0, 1)  # nothing before bar 0: the bar after the span
    assert first["time"].tolist() == [0] and first["pitch"].tolist() == [64]
    bass = notes((200, 100, 41), (300, 100, 43))
    moved = other_track_moved(own, [bass], 200, 400)  # the bass an octave up... two: near 62
    assert moved["pitch"].tolist() == [65, 67] and moved["time"].tolist() == [200, 300]
    common = most_common_pitch(notes((0, 10, 60), (10, 10, 60), (20, 10, 62), (200, 10, 70)), [bass], 200, 400)
    assert common["time"].tolist() == [200, 300] and common["pitch"].tolist() == [60, 60]
    assert common["duration"].tolist() == [100, 100]


def test_a_tally_pools_f1_over_spans():
    from mmm.evaluate.listening import Tally

    tally = Tally()
    original = notes((0, 10, 60), (10, 10, 62))
    tally.add(notes((0, 10, 60), (10, 10, 74)), original, [], (60, 62))  # onset F1 1, onset+pitch 1/2, class 1
    summary = tally.summary()
    assert summary["onset_f1"] == 1.0 and summary["onset_pitch_f1"] == 0.5 and summary["onset_pitch_class_f1"] == 1.0
    assert summary["in_range"] == 0.5 and summary["notes_per_original"] == 1.0
