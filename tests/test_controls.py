"""`mmm.controls.table.Controls`, the one table between attribute-control values and AC token ids:
values -> ids -> values and ids -> values -> ids on the tokenizer of `configs/tokenizer/mmm.yaml`."""

from __future__ import annotations

from itertools import combinations

import pytest
from conftest import synthetic_score
from miditok.utils import get_bars_ticks

from mmm.controls.measure import bar_controls, track_controls
from mmm.controls.table import Controls


def encode(controls: Controls, level: str, name: str, value) -> list[int]:
    return controls.bar_ids({name: value}, [0])[0] if level == "bar" else controls.track_ids({name: value})


def every_value(ctl) -> list:
    """Each value a control takes: every bin, and for lists a few subsets (durations: none too)."""
    if ctl.kind in ("int", "float"):
        return sorted(ctl.values)
    items = sorted(ctl.values) if ctl.kind == "set" else list(ctl.values)
    subsets = [[x] for x in items] + [list(c) for c in combinations(items, 2)] + [items]
    return subsets + ([[]] if ctl.kind == "durations" else [])


@pytest.mark.parametrize("level", ["bar", "track"])
def test_values_to_ids_to_values(tokenizer, vocab, level):
    controls = Controls(tokenizer, vocab)
    table = controls.table(level)
    assert table, f"the tokenizer has no {level}-level control"
    checked = 0
    for name, ctl in table.items():
        for value in every_value(ctl):
            ids = encode(controls, level, name, value)
            expected = frozenset(value) if isinstance(value, list) else value
            assert controls.values(ids) == {name: expected}, (name, value, ids)
            checked += 1
    assert checked > 20


def test_ids_computed_on_a_score_decode_to_values_that_encode_to_them(tokenizer, vocab):
    """What evaluation and the server measure (miditok's ids) reads back as values that give
    exactly those ids again."""
    controls = Controls(tokenizer, vocab)
    score = tokenizer.preprocess_score(synthetic_score(4, 8))
    ticks = list(get_bars_ticks(score))
    bars = tracks = 0
    for track in score.tracks:
        for families in bar_controls(tokenizer, vocab, track, score.tpq, ticks):
            ids = [i for family in families for i in family]
            if ids:
                values = controls.values(ids)
                assert set(values) == set(controls.bar), values  # every family measured on a bar with notes
                assert controls.bar_ids(values, [0])[0] == ids
                bars += 1
        ids = [i for family in track_controls(tokenizer, vocab, track, score.tpq, ticks) for i in family]
        if ids:
            assert controls.track_ids(controls.values(ids)) == ids
            tracks += 1
    assert bars > 10 and tracks > 1


def test_decoding_skips_other_ids_and_values_never_seen(tokenizer, vocab):
    full = Controls(tokenizer, vocab)
    density = full.bar["note_density"]
    kept = sorted(density.values)[:3]
    seen = [density.values[v] for v in kept]
    controls = Controls(tokenizer, vocab, seen=seen)
    assert list(controls.bar) == ["note_density"] and not controls.track
    assert controls.bins("bar", "note_density") == kept
    for value, i in density.values.items():
        assert controls.values([vocab.bar, i]) == ({"note_density": value} if value in kept else {})
    assert full.bins("bar", "note_durations") is None
    assert full.empty_value("bar", "note_density") == 0 and full.empty_value("bar", "polyphony_min") is None
