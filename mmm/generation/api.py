"""`MMM`: load a checkpoint, then infill bars, add a track or write a piece from scratch.

    from mmm import MMM
    model = MMM.from_pretrained("runs/demo/model")          # folder, .ckpt or hub id
    out = model.infill("song.mid", track=1, bars=(8, 12), controls={"note_density": 6})
    out = model.add_track(out, program=33, track_controls={"repetition": 0.5})
    out = model.generate(programs=[0, 33, -1], num_bars=16, seed=0)

Prompts are built exactly like training samples (`mmm.data.sequences.assemble`): the target
bars become `Infill_Bar` and the model writes them after `FillBar_Start`; a new track is
written after `Track_Start Program [track ACs]`. The grammar (`mmm.generation.grammar`) makes every
output well formed. The result is the *input* score with the generated notes spliced in: the
target track's notes whose onset lies in the span are replaced, everything else is left
untouched (no re-rendering from tokens).

Bars are counted as the tokenizer sees the piece (bar 0 starts at tick 0; where that grid
differs from the file's own, `MMM.run` logs a warning and its report's `bar_grid_warning` says
so), spans are `(start, end)` with `end` excluded. When a prompt would not fit the model
context, a window of bars around the span is kept (`bars_before` / `bars_after`, then shrunk
automatically) and context tracks are dropped if still needed; long spans and long new tracks
are generated in several segments, each seeing the previous ones.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from miditok import MMM as MMMTokenizer
from miditok.constants import MIDI_INSTRUMENTS
from symusic import Note, Score, Tempo, TimeSignature, Track

from mmm.controls.table import Controls
from mmm.data.layout import (
    TRACK_FRAME,
    Piece,
    carry_tempo,
    generated_bars,
    piece_from_score,
    ticks_per_bar,
    time_signature_of,
    track_ids,
)
from mmm.data.sequences import SampleSpec, TrackPart, assemble
from mmm.data.timing import sequence_timing
from mmm.generation.compiled_step import enable_compile
from mmm.generation.grammar import BarGrammar, BarPlan, GrammarTables
from mmm.generation.request import (
    Character,
    Plan,
    Request,
    RequestError,
    SamplingConfig,
    check_request,
    check_tracks,
)
from mmm.generation.sampling import generate_ids, make_generator
from mmm.generation.scores import BarGrid, bar_grid, read_score, to_ticks
from mmm.model import MMMTransformer
from mmm.model.pretrained import checkpoint_location, generation_settings, load_pretrained, save_pretrained
from mmm.tokenizer import Vocab

# Per-bar generation budget (model ids) when the checkpoint does not carry one measured on its
# training data (`generation.max_bar_tokens` in config.json, written by `mmm.train`).
DEFAULT_MAX_BAR_TOKENS = 64
log = logging.getLogger(__name__)


# --- report ------------------------------------------------------------------------------
@dataclass
class GenerationStep:
    task: str  # "infill" | "track"
    track: int  # output score track index
    bars: tuple[int, int]
    program: int
    variations: list[int]  # which variations this run produced
    prompt_tokens: int
    budget: int
    window: tuple[int, int]  # bars of context kept
    context_tracks: list[int]  # output track indices in the prompt (target excluded)
    tokens: list[list[int]]  # per variation: generated base ids (bar ACs and end token included)
    timings: dict
    prompt: list[int] = field(repr=False, default_factory=list)  # model ids
    # per variation: bars (absolute indices) written while the token budget forced the row to
    # close, so possibly cut short; empty when the budget never constrained the generation
    starved_bars: list[list[int]] = field(default_factory=list)


@dataclass
class GenerationReport:
    steps: list[GenerationStep] = field(default_factory=list)
    regions: list[list[tuple[int, int, int]]] = field(default_factory=list)  # per variation: (track, start, end) ticks
    # `BarGrid.difference()` of the input: set when the model's bar n is not the file's bar n,
    # i.e. the bars rewritten are not those a musician counted in a DAW
    bar_grid_warning: str | None = None

    def summary(self) -> dict:
        prefill = sum(s.timings["prefill_s"] for s in self.steps)
        decode = sum(s.timings["decode_s"] for s in self.steps)
        tokens = sum(s.timings["new_tokens"] for s in self.steps)
        starved = sorted({(s.track, b) for s in self.steps for bars in s.starved_bars for b in bars})
        return {
            "generations": len(self.steps),
            "prefill_s": round(prefill, 4),
            "decode_s": round(decode, 4),
            "new_tokens": tokens,
            "tokens_per_s": round(tokens / decode, 1) if decode > 0 else None,
            "starved_bars": [list(x) for x in starved],
        }


@dataclass
class Generation:
    """What `MMM.run` returns: one output score per variation and the report of how they were
    made. Each call has its own, so two callers of one `MMM` never read each other's."""

    scores: list[Score]
    report: GenerationReport

    @property
    def output(self) -> Score | list[Score]:
        """The single score of a one-variation request, else the list (what `infill` returns)."""
        return self.scores[0] if len(self.scores) == 1 else self.scores


# Called after every sampled token with the grammars of the rows: progress in bars (`bars_done`);
# an exception raised there stops the generation (how the server cancels a request).
OnStep = Callable[[Sequence[BarGrammar]], None]


# --- the model -----------------------------------------------------------------------------
class MMM:
    """A trained MMM model with its tokenizer, ready to generate."""

    def __init__(
        self,
        model: MMMTransformer,
        tokenizer: MMMTokenizer,
        device: str | torch.device | None = None,
        max_bar_tokens: int = DEFAULT_MAX_BAR_TOKENS,
        num_threads: int | None = None,
        controls_seen: Sequence[int] | None = None,
        compile: bool = False,
    ) -> None:
        """`max_bar_tokens`: generation budget per bar (model ids) from which spans are sized; a
        generation may use all the context left after its prompt. `num_threads`: torch CPU
        threads while sampling (None: torch's setting). `controls_seen`: AC base ids seen in
        training (other control values are refused); `from_pretrained` reads both from the
        checkpoint. `compile`: decode with the `torch.compile`d step (`mmm.generation.compiled_step`):
        the first generation pays the compilation, later ones decode faster (experiments/generation_speed:
        worth it for a server or a batch of requests, not for one infill)."""
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got {compile!r}")
        self.tokenizer = tokenizer
        self.vocab = Vocab(tokenizer)
        if model.config.vocab_size < self.vocab.size:
            raise ValueError(f"model vocab_size {model.config.vocab_size} < tokenizer vocab size {self.vocab.size}")
        self.model = model.to(device) if device is not None else model
        self.model.eval()
        if compile:
            enable_compile(self.model)
        self.controls = Controls(tokenizer, self.vocab, controls_seen)
        self.controls_seen = None if controls_seen is None else sorted(controls_seen)
        if isinstance(max_bar_tokens, bool) or not isinstance(max_bar_tokens, (int, np.integer)) or max_bar_tokens < 4:
            raise ValueError(f"max_bar_tokens must be an integer >= 4, got {max_bar_tokens!r}")
        self.max_bar_tokens = int(max_bar_tokens)
        self.num_threads = num_threads
        self.tables = GrammarTables.of(self.vocab)

    # -- loading / saving ------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
        trusted: bool = False,
        **kwargs: Any,
    ) -> MMM:
        """From a checkpoint folder, a Lightning `.ckpt`, a DeepSpeed dir, or a Hugging Face hub
        repo id (downloaded with `huggingface_hub.snapshot_download`). A `.ckpt` holding anything
        but plain data is refused (unpickling it could run code) unless `trusted=True`."""
        path = checkpoint_location(path_or_hub_id)
        if isinstance(path, str):  # a hub repo id
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=path, revision=revision, cache_dir=cache_dir, token=token))
        model, tokenizer = load_pretrained(path, trusted=trusted)
        return cls(model, tokenizer, device=device, **{**generation_settings(path), **kwargs})

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` + `tokenizer.json` (loadable by `from_pretrained`
        and by `miditok.MMM.from_pretrained(folder)`)."""
        generation = {"max_bar_tokens": self.max_bar_tokens}
        if self.controls_seen is not None:
            generation["controls_seen"] = self.controls_seen
        return save_pretrained(self.model, self.tokenizer, folder, extra={"generation": generation})

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload MMM model",
    ) -> str:
        """Upload the checkpoint folder to the Hugging Face hub; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message))

    # -- public tasks ----------------------------------------------------------------------
    def infill(
        self,
        score: Score | str | Path,
        track: int | Sequence[int],
        bars: Sequence,
        controls: Mapping | Sequence[Mapping] | None = None,
        track_controls: Mapping | Sequence[Mapping] | None = None,
        *,
        temperature: float = SamplingConfig.temperature,
        top_k: int | None = SamplingConfig.top_k,
        top_p: float | None = SamplingConfig.top_p,
        seed: int | None = None,
        num_variations: int = 1,
        bars_before: int | None = None,
        bars_after: int | None = None,
        max_bar_tokens: int | None = None,
        clip_notes: bool = True,
    ) -> Score | list[Score]:
        """Rewrite bars `bars` (`(start, end)`, end excluded, or a list of spans) of track(s)
        `track` (index into `score.tracks`). Several tracks/spans are generated one after the
        other, each seeing the previous results. `controls` / `track_controls` may be a list
        with one entry per track. Generated notes end at the end of their span (they would
        otherwise sound over the kept bars after it) unless `clip_notes=False`."""
        return self.run(
            Request(
                "infill",
                track=track,
                bars=bars,
                controls=controls,
                track_controls=track_controls,
                bars_before=bars_before,
                bars_after=bars_after,
                num_variations=num_variations,
                seed=seed,
                sampling=SamplingConfig(temperature, top_k, top_p),
                max_bar_tokens=max_bar_tokens,
                clip_notes=clip_notes,
            ),
            score,
        ).output

    def add_track(
        self,
        score: Score | str | Path,
        program: int,
        controls: Mapping | None = None,
        track_controls: Mapping | None = None,
        *,
        temperature: float = SamplingConfig.temperature,
        top_k: int | None = SamplingConfig.top_k,
        top_p: float | None = SamplingConfig.top_p,
        seed: int | None = None,
        num_variations: int = 1,
        max_bar_tokens: int | None = None,
    ) -> Score | list[Score]:
        """Write a new track (`program`, -1 = drums) over every bar of `score`; it is appended
        as the last track of the output."""
        return self.run(
            Request(
                "add_track",
                program=program,
                controls=controls,
                track_controls=track_controls,
                num_variations=num_variations,
                seed=seed,
                sampling=SamplingConfig(temperature, top_k, top_p),
                max_bar_tokens=max_bar_tokens,
            ),
            score,
        ).output

    def generate(
        self,
        programs: Sequence[int],
        num_bars: int,
        controls: Mapping | Sequence[Mapping] | None = None,
        track_controls: Mapping | Sequence[Mapping] | None = None,
        *,
        time_signature: str | tuple[int, int] = (4, 4),
        tempo: float = 120.0,
        tpq: int = 480,
        temperature: float = SamplingConfig.temperature,
        top_k: int | None = SamplingConfig.top_k,
        top_p: float | None = SamplingConfig.top_p,
        seed: int | None = None,
        num_variations: int = 1,
        max_bar_tokens: int | None = None,
    ) -> Score | list[Score]:
        """Write a piece from scratch: one track per program (-1 = drums), in order, each seeing
        the previous ones; `num_bars` bars in `time_signature` at `tempo`."""
        return self.run(
            Request(
                "generate",
                programs=programs,
                num_bars=num_bars,
                controls=controls,
                track_controls=track_controls,
                time_signature=time_signature,
                tempo=tempo,
                tpq=tpq,
                num_variations=num_variations,
                seed=seed,
                sampling=SamplingConfig(temperature, top_k, top_p),
                max_bar_tokens=max_bar_tokens,
            )
        ).output

    def check(
        self, request: Request, score: Score | str | Path | None = None
    ) -> tuple[Plan, Score | None, Piece | None]:
        """`request` checked against this model (and the input score): its plan, or a `RequestError`."""
        if request.task == "generate":
            return check_request(request, self.tokenizer, self.controls), None, None
        if score is None:
            raise RequestError("file", f"{request.task} needs an input score")
        score = read_score(score)
        if request.task == "infill":
            check_tracks(request.track, score)  # before the bars: an unknown track is the first thing to say
        piece = piece_from_score(score, self.tokenizer, self.vocab)
        ticks = [to_ticks(tick, piece.tpq, score.tpq) for tick in [*piece.bar_ticks, piece.end_tick(self.vocab)]]
        return check_request(request, self.tokenizer, self.controls, score, piece.num_bars, ticks), score, piece

    def run(
        self, request: Request, score: Score | str | Path | None = None, on_step: OnStep | None = None
    ) -> Generation:
        """Run a `Request` (what `infill`, `add_track` and `generate` build): the output scores
        (one per variation) with the report of this call (prompts, tokens, timings, starved bars,
        bar-grid warning). `on_step(grammars)` is called after every sampled token."""
        plan, score, piece = self.check(request, score)
        grid_warning = None
        if piece is not None:  # before the run: generation edits the piece
            grid_warning = bar_grid(score, self.tokenizer, self.vocab, piece).difference()
            if grid_warning:
                log.warning("%s: %s", request.task, grid_warning)
        if request.task == "generate":
            tpq, ts = int(request.tpq), plan.time_signature
            score = Score(tpq)
            num, den = time_signature_of(self.vocab.token_of[ts])
            score.time_signatures.append(TimeSignature(0, num, den))
            score.tempos.append(Tempo(0, float(request.tempo)))
            per_bar = ticks_per_bar(ts, self.vocab, tpq)
            piece = Piece([], [], [ts] * plan.num_bars, [b * per_bar for b in range(plan.num_bars)], tpq)
        run = self._run(score, piece, request, on_step)
        run.report.bar_grid_warning = grid_warning
        if request.task == "infill":
            for k, t in enumerate(plan.tracks):
                for a, e in plan.spans:
                    run.characters[t] = plan.characters[k]
                    run.infill(
                        t,
                        a,
                        e,
                        plan.bar_acs[k],
                        plan.track_acs[k],
                        request.bars_before,
                        request.bars_after,
                        request.clip_notes,
                    )
        else:
            for program, acs, tacs, character in zip(plan.programs, plan.bar_acs, plan.track_acs, plan.characters):
                run.new_track(program, acs, tacs, character)
        return Generation(run.scores, run.report)

    def bar_grid(self, score: Score | str | Path) -> BarGrid:
        """The bars of `score` as this model counts them (start ticks, time signatures) beside
        the file's own bars; `BarGrid.difference()` says where they part."""
        return bar_grid(read_score(score), self.tokenizer, self.vocab)

    # -- helpers ---------------------------------------------------------------------------
    def _run(self, score: Score, piece: Piece, request: Request, on_step: OnStep | None) -> _Run:
        bar_tokens = self.max_bar_tokens if request.max_bar_tokens is None else int(request.max_bar_tokens)
        device = self.model.embed_tokens.weight.device
        return _Run(
            self,
            score,
            piece,
            request.sampling,
            make_generator(request.seed, device),
            int(request.num_variations),
            bar_tokens,
            on_step,
        )


class _Run:
    """One API call: per-variation pieces and output scores, updated after each generation."""

    def __init__(
        self,
        mmm: MMM,
        score: Score,
        piece: Piece,
        sampling: SamplingConfig,
        generator: torch.Generator,
        num_variations: int,
        max_bar_tokens: int,
        on_step: OnStep | None,
    ) -> None:
        self.mmm, self.vocab, self.tables = mmm, mmm.vocab, mmm.tables
        self.on_step = on_step
        self.max_len = mmm.model.config.max_seq_len
        self.sampling, self.generator, self.n = sampling, generator, num_variations
        if isinstance(max_bar_tokens, bool) or not isinstance(max_bar_tokens, (int, np.integer)) or max_bar_tokens < 4:
            raise ValueError(f"max_bar_tokens must be an integer >= 4, got {max_bar_tokens!r}")
        self.max_bar_tokens = int(max_bar_tokens)
        self.pieces = [piece] + [piece.copy() for _ in range(num_variations - 1)]
        self.scores = [score.copy() for _ in range(num_variations)]
        self.report = GenerationReport(regions=[[] for _ in range(num_variations)])
        self.diverged = False  # once True, each variation has its own prompt
        self.characters: dict[int, Character] = {}  # piece track -> what its generations keep

    # -- sizes -----------------------------------------------------------------------------
    def max_span(self) -> int:
        """Bars per generation: their budget takes at most half the context."""
        return max(1, (self.max_len // 2) // self.max_bar_tokens)

    def reserve(self, num_bars: int, acs: int, min_prompt: int) -> int:
        """Ids kept free for the generated bars when fitting the prompt (the generation may then
        use everything the prompt leaves)."""
        want = num_bars * self.max_bar_tokens + acs + 2
        return min(want, self.max_len - min_prompt)

    # -- tasks -----------------------------------------------------------------------------
    def infill(
        self,
        t: int,
        a: int,
        b: int,
        acs: dict[int, list[int]],
        tacs: list[int],
        bars_before: int | None,
        bars_after: int | None,
        clip_notes: bool = True,
    ) -> None:
        step = self.max_span()
        for s in range(a, b, step):
            self._generate(
                "infill", t, s, min(b, s + step), acs, tacs, bars_before, bars_after, clip_at=b if clip_notes else None
            )

    def new_track(self, program: int, acs: dict[int, list[int]], tacs: list[int], character: Character) -> None:
        for v in range(self.n):
            piece, score = self.pieces[v], self.scores[v]
            name = "Drums" if program < 0 else MIDI_INSTRUMENTS[program]["name"]
            score.tracks.append(Track(name, max(program, 0), program < 0))
            piece.add_track(program, self.vocab)
            piece.source.append(len(score.tracks) - 1)
        t = len(self.pieces[0].programs) - 1
        self.characters[t] = character
        nb = self.pieces[0].num_bars
        first = min(nb, self.max_span())
        self._generate("track", t, 0, first, acs, tacs, None, None)
        step = self.max_span()
        for s in range(first, nb, step):  # the rest: infill the new track, no bars after the span
            self._generate("infill", t, s, min(nb, s + step), acs, tacs, None, 0)

    # -- one generation (batched over variations while their prompts are equal) -------------
    def _generate(
        self,
        task: str,
        t: int,
        a: int,
        b: int,
        acs: dict[int, list[int]],
        tacs: list[int],
        bars_before: int | None,
        bars_after: int | None,
        clip_at: int | None = None,
    ) -> None:
        """Generate bars [a, b) of track t; with `clip_at`, generated notes end at the start of
        that bar at the latest (the end of the user's span: they must not overlap kept notes)."""
        groups = [list(range(self.n))] if not self.diverged else [[v] for v in range(self.n)]
        for group in groups:
            piece = self.pieces[group[0]]
            bar_acs = [[self.tables.model_id(i) for i in acs.get(bar, [])] for bar in range(a, b)]
            prompt, window, context = self._fitted_prompt(task, piece, t, a, b, bar_acs, tacs, bars_before, bars_after)
            budget = self.max_len - len(prompt)
            end_id = self.vocab.fill_end if task == "infill" else self.vocab.track_end
            keep = self.characters.get(t, Character())
            plan = BarPlan(piece.time_sigs[a:b], bar_acs, end_id, piece.programs[t] < 0, *astuple(keep))
            grammars = [BarGrammar(GrammarTables.of(self.vocab), plan, budget) for _ in group]
            kind = self.mmm.model.config.timing
            out = generate_ids(
                self.mmm.model,
                prompt,
                budget,
                grammars,
                len(group),
                self.sampling,
                self.generator,
                num_threads=self.mmm.num_threads,
                on_step=self.on_step,
                timing=None if kind is None else sequence_timing(prompt, self.vocab, kind),
            )
            tokens = out.base_ids(self.vocab)
            for v, base in zip(group, tokens):
                self._apply(v, t, a, b, base, clip_at)
            starved = [[a + k for k in g.starved_bars()] for g in grammars]
            if any(starved):
                log.warning(
                    "track %d, bars %s: the token budget (%d ids after a %d-id prompt) ran out, "
                    "so these bars may be cut short; raise max_bar_tokens or shorten the context",
                    piece.source[t],
                    sorted({bar for bars in starved for bar in bars}),
                    budget,
                    len(prompt),
                )
            self.report.steps.append(
                GenerationStep(
                    task,
                    piece.source[t],
                    (a, b),
                    piece.programs[t],
                    group,
                    len(prompt),
                    budget,
                    window,
                    [piece.source[k] for k in context],
                    tokens,
                    out.timings(),
                    prompt,
                    starved,
                )
            )
        if self.n > 1:
            self.diverged = True

    def _fitted_prompt(
        self,
        task: str,
        piece: Piece,
        t: int,
        a: int,
        b: int,
        bar_acs: list[list[int]],
        tacs: list[int],
        bars_before: int | None,
        bars_after: int | None,
    ) -> tuple[list[int], tuple[int, int], list[int]]:
        """The prompt of one generation, its window of bars and its context tracks, fitted so
        that the bars to write keep their budget (`reserve`)."""
        # BOS, the track frame, its ACs; for an infill its Infill_Bars, FillBar_Start (and Program)
        header = 1 + TRACK_FRAME + len(tacs)
        if task == "infill":
            header += b - a + 1 + int(self.mmm.model.config.fill_program)
        reserve = self.reserve(b - a, sum(len(x) for x in bar_acs), header)
        return self._prompt(task, piece, t, a, b, tacs, self.max_len - reserve, bars_before, bars_after)

    def _prompt(
        self,
        task: str,
        piece: Piece,
        t: int,
        a: int,
        b: int,
        tacs: list[int],
        limit: int,
        bars_before: int | None,
        bars_after: int | None,
    ) -> tuple[list[int], tuple[int, int], list[int]]:
        """Model ids of the prompt, fitted under `limit` (window of bars, then fewer tracks)."""
        vocab = self.vocab
        nb = piece.num_bars
        if task == "infill":
            lo = 0 if bars_before is None else max(0, a - bars_before)
            hi = nb if bars_after is None else min(nb, b + bars_after)
        else:
            lo, hi = a, b
        context = [k for k in range(len(piece.programs)) if k != t and not piece.empty[k]]

        def estimate() -> int:
            total = 1 + (1 if task == "infill" else 0) + len(tacs)
            for k in context + [t]:
                c = piece.cumlen(k, vocab)
                if k == t and task == "infill":  # its span is one Infill_Bar per bar
                    total += TRACK_FRAME + int(c[a] - c[lo] + c[hi] - c[b]) + (b - a)
                elif k == t:  # the new track: its Track_Start Program only
                    total += TRACK_FRAME - 1
                else:
                    total += TRACK_FRAME + int(c[hi] - c[lo])
            return total

        def biggest_context_track() -> int:
            return max(context, key=lambda k: piece.cumlen(k, vocab)[hi] - piece.cumlen(k, vocab)[lo])

        while True:
            if estimate() <= limit:
                ids = vocab.encode_words(self._words(task, piece, t, a, b, lo, hi, context, tacs))
                if len(ids) <= limit:
                    return ids, (lo, hi), context
            if lo < a or hi > b:
                if lo < a and (a - lo >= hi - b):
                    lo += 1
                else:
                    hi -= 1
            elif context:
                context.remove(biggest_context_track())
            else:
                raise ValueError(
                    f"bars {a}..{b} of track {piece.source[t]} do not fit the model context "
                    f"({self.max_len} tokens) even without context: lower max_bar_tokens"
                )

    def _words(
        self, task: str, piece: Piece, t: int, a: int, b: int, lo: int, hi: int, context: list[int], tacs: list[int]
    ) -> list[list[int]]:
        def window(k: int) -> list[list[int]]:
            bars = [list(bar) for bar in piece.bars[k][lo:hi]]
            if lo > 0 and bars:
                carry_tempo(piece.bars[k][:lo], bars[0], self.vocab)
            return bars

        # The target comes last as in training: always for a new track, for an infill when the
        # model was trained so (`ModelConfig.target_last`), otherwise the piece's order.
        target_last = task != "infill" or self.mmm.model.config.target_last
        order = sorted(context) + [t] if target_last else sorted(context + [t])
        parts = {
            k: TrackPart(program=piece.programs[k], bars=window(k) if (k != t or task == "infill") else [])
            for k in order
        }
        parts[t].track_acs = list(tacs)
        spec = SampleSpec(task=task, tracks=order, target=t, span=(a - lo, b - lo))
        fill_program = self.mmm.model.config.fill_program
        words = assemble(spec, parts, self.vocab, fill_program)
        if task == "infill":  # up to FillBar_Start (and the target's Program): the model writes the rest
            return words[: words.index([self.vocab.fill_start]) + 1 + int(fill_program)]
        return words[:-1]  # drop the new track's Track_End: the model writes its bars

    # -- results ---------------------------------------------------------------------------
    def _apply(self, v: int, t: int, a: int, b: int, base: list[int], clip_at: int | None = None) -> None:
        vocab = self.vocab
        bars = generated_bars(base, vocab)
        if len(bars) != b - a:
            raise RuntimeError(f"{len(bars)} bars generated for {b - a} requested (grammar bug)")
        piece, score = self.pieces[v], self.scores[v]
        piece.set_bars(t, a, bars)
        piece.empty[t] = piece.empty[t] and not any(vocab.is_note_start[i] for bar in bars for i in bar)
        decoded = self.mmm.tokenizer.decode(track_ids(piece.programs[t], bars, vocab))
        start = to_ticks(piece.bar_ticks[a], piece.tpq, score.tpq)
        end = to_ticks(piece.bar_ticks[b], piece.tpq, score.tpq) if b < piece.num_bars else None
        notes = decoded.tracks[0].notes.numpy() if decoded.tracks else None
        piece_end = to_ticks(piece.end_tick(vocab), piece.tpq, score.tpq)
        clip = None
        if clip_at is not None:
            clip = to_ticks(piece.bar_ticks[clip_at], piece.tpq, score.tpq) if clip_at < piece.num_bars else piece_end
        monophonic = self.characters.get(t, Character()).monophonic
        _splice(score.tracks[piece.source[t]], start, end, notes, decoded.tpq, score.tpq, clip, monophonic)
        if end is None:
            end = piece_end
        self.report.regions[v].append((piece.source[t], start, end))


def _splice(
    track: Track,
    start: int,
    end: int | None,
    notes: dict | None,
    notes_tpq: int,
    tpq: int,
    clip: int | None = None,
    monophonic: bool = False,
) -> None:
    """Replace the notes of `track` whose onset is in [start, end) by `notes` (relative to
    `start`, in `notes_tpq` ticks); every other note is kept as it is. With `clip`, the new
    notes end at that tick at the latest; `monophonic`, each ends where the next one starts."""
    old = track.notes.numpy()
    keep = old["time"] < start
    if end is not None:
        keep |= old["time"] >= end
    fields = ("time", "duration", "pitch", "velocity")
    parts = {k: [old[k][keep]] for k in fields}
    if notes is not None and len(notes["time"]):
        time = np.rint(notes["time"] * tpq / notes_tpq).astype(np.int64) + start
        if end is not None:
            time = np.minimum(time, end - 1)
        duration = np.maximum(1, np.rint(notes["duration"] * tpq / notes_tpq)).astype(np.int64)
        if clip is not None:
            duration = np.maximum(1, np.minimum(duration, clip - time))
        if monophonic:  # one note at a time: the grammar gave one onset per note, the durations may overlap
            order = np.argsort(time, kind="stable")
            following = np.append(time[order][1:], np.iinfo(np.int64).max)
            duration[order] = np.maximum(1, np.minimum(duration[order], following - time[order]))
        parts["time"].append(time)
        parts["duration"].append(duration)
        parts["pitch"].append(notes["pitch"])
        parts["velocity"].append(notes["velocity"])
    arrays = {k: np.concatenate([np.asarray(x, dtype=np.int64) for x in parts[k]]) for k in fields}
    order = np.argsort(arrays["time"], kind="stable")
    track.notes = Note.from_numpy(
        time=arrays["time"][order].astype(np.int32),
        duration=arrays["duration"][order].astype(np.int32),
        pitch=arrays["pitch"][order].astype(np.int8),
        velocity=arrays["velocity"][order].astype(np.int8),
    )
