"""The generation grammar accepts what the model is trained on.

Every training sample's generated part (the FillBar section of an infill, the bars of a new
track) is replayed id by id through `BarGrammar`, with the plan inference would give it (the
bars' time signatures, their bar ACs, the end token). A layout the grammar refuses is one
the model learns but can never produce. Thousands of samples: synthetic pieces always, the
shared real files when $MMM_TEST_MIDI is set.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import numpy as np
import pytest
from conftest import chunk_dict, preprocess_settings, sequences_config, synthetic_score

from mmm.data.chunks import tokenize_score
from mmm.data.sequences import SequenceBuilder, generated_start
from mmm.generation.grammar import BarGrammar, BarPlan, GrammarTables
from mmm.tokenizer import Vocab


def generated_part(ids: np.ndarray, vocab: Vocab) -> tuple[list[int], BarPlan]:
    """The ids the model writes at inference for this sample, and the grammar plan for them."""
    start = generated_start(ids, vocab)
    infill = vocab.fill_start in ids
    end_id = vocab.fill_end if infill else vocab.track_end
    if infill:
        target_start = max(i for i in np.flatnonzero(ids == vocab.track_start) if vocab.infill_bar in ids[i:])
    else:
        target_start = int(np.flatnonzero(ids == vocab.track_start)[-1])
        while vocab.is_ac_model[ids[start]]:  # track ACs are prompt, not generated
            start += 1
    program = vocab.token_of[vocab.model_to_base[ids[target_start + 1]][0]]
    generated = ids[start : list(ids).index(end_id, start) + 1].tolist()
    time_sigs: list[int] = []
    bar_acs: list[list[int]] = []
    for i in generated[:-1]:
        bases = vocab.model_to_base[i]
        if bases[0] == vocab.bar:
            bar_acs.append([])
            time_sigs.append(next(b for b in bases if vocab.is_time_sig[b]) if len(bases) > 1 else -1)
        elif time_sigs and time_sigs[-1] == -1:
            time_sigs[-1] = bases[0]
        if vocab.is_ac_model[i]:
            bar_acs[-1].append(i)
    return generated, BarPlan(time_sigs, bar_acs, end_id, program == "Program_-1")


def replay(ids: np.ndarray, vocab: Vocab, tables: GrammarTables) -> str:
    generated, plan = generated_part(ids, vocab)
    grammar = BarGrammar(tables, plan, budget=len(generated) + 16)
    for _k, i in enumerate(generated):
        grammar.advance(i)  # raises when the grammar refuses the id
    assert grammar.done and grammar.starved_bars() == []
    return "infill" if plan.end_id == vocab.fill_end else "track"


def run_samples(chunks: list[dict], vocab: Vocab, count: int, seed: int) -> Counter:
    builder = SequenceBuilder(vocab, sequences_config(), max_seq_len=1024)
    tables = GrammarTables.of(vocab)
    rng = random.Random(seed)
    seen = Counter()
    for n in range(count):
        chunk = rng.choice(chunks)
        spec = builder.draw_spec(chunk, rng)
        ids, _ = builder.build(chunk, spec, rng)
        try:
            seen[replay(ids, vocab, tables)] += 1
        except ValueError as err:
            tokens = [vocab.token_of[b] for b in vocab.to_base(generated_part(ids, vocab)[0][:12])]
            pytest.fail(f"sample {n} ({spec}): the grammar refuses its generated part: {err}\nstarts {tokens}")
        seen["with_bar_acs"] += bool(spec.bar_acs and spec.ac_bars)
    return seen


@pytest.mark.slow
def test_grammar_accepts_every_synthetic_training_sample(bpe_vocab):
    vocab = bpe_vocab
    settings = preprocess_settings(min_notes=8, chunk_max_tokens=900, chunk_max_track_tokens=400)
    chunks = [
        chunk_dict(c)
        for seed in range(12)
        for c in tokenize_score(synthetic_score(seed, 16), vocab.tokenizer, vocab, settings)
    ]
    seen = run_samples(chunks, vocab, 1500, seed=0)
    assert seen["infill"] > 900 and seen["track"] > 250 and seen["with_bar_acs"] > 700, seen


@pytest.mark.slow
def test_grammar_accepts_every_real_training_sample(real_files, bpe_vocab):
    vocab = bpe_vocab
    settings = preprocess_settings()
    chunks = []
    for path in real_files:
        from symusic import Score

        try:
            chunks += [chunk_dict(c) for c in tokenize_score(Score(path), vocab.tokenizer, vocab, settings)]
        except Exception:  # files preprocessing rejects are not training data
            continue
    assert len(chunks) > 100
    seen = run_samples(chunks, vocab, 2000, seed=1)
    assert seen["infill"] > 1200 and seen["track"] > 300, seen


@pytest.mark.skipif(not os.environ.get("MMM_TEST_STORE"), reason="MMM_TEST_STORE (a token store folder) is not set")
def test_grammar_accepts_every_training_sample_of_a_store():
    """On a real store (e.g. the embedded corpus's, `data/music21_all/store`), with its own BPE
    tokenizer (`MMM_TEST_TOKENIZER`, by default the only tokenizer file beside the store)."""
    from pathlib import Path

    from mmm.data.store import Store
    from mmm.tokenizer import load_tokenizer

    store_dir = Path(os.environ["MMM_TEST_STORE"])
    tokenizer_file = os.environ.get("MMM_TEST_TOKENIZER") or str(next(store_dir.parent.glob("tokenizer*.json")))
    vocab = Vocab(load_tokenizer(tokenizer_file))
    store = Store(store_dir, "train")
    chunks = [store[i] for i in sorted(random.Random(0).sample(range(len(store)), min(len(store), 600)))]
    seen = run_samples(chunks, vocab, 3000, seed=2)
    print(f"{store_dir}: {seen}")
    assert seen["infill"] + seen["track"] == 3000
