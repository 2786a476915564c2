"""The alignment signals: musical time and target flags of a sequence (`mmm.data.timing`), and the
model that reads them (`ModelConfig.time_rope`, `target_embedding`, `fill_program`, `target_last`) through every
path: training rows packed or padded, the KV cache, the static decode step (eager and compiled),
the generation API."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import chunk_dict, sequences_config, synthetic_score, tiny_model

from mmm.data.datamodule import collate, pack
from mmm.data.sequences import IGNORE_INDEX, SequenceBuilder, encode_sample, generated_start
from mmm.data.timing import Clock, TimingTables, sequence_timing, target_flags
from mmm.generation.api import MMM
from mmm.generation.compiled_step import StaticDecoder, enable_compile
from mmm.generation.request import Request, SamplingConfig
from mmm.model import MMMTransformer, ModelConfig, next_token_nll
from mmm.model.hf import to_hf_config

SIGNALS = {"time_rope": "onset", "target_embedding": True}


def reference_times(ids, vocab, stride: int) -> list[int]:
    """The musical time of each model id, from its base tokens by name (independent of the
    clock's tables): bars counted from each Track_Start, the fill section starting at the first
    Infill_Bar's bar, the onset the last Position seen in the bar."""
    bar, onset, first_infill, out = -1, 0, None, []
    for i in ids:
        for base in vocab.model_to_base[i]:
            token = vocab.token_of[base]
            if token == "Track_Start":
                bar, onset = -1, 0
            elif token == "FillBar_Start":
                bar, onset = first_infill - 1, 0
            elif token in ("Bar_None", "Infill_Bar"):
                bar, onset = bar + 1, 0
                if token == "Infill_Bar" and first_infill is None:
                    first_infill = bar
            elif token.startswith("Position_"):
                onset = int(token.split("_")[1])
        out.append(max(bar, 0) * stride + onset)
    return out


def infill_sample(chunks, vocab, seed: int, **overrides):
    """An infill sample of a multi-track synthetic chunk with every track kept."""
    builder = SequenceBuilder(vocab, sequences_config(infill_ratio=1.0, all_tracks_ratio=1.0, **overrides), 10**6)
    chunk = next(chunk_dict(c) for _, _, cs in chunks for c in cs if len(c.programs) >= 3)
    rng = random.Random(seed)
    spec = builder.draw_spec(chunk, rng)
    ids, labels = builder.build(chunk, spec, rng)
    return ids, labels, spec


@pytest.mark.parametrize("bpe", [False, True])
def test_notes_sounding_together_in_other_tracks_share_a_time(synthetic_chunks, vocab, bpe_vocab, bpe):
    v = bpe_vocab if bpe else vocab
    for seed in range(4):
        ids, _, spec = infill_sample(synthetic_chunks, v, seed)
        times, flags, clock = sequence_timing(ids, v)
        stride = TimingTables.of(v).stride
        assert times.tolist() == reference_times(ids, v, stride)
        assert stride == 12 * 12  # 12/8 bars are the vocabulary's longest: 12 eighths x 12 positions
        # Every track's k-th bar opens at the same time, k * stride.
        opens = [k for k, i in enumerate(ids) if v.model_to_base[i][0] in (v.bar, v.infill_bar)]
        starts, ends = np.flatnonzero(ids == v.track_start), np.flatnonzero(ids == v.track_end)
        for start, end in zip(starts, ends):
            bar_opens = [k for k in opens if start < k < end]
            assert [times[k] for k in bar_opens] == [b * stride for b in range(len(bar_opens))]
        # The fill section's bars are those its Infill_Bars stand for.
        infills = [k for k in np.flatnonzero(ids == v.infill_bar)]
        fill = int(np.flatnonzero(ids == v.fill_start)[0])
        fill_opens = [k for k in opens if k > fill]
        assert [times[k] for k in fill_opens] == [times[k] for k in infills]
        assert len(infills) == spec.span[1] - spec.span[0]
        # Flags: the target's block (the one holding Infill_Bar) and the fill section, nothing else.
        target_block = np.cumsum(ids == v.track_start) == np.cumsum(ids == v.track_start)[infills[0]]
        assert flags.tolist() == (target_block | (np.arange(len(ids)) >= fill)).astype(int).tolist()


def test_the_clock_of_a_prompt_times_what_follows_it(synthetic_chunks, bpe_vocab):
    """Generation times each sampled id with the clock left by the prompt: the same times as the
    whole sequence read at once."""
    ids, _, _ = infill_sample(synthetic_chunks, bpe_vocab, 1)
    split = generated_start(ids, bpe_vocab)
    whole, _, _ = sequence_timing(ids, bpe_vocab)
    prompt_times, _, clock = sequence_timing(ids[:split], bpe_vocab)
    rest = [clock.advance(int(i)) for i in ids[split:]]
    assert prompt_times.tolist() + rest == whole.tolist()
    bars = sequence_timing(ids, bpe_vocab, "bar")[0]
    assert bars.tolist() == (whole // TimingTables.of(bpe_vocab).stride).tolist()
    with pytest.raises(ValueError, match="bar"):
        Clock(TimingTables.of(bpe_vocab), "beat")


def test_a_new_track_sample_flags_its_last_track(synthetic_chunks, vocab):
    builder = SequenceBuilder(vocab, sequences_config(infill_ratio=0.0), 10**6)
    chunk = chunk_dict(synthetic_chunks[0][2][0])
    ids, _ = builder(chunk, random.Random(0))
    flags = target_flags(ids, vocab)
    last = int(np.flatnonzero(ids == vocab.track_start)[-1])
    assert flags[last:].all() and not flags[:last].any()


def test_fill_program_heads_the_fill_section_and_is_never_a_target(synthetic_chunks, vocab):
    for seed in range(3):
        ids, labels, spec = infill_sample(synthetic_chunks, vocab, seed)
        builder = SequenceBuilder(vocab, sequences_config(infill_ratio=1.0, all_tracks_ratio=1.0), 10**6, True)
        chunk = next(chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs if len(c.programs) >= 3)
        rng = random.Random(seed)
        spec = builder.draw_spec(chunk, rng)
        ids_p, labels_p = builder.build(chunk, spec, rng)
        fill = int(np.flatnonzero(ids_p == vocab.fill_start)[0])
        assert ids_p[fill + 1] == vocab.program_id[chunk["programs"][spec.target]]
        assert labels_p[fill + 1] == IGNORE_INDEX and generated_start(ids_p, vocab) == fill + 2
        # The same sample without it: one id fewer, the rest identical.
        assert np.array_equal(np.delete(ids_p, fill + 1), ids) and np.array_equal(np.delete(labels_p, fill + 1), labels)


def _block_with_infill_is_last(ids, vocab) -> bool:
    """Whether the track block that holds the Infill_Bars is the last one before the fill section."""
    fill = int(np.flatnonzero(ids == vocab.fill_start)[0])
    starts = np.flatnonzero(ids[:fill] == vocab.track_start)
    infills = np.flatnonzero(ids[:fill] == vocab.infill_bar)
    return len(infills) > 0 and bool((infills > starts[-1]).all())


def test_target_last_lists_the_target_after_every_other_track(synthetic_chunks, vocab):
    chunk = next(chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs if len(c.programs) >= 3)
    cfg = sequences_config(infill_ratio=1.0, all_tracks_ratio=1.0)
    last = SequenceBuilder(vocab, cfg, 10**6, target_last=True)
    shuffled = SequenceBuilder(vocab, cfg, 10**6)
    ends = []
    for seed in range(12):
        spec = last.draw_spec(chunk, random.Random(seed))
        assert spec.tracks[-1] == spec.target and sorted(spec.tracks) == list(range(len(chunk["programs"])))
        ids, _ = last.build(chunk, spec, random.Random(seed))
        assert _block_with_infill_is_last(ids, vocab)
        other = shuffled.draw_spec(chunk, random.Random(seed))
        ends.append(other.tracks[-1] == other.target)
    assert not all(ends)  # without it, the target sits anywhere


def test_the_api_prompt_lists_the_target_last_for_a_target_last_model(bpe_tokenizer, bpe_vocab):
    score = synthetic_score(3, 8)
    for target_last in (False, True):
        model = tiny_model(bpe_vocab.size, max_seq_len=1024, target_last=target_last)
        mmm = MMM(model, bpe_tokenizer, max_bar_tokens=24, num_threads=1)
        step = mmm.run(Request("infill", track=0, bars=(2, 4), seed=0), score).report.steps[0]
        assert _block_with_infill_is_last(np.array(step.prompt), bpe_vocab) == target_last


def test_all_tracks_ratio_keeps_every_track(synthetic_chunks, vocab):
    chunk = next(chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs if len(c.programs) >= 3)
    always = SequenceBuilder(vocab, sequences_config(all_tracks_ratio=1.0), 10**6)
    never = SequenceBuilder(vocab, sequences_config(), 10**6)
    kept = [len(always.draw_spec(chunk, random.Random(s)).tracks) for s in range(20)]
    assert kept == [len(chunk["programs"])] * 20
    assert min(len(never.draw_spec(chunk, random.Random(s)).tracks) for s in range(20)) < len(chunk["programs"])


# --- the model ----------------------------------------------------------------------------
def signal_model(vocab_size: int = 60, seed: int = 0, **signals) -> MMMTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=96,
        attention="sdpa",
        **{**SIGNALS, **signals},
    )
    model = MMMTransformer(config).eval()
    if config.target_embedding:
        with torch.no_grad():  # trained, it is not zero: make the flags matter
            model.target_embedding.normal_(0, 0.5)
    return model


def random_inputs(B: int, T: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (B, T), generator=gen)
    times = torch.cumsum(torch.randint(0, 30, (B, T), generator=gen), 1)
    flags = (torch.rand(B, T, generator=gen) < 0.4).long()
    return ids, times, flags


def test_signals_off_leave_the_model_as_it_was():
    """Off (the default), no parameter is added and the rotary tables are the plain ones: the
    model stays the Mistral-equal model of tests/test_model.py."""
    plain = signal_model(time_rope=None, target_embedding=False)
    assert "target_embedding" not in dict(plain.named_parameters())
    ids, times, flags = random_inputs(2, 20)
    with torch.no_grad():
        assert torch.equal(plain(ids), plain(ids, times=times, flags=flags))


def test_time_rope_turns_half_the_pairs_with_the_time():
    """With the time equal to the position and the same base, the mixed rotary is the plain one;
    with other times the logits change (so the times are read)."""
    base = signal_model(time_rope=None, target_embedding=False)
    with torch.no_grad():  # peaked attention (random init attends almost uniformly: positions barely count)
        for layer in base.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    timed = signal_model(time_rope="onset", target_embedding=False, time_rope_theta=base.config.rope_theta)
    timed.load_state_dict(base.state_dict())
    ids, times, _ = random_inputs(2, 20)
    positions = torch.arange(20).expand(2, 20)
    with torch.no_grad():
        assert torch.allclose(timed(ids, times=positions), base(ids), atol=1e-5)
        assert (timed(ids, times=times) - base(ids)).abs().max() > 1e-2


def test_the_target_embedding_marks_only_flagged_tokens():
    model = signal_model(time_rope=None)
    ids, times, flags = random_inputs(1, 12)
    with torch.no_grad():
        h = model.embed_tokens(ids)
        marked = h + flags[..., None] * model.target_embedding
        assert torch.equal(marked[flags == 0], h[flags == 0]) and not torch.equal(marked[flags == 1], h[flags == 1])
        zero = torch.zeros_like(flags)
        assert not torch.allclose(model(ids, flags=flags), model(ids, flags=zero))


def test_missing_times_or_flags_are_refused_and_mistral_cannot_hold_it():
    model = signal_model()
    ids, times, flags = random_inputs(1, 8)
    with pytest.raises(ValueError, match="times"):
        model(ids, flags=flags)
    with pytest.raises(ValueError, match="flags"):
        model(ids, times=times)
    with pytest.raises(ValueError, match="no equivalent"):
        to_hf_config(model.config)
    with pytest.raises(ValueError, match="time_rope"):
        signal_model(time_rope="beat")


def test_packed_rows_carry_the_signals():
    """Samples packed end to end get the losses and gradients they get in padded rows."""
    model = signal_model()
    rng = np.random.default_rng(0)
    batch = []
    for i, n in enumerate([30, 12, 25, 18]):
        ids = rng.integers(1, 60, n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE_INDEX
        batch.append(
            {
                "input_ids": ids,
                "labels": labels,
                "num_notes": n,
                "index": i,
                "times": np.cumsum(rng.integers(0, 30, n)),
                "flags": (rng.random(n) < 0.5).astype(np.int64),
            }
        )
    losses = []
    for rows in (collate(batch, 0), pack(batch, 0)):
        model.zero_grad()
        nll = next_token_nll(
            model,
            rows["input_ids"],
            rows["labels"],
            IGNORE_INDEX,
            reduction="sum",
            doc_ids=rows.get("doc_ids"),
            times=rows["times"],
            flags=rows["flags"],
        )
        nll.backward()
        losses.append((nll.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, g1), (packed, g2) = losses
    assert abs(padded - packed) < 1e-3 * abs(padded)
    assert all(torch.allclose(g1[n], g2[n], atol=1e-4) for n in g1)


@pytest.mark.slow  # a CPU compile of the decode step
def test_cache_and_decode_step_read_the_signals():
    """Prefill + cached steps, the eager static step and the compiled one give the logits of the
    full forward, with each step's own time (the rows' times differ)."""
    model = signal_model()
    B, P, steps = 2, 10, 12
    ids, times, _ = random_inputs(B, P + steps, seed=3)
    ids[1, :P], times[1, :P] = ids[0, :P], times[0, :P]  # one prompt, two rows after it
    flags = torch.ones_like(ids)
    flags[:, :3] = 0
    with torch.no_grad():
        full = model(ids, times=times, flags=flags)
    eager = StaticDecoder(model, B, P + steps, compile=False)
    enable_compile(model)
    compiled = StaticDecoder(model, B, P + steps, compile=True)
    cache = model.new_cache(B, max_len=P + steps)
    with torch.inference_mode():
        got = [model(ids[:, :P], cache, times=times[:, :P], flags=flags[:, :P])[:, -1]]
        for decoder in (eager, compiled):
            decoder.prefill(ids[0, :P].tolist(), times[:1, :P], flags[:1, :P])
        outs = {"eager": [], "compiled": []}
        for s in range(P, P + steps - 1):
            got.append(model(ids[:, s : s + 1], cache, times=times[:, s : s + 1], flags=flags[:, s : s + 1])[:, -1])
            outs["eager"].append(eager.step(ids[:, s], times[:, s]))
            outs["compiled"].append(compiled.step(ids[:, s], times[:, s]))
    expected = full[:, P - 1 : P + steps - 1]
    assert torch.allclose(torch.stack(got, 1), expected, atol=1e-4)
    for name, out in outs.items():
        assert torch.allclose(torch.stack(out, 1), expected[:, 1:], atol=1e-4), name


@pytest.mark.slow  # a CPU compile of the decode step
def test_the_api_generates_with_a_signals_model(bpe_tokenizer, bpe_vocab):
    """An infill and a new track through `MMM` with every signal on: well-formed output, the
    prompt closed by `FillBar_Start Program`, and the compiled decode choosing the eager ids."""
    model = tiny_model(bpe_vocab.size, max_seq_len=1024, time_rope="onset", target_embedding=True, fill_program=True)
    with torch.no_grad():
        model.target_embedding.normal_(0, 0.5)
    mmm = MMM(model, bpe_tokenizer, max_bar_tokens=24, num_threads=1)
    score = synthetic_score(2, 10)
    greedy = Request("infill", track=1, bars=(3, 6), seed=0, sampling=SamplingConfig(temperature=0))
    eager = mmm.run(greedy, score)
    step = eager.report.steps[0]
    assert step.prompt[-2:] == [bpe_vocab.fill_start, bpe_vocab.program_id[score.tracks[1].program]]
    assert [t for t in step.tokens[0] if t == bpe_vocab.bar] and step.tokens[0][-1] == bpe_vocab.fill_end
    enable_compile(mmm.model)
    compiled = mmm.run(greedy, score)
    assert compiled.report.steps[0].tokens == step.tokens
    added = mmm.run(Request("add_track", program=33, seed=1), score)
    assert len(added.scores[0].tracks) == len(score.tracks) + 1


def test_encode_sample_ignores_only_a_program_right_after_fillbar_start(vocab):
    program = vocab.program_id[0]
    words = [[vocab.bos], [vocab.track_start], [program], [vocab.track_end], [vocab.fill_start], [program]]
    _, labels = encode_sample(words, vocab)
    assert labels[2] == program and labels[5] == IGNORE_INDEX
