"""The sampling loop: prefill once, N variations in one batch, grammar mask, KV cache.

`generate_ids` prefills the prompt with batch size 1, repeats the cache for the variations,
then per step: one forward of the last sampled ids, logits masked by the grammar's cached mask,
temperature / top-k / top-p, one draw from a seeded `torch.Generator`. A row stops when its
grammar reaches its end token; finished rows are dropped from the batch (and the cache), so
the remaining rows do not pay for them. Nothing is re-decoded per step: the grammar advances
on the sampled id alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mmm.data.timing import Clock
from mmm.generation.compiled_step import StaticDecoder, is_compile_enabled
from mmm.generation.grammar import BarGrammar
from mmm.generation.request import SamplingConfig
from mmm.model.kv_cache import KVCache
from mmm.model.transformer import MMMTransformer
from mmm.tokenizer import Vocab

# A prompt's musical times and target flags, and the clock standing after it
# (`mmm.data.timing.sequence_timing`).
PromptTiming = tuple[np.ndarray, np.ndarray, Clock]


@dataclass
class GenerationOutput:
    """Generated model ids per row (forced and end tokens included) and timings."""

    ids: list[list[int]]
    prompt_len: int
    prefill_s: float
    decode_s: float
    steps: int  # forward passes after the prefill
    new_tokens: int = field(init=False)  # sum over rows

    def __post_init__(self) -> None:
        self.new_tokens = sum(len(r) for r in self.ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("inf")

    def base_ids(self, vocab: Vocab) -> list[list[int]]:
        """The generated ids of each row as base ids (BPE ids expanded)."""
        return [vocab.to_base(row) for row in self.ids]

    def timings(self) -> dict:
        return {
            "prompt_tokens": self.prompt_len,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Draw one id per row from float logits ``[B, V]`` (already masked)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    if cfg.temperature != 1:
        logits = logits / cfg.temperature
    top_p = cfg.top_p if cfg.top_p is not None and cfg.top_p < 1 else None
    top_k = cfg.top_k if cfg.top_k is not None and cfg.top_k < logits.shape[-1] else None
    if top_k is None and top_p is None:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    # Work on the candidates sorted by logit: the top k, or all of them for top-p alone.
    values, order = (
        torch.topk(logits, top_k, dim=-1) if top_k is not None else torch.sort(logits, dim=-1, descending=True)
    )
    probs = values.softmax(-1)
    if top_p is not None:  # drop a candidate when those ranked above it already hold top_p of the mass
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


def _select_rows(cache: KVCache, rows: Tensor) -> KVCache:
    return KVCache(
        [k.index_select(0, rows) for k in cache.keys], [v.index_select(0, rows) for v in cache.values], cache.length
    )


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def generate_ids(
    model: MMMTransformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    grammars: Sequence[BarGrammar] | None = None,
    num_variations: int = 1,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    num_threads: int | None = None,
    on_step: Callable[[Sequence[BarGrammar] | None], None] | None = None,
    compile: bool | None = None,
    timing: PromptTiming | None = None,
) -> GenerationOutput:
    """Sample `num_variations` continuations of `prompt` (model ids).

    With `grammars` (one per variation) each row follows its grammar and stops at its end
    token; the budget `max_new_tokens` must be the one the grammars were built with. Without
    grammars every row runs exactly `max_new_tokens` steps (the unconstrained baseline of the
    benchmark).
    `num_threads` sets torch's CPU threads for the call (1 is fastest for small models on a
    busy machine: multi-threaded tiny matmuls spin-wait) and restores them afterwards.
    `on_step(grammars)` is called after every sampled token (progress: `grammar.bars_done`); an
    exception it raises stops the loop and propagates (how a server cancels a request).
    `compile`: True decodes with the `torch.compile`d static-shape step of `mmm.generation.compiled_step`
    (compiled on the model's first such call, tens of seconds on a CPU, then reused); False
    with the eager loop; None (default) with the compiled step when this model already has one
    (`mmm.generation.compiled_step.enable_compile(model)`), so no call pays a compile it did not ask for.
    `timing`: the prompt's `mmm.data.timing.sequence_timing` (of the model's `config.timing` kind),
    required by a model with alignment signals; each row's clock then times the ids it samples.
    """
    if compile is None:
        compile = is_compile_enabled(model)
    elif not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or None, got {compile!r}")
    if model.config.timing is not None and timing is None:
        raise ValueError(
            f"this model reads musical times and target flags ({model.config.timing} timing): pass the prompt's "
            f"timing=mmm.data.timing.sequence_timing(prompt, vocab, {model.config.timing!r})"
        )
    args = (model, prompt, max_new_tokens, grammars, num_variations, sampling, generator, on_step, compile, timing)
    if num_threads is None:
        return _generate(*args)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _generate(*args)
    finally:
        torch.set_num_threads(previous)


def _blocked(
    grammars: Sequence[BarGrammar], rows: list[int], done: list[bool], vocab_size: int, device: torch.device
) -> Tensor:
    """The grammar masks of the batch rows ``[B, V]``; a finished row (kept in a static batch)
    blocks nothing, so that sampling it stays defined."""
    if len(rows) == 1:
        return grammars[rows[0]].blocked(vocab_size, device)
    free = None
    masks = []
    for r in rows:
        if done[r]:
            free = torch.zeros(vocab_size, dtype=torch.bool, device=device) if free is None else free
            masks.append(free)
        else:
            masks.append(grammars[r].blocked(vocab_size, device))
    return torch.stack(masks)


@torch.inference_mode()
def _check_budget(
    model: MMMTransformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    grammars: Sequence[BarGrammar] | None,
    num_variations: int,
) -> None:
    if grammars is not None and len(grammars) != num_variations:
        raise ValueError(f"{len(grammars)} grammars for {num_variations} variations")
    if len(prompt) == 0:
        raise ValueError("empty prompt")
    if len(prompt) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)}) + budget ({max_new_tokens}) exceeds the model context {model.config.max_seq_len}"
        )


def _prefill(
    model: MMMTransformer,
    static: StaticDecoder | None,
    prompt: Sequence[int],
    total: int,
    timing: PromptTiming | None,
) -> tuple[torch.Tensor, KVCache | None]:
    """The last prompt position's logits (1, vocab), and the eager loop's cache (None with the
    static decoder, which keeps its own)."""
    device = model.embed_tokens.weight.device
    times = flags = None
    if timing is not None:
        times, flags = (torch.as_tensor(x, device=device)[None] for x in timing[:2])
    if static is not None:
        return static.prefill(prompt, times, flags), None
    cache = model.new_cache(1, max_len=total)
    ids = torch.tensor([list(prompt)], device=device)
    return model(ids, cache, last_only=True, times=times, flags=flags)[:, -1].float(), cache


def _generate(
    model: MMMTransformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    grammars: Sequence[BarGrammar] | None,
    num_variations: int,
    sampling: SamplingConfig | None,
    generator: torch.Generator | None,
    on_step: Callable[[Sequence[BarGrammar] | None], None] | None,
    compile: bool,
    timing: PromptTiming | None,
) -> GenerationOutput:
    sampling = sampling or SamplingConfig()
    sampling.check()
    _check_budget(model, prompt, max_new_tokens, grammars, num_variations)
    device = model.embed_tokens.weight.device
    vocab_size = model.config.vocab_size
    total = len(prompt) + max_new_tokens
    n = num_variations
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    # The eager loop drops finished rows from its batch and cache; the static decoder keeps
    # them (a new batch size would be a new compiled graph) and ignores what they sample.
    static = StaticDecoder(model, n, total, compile=True) if compile else None
    # A model with alignment signals reads the prompt's times and flags, then each row's clock
    # times the ids it samples (all of them are the target's: flag 1).
    clocks = [timing[2].copy() for _ in range(n)] if model.config.timing is not None else []
    step_times = [0] * n if clocks else None
    logits, cache = _prefill(model, static, prompt, total, timing if clocks else None)
    sync()
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if n > 1:
        if static is None:
            cache = cache.repeat(n)
        logits = logits.expand(n, -1)
    out: list[list[int]] = [[] for _ in range(n)]
    rows = list(range(n))  # variation of each batch row
    done = [False] * n
    steps = 0
    for step in range(max_new_tokens):
        if grammars is not None:
            logits = logits.masked_fill(_blocked(grammars, rows, done, vocab_size, device), float("-inf"))
        next_ids = sample_next(logits, sampling, generator)
        ids = next_ids.tolist()
        finished = []
        for j, (r, i) in enumerate(zip(rows, ids)):
            if done[r]:
                continue
            out[r].append(i)
            if clocks:
                step_times[j] = clocks[r].advance(i)
            if grammars is not None:
                grammars[r].advance(i)
                if grammars[r].done:
                    done[r] = True
                    finished.append(j)
        if on_step is not None:
            on_step(grammars)
        if all(done) or step + 1 == max_new_tokens:
            break
        if finished and static is None:
            keep = [j for j in range(len(rows)) if j not in finished]
            index = torch.tensor(keep, device=device)
            cache, next_ids = _select_rows(cache, index), next_ids.index_select(0, index)
            rows = [rows[j] for j in keep]
            step_times = [step_times[j] for j in keep] if clocks else None
        times = torch.tensor(step_times, device=device) if clocks else None
        if static is not None:
            logits = static.step(next_ids, times)
        else:
            flags = None if times is None else torch.ones_like(times)[:, None]
            logits = model(next_ids[:, None], cache, times=None if times is None else times[:, None], flags=flags)
            logits = logits[:, -1].float()
        steps += 1
    sync()
    decode_s = time.perf_counter() - t0
    if grammars is not None and not all(g.done for g in grammars):
        raise RuntimeError("a row ran out of budget before its end token (grammar bug)")
    return GenerationOutput(out, len(prompt), prefill_s, decode_s, steps)
