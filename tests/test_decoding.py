"""The static-shape decode step (`mmm.generation.compiled_step`) against the model's own forward.

The eager step is checked cheaply over many cases (no window, a window the ring wraps past, a
prompt longer than the window, several rows); the compiled step once, on one tiny model whose
graph all compiled tests share (a CPU compile takes tens of seconds): its logits over a decode
that wraps the sliding window, and greedy generation with grammars whose rows end at different
steps, id for id against the eager loop.
"""

from __future__ import annotations

import pytest
import torch

from mmm.generation.compiled_step import StaticDecoder, enable_compile, is_compile_enabled, num_slots
from mmm.generation.grammar import BarGrammar, BarPlan, GrammarTables
from mmm.generation.request import SamplingConfig
from mmm.generation.sampling import generate_ids
from mmm.model import MMMTransformer, ModelConfig


def small_model(vocab_size: int, window: int | None, seed: int = 0) -> MMMTransformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=96,
        sliding_window=window,
        attention="sdpa",
    )
    return MMMTransformer(config).eval()


def max_logit_gap(model: MMMTransformer, decoder: StaticDecoder, prompt: list[int], steps: int, seed: int = 0) -> float:
    """Largest |logit difference| between the decoder and the model's KV-cache forward over a
    prefill and `steps` decode steps of random ids (different per row)."""
    B = decoder.batch_size
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(B, max_len=decoder.total)
    with torch.inference_mode():
        expected = model(torch.tensor([prompt] * B), cache, last_only=True)[:, -1]
        gap = (decoder.prefill(prompt) - expected).abs().max().item()
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (B,), generator=gen)
            expected = model(ids[:, None], cache)[:, -1]
            gap = max(gap, (decoder.step(ids) - expected).abs().max().item())
    return gap


@pytest.mark.parametrize(
    "window, prompt_len, batch", [(None, 10, 1), (None, 10, 3), (8, 5, 2), (8, 20, 2), (200, 10, 1)]
)
def test_eager_static_step_matches_forward(window, prompt_len, batch):
    model = small_model(120, window)
    total = prompt_len + 40
    decoder = StaticDecoder(model, batch, total, compile=False)
    assert decoder.slots == (total if window is None else min(total, window))
    assert max_logit_gap(model, decoder, list(range(3, 3 + prompt_len)), 40) < 1e-4


def test_ring_slots_matter():
    """The check above can fail: a ring one slot too short attends one token too few."""
    model = small_model(120, 8)
    decoder = StaticDecoder(model, 1, 40, compile=False)
    model.config.sliding_window = 9  # the forward now keeps 9 tokens, the decoder's ring 8
    try:
        assert max_logit_gap(model, decoder, list(range(3, 8)), 20) > 1e-3
    finally:
        model.config.sliding_window = 8


def test_static_decoder_rejects_bad_use():
    model = small_model(120, None)
    with pytest.raises(ValueError, match="batch_size"):
        StaticDecoder(model, 0, 10, compile=False)
    with pytest.raises(ValueError, match="model context"):
        StaticDecoder(model, 1, 97, compile=False)
    decoder = StaticDecoder(model, 2, 6, compile=False)
    with pytest.raises(ValueError, match="prompt"):
        decoder.prefill(list(range(6)))
    with torch.inference_mode():
        decoder.prefill(list(range(4)))
        with pytest.raises(ValueError, match="shape"):
            decoder.step(torch.zeros(3, dtype=torch.long))
        decoder.step(torch.zeros(2, dtype=torch.long))
        decoder.step(torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="full"):
            decoder.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="compile"):
        generate_ids(model, [1, 2], 3, compile="yes")
    assert num_slots(small_model(120, 8), 50) == 8 and num_slots(model, 50) == 50


# -- compiled: one model, one graph (batch 2, 8 ring slots) for every test below --------------
@pytest.fixture(scope="module")
def compiled(bpe_vocab) -> MMMTransformer:
    model = small_model(bpe_vocab.size, window=8, seed=1)
    assert not is_compile_enabled(model)
    enable_compile(model)
    return model


@pytest.mark.slow
def test_compiled_step_matches_forward_past_the_window(compiled):
    decoder = StaticDecoder(compiled, 2, 40, compile=True)
    assert max_logit_gap(compiled, decoder, list(range(3, 8)), 25) < 1e-4


def test_compiled_step_is_not_recompiled_as_the_cache_fills(compiled):
    """The step attends over the slots written so far, a count that grows every step: it must be
    a symbol of the one graph, not a recompile per token."""
    decoder = StaticDecoder(compiled, 2, 40, compile=True)
    ids = torch.zeros(2, dtype=torch.long)
    with torch.inference_mode():  # as generate_ids decodes
        decoder.prefill([3, 4])
        decoder.step(ids)  # compiles, unless an earlier test already did
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(12):  # 4 to 8 written slots, then the ring is full
                decoder.step(ids)


def test_greedy_generation_same_ids_compiled_or_not(compiled, bpe_vocab):
    tables = GrammarTables.of(bpe_vocab)
    ts = [i for i in range(bpe_vocab.base_size) if bpe_vocab.is_time_sig[i]][:3]
    plans = [BarPlan(ts[:1], [[]], bpe_vocab.fill_end, False), BarPlan(ts, [[], [], []], bpe_vocab.fill_end, False)]
    prompt = list(range(5, 25))
    budget = 60

    def run(compile: bool | None):
        grammars = [BarGrammar(tables, plan, budget) for plan in plans]
        return generate_ids(
            compiled, prompt, budget, grammars, 2, SamplingConfig(temperature=0.0), num_threads=1, compile=compile
        )

    eager, fast, default = run(False), run(True), run(None)
    assert fast.ids == eager.ids and default.ids == eager.ids  # None: this model is compile-enabled
    # The random model writes notes until the budget closes both rows at once. With every logit
    # 0, greedy takes the lowest allowed id, which closes bars as early as the grammar allows:
    # the 1-bar row ends first and the static batch carries it, finished, to the end.
    head = compiled.lm_head.weight.detach().clone()
    with torch.no_grad():
        compiled.lm_head.weight.zero_()
    try:
        eager, fast = run(False), run(True)
    finally:
        with torch.no_grad():
            compiled.lm_head.weight.copy_(head)
    assert len(eager.ids[0]) < len(eager.ids[1])
    assert fast.ids == eager.ids and fast.steps == eager.steps


def test_mmm_compile_switch(tokenizer, vocab):
    """`MMM(..., compile=True)` (and `python -m mmm.serve compile=true`) gives the model its
    compiled step; compiling itself waits for the first generation."""
    from conftest import tiny_model

    from mmm.generation.api import MMM

    eager = MMM(tiny_model(vocab.size), tokenizer)
    assert not is_compile_enabled(eager.model)
    compiled = MMM(tiny_model(vocab.size), tokenizer, compile=True)
    assert is_compile_enabled(compiled.model)
    with pytest.raises(ValueError, match="compile must be true or false"):
        MMM(tiny_model(vocab.size), tokenizer, compile="yes")
