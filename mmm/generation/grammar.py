"""Token grammar for generation: which model ids may come next, so that every output decodes.

Generated material is always a run of REMI bars (docs/token_format.rst) closed by one end token:
`FillBar_End` after an infill, `Track_End` after a new track. Inside a bar the order is

    Bar_None TimeSig [forced bar ACs] (Position [Tempo] (Pitch|PitchDrum Velocity Duration)*)*

The grammar works on *base* tokens but is driven by *model* (BPE) ids. Everything an id can do
is precomputed once per vocabulary (`GrammarTables`): for each of the 8 phases of the DFA
below, the phase the id leaves it in (or -1), plus its first/last Position, its TimeSig,
whether it opens a bar and whether it holds Pitch or PitchDrum tokens. BPE words are bars, so
an id holds at most one `Bar_None`, at its start. Advancing a `BarGrammar` by one id is then
a few table lookups (O(1)), and the mask of allowed ids is a vectorised expression over these
tables, built lazily and cached on the *state key* (phase, position, time signatures, ...):
after warm-up a step is a dict lookup.

Guarantees for every row: exactly the requested number of bars, each with the requested
TimeSig; positions strictly increasing inside a bar and below its length; Pitch only in
pitched tracks, PitchDrum only in drum tracks; no special, Program, Track or AC token except
the forced bar ACs; the end token only after the last bar and at a point where a note is
complete. A token budget is kept too: `need` is the fewest ids that can still finish the row;
once the remaining budget gets within 2 of it, only ids that lower `need` are allowed (finish
the note, open the next bar as `Bar TimeSig`, end), so the row ends within its budget with
the exact bar count (the last bars then come out empty). `starved_bars()` names the bars
written under that pressure, so callers can report them.

A plan may also keep a track's character: its `pitch_range` (no Pitch outside it) and
`monophonic` (at most one note per onset: no second Pitch before the next Position), read from
per-id tables too, so they cost nothing per step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from mmm.data.layout import time_signature_of
from mmm.tokenizer import Vocab

# DFA phases: what the last base token was.
START, BAR, HEAD, POS, TEMPO, PITCH, VEL, DUR = range(8)
PHASES = ("START", "BAR", "HEAD", "POS", "TEMPO", "PITCH", "VEL", "DUR")
# Token kinds.
K_BAR, K_TS, K_POS, K_TEMPO, K_PITCH, K_DRUM, K_VEL, K_DUR, K_OTHER = range(9)
_KIND_PREFIX = {
    "TimeSig": K_TS,
    "Position": K_POS,
    "Tempo": K_TEMPO,
    "Pitch": K_PITCH,
    "PitchDrum": K_DRUM,
    "Velocity": K_VEL,
    "Duration": K_DUR,
}
# phase -> kind -> next phase (missing: not allowed). Pitch and PitchDrum share transitions;
# which of the two a track may use is checked separately.
_TRANSITIONS = {
    START: {K_BAR: BAR},
    BAR: {K_TS: HEAD},
    HEAD: {K_POS: POS, K_BAR: BAR},
    POS: {K_TEMPO: TEMPO, K_PITCH: PITCH, K_DRUM: PITCH},
    TEMPO: {K_PITCH: PITCH, K_DRUM: PITCH, K_POS: POS, K_BAR: BAR},
    PITCH: {K_VEL: VEL},
    VEL: {K_DUR: DUR},
    DUR: {K_PITCH: PITCH, K_DRUM: PITCH, K_POS: POS, K_BAR: BAR},
}
# Fewest ids needed to reach a point where the bar may close (a note is complete).
_COMPLETION = np.array([0, 1, 0, 1, 0, 2, 1, 0], dtype=np.int64)
_COMPLETION_LIST = _COMPLETION.tolist()
_CAN_CLOSE = (HEAD, TEMPO, DUR)  # a new bar or the end token may follow
# need() may grow by at most 2 per free step (a Pitch opens a note needing Velocity, Duration).
_TIGHT_MARGIN = 2


class GrammarTables:
    """Per-vocabulary facts about every model id, and the cache of masks keyed on states."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self.size = vocab.size
        token_of = vocab.token_of
        kinds = np.full(vocab.base_size, K_OTHER, dtype=np.int64)
        pos_value = np.full(vocab.base_size, -1, dtype=np.int64)
        for i in range(vocab.base_size):
            token = token_of[i]
            if token == "Bar_None":
                kinds[i] = K_BAR
                continue
            prefix, _, value = token.partition("_")
            kinds[i] = _KIND_PREFIX.get(prefix, K_OTHER)
            if kinds[i] == K_POS:
                pos_value[i] = int(value)
        self.kinds = kinds
        # Positions per bar: numerator x the finest resolution (REMI counts positions per beat
        # of the time signature's denominator).
        res = vocab.tokenizer.config.max_num_pos_per_beat
        self.bar_positions = {
            i: time_signature_of(token_of[i])[0] * res for i in range(vocab.base_size) if kinds[i] == K_TS
        }

        n = vocab.size
        self.exit = np.full((len(PHASES), n), -1, dtype=np.int64)
        self.first_pos = np.full(n, -1, dtype=np.int64)
        self.last_pos = np.full(n, -1, dtype=np.int64)
        self.ts = np.full(n, -1, dtype=np.int64)
        self.opens_bar = np.zeros(n, dtype=bool)
        self.has_pitch = np.zeros(n, dtype=bool)
        self.has_drum = np.zeros(n, dtype=bool)
        self.bad = np.zeros(n, dtype=bool)  # can never appear inside generated bars
        self.pitch_min = np.full(n, 128, dtype=np.int64)  # lowest / highest Pitch in the id (none: 128 / -1)
        self.pitch_max = np.full(n, -1, dtype=np.int64)
        self.chord = np.zeros(n, dtype=bool)  # two Pitch tokens with no Position between them
        self.pitch_first = np.zeros(n, dtype=bool)  # a Pitch before the id's first Position
        self.length = np.zeros(n, dtype=np.int64)
        for i, bases in enumerate(vocab.model_to_base):
            k = kinds[list(bases)]
            self.length[i] = len(bases)
            positions = pos_value[list(bases)]
            positions = positions[positions >= 0]
            # A bar header merged with the bar's body never comes out of encoding (a header is a
            # word of its own: tokenizer.bpe_words); a tokenizer learned before that rule may hold such ids.
            merged_header = k[0] == K_BAR and len(k) > 2
            if (k == K_OTHER).any() or (k[1:] == K_BAR).any() or (np.diff(positions) <= 0).any() or merged_header:
                self.bad[i] = True
                continue
            self.opens_bar[i] = k[0] == K_BAR
            self.has_pitch[i] = (k == K_PITCH).any()
            pitches = [vocab.pitch_of[b] for b, kind in zip(bases, k) if kind == K_PITCH]
            if pitches:
                self.pitch_min[i], self.pitch_max[i] = min(pitches), max(pitches)
            notes_here = 0  # notes at the current onset, within this id
            for j, kind in enumerate(k):
                if kind == K_POS:
                    notes_here = 0
                elif kind == K_PITCH:
                    if not (k[:j] == K_POS).any():
                        self.pitch_first[i] = True
                    notes_here += 1
                    self.chord[i] |= notes_here > 1
            self.has_drum[i] = (k == K_DRUM).any()
            if len(positions):
                self.first_pos[i], self.last_pos[i] = positions[0], positions[-1]
            ts = [b for b, kind in zip(bases, k) if kind == K_TS]
            self.ts[i] = ts[0] if ts else -1
            for phase in range(len(PHASES)):
                p = phase
                for kind in k:
                    p = _TRANSITIONS[p].get(int(kind), -1)
                    if p < 0:
                        break
                self.exit[phase, i] = p
        # model id of a single base token (specials, ACs, Bar, TimeSig keep one)
        self.single = {bases[0]: i for i, bases in enumerate(vocab.model_to_base) if len(bases) == 1}
        self.bar_ts = {
            vocab.model_to_base[i][1]: i
            for i in range(n)
            if self.length[i] == 2 and self.opens_bar[i] and self.ts[i] >= 0
        }
        # the same tables as Python lists: scalar reads in the per-step path
        self.exit_list = self.exit.tolist()
        self.opens_bar_list = self.opens_bar.tolist()
        self.last_pos_list = self.last_pos.tolist()
        self._masks: dict[tuple, tuple[np.ndarray, dict]] = {}
        self.max_cached = 8192  # states; a mask costs ~2 bytes per vocabulary entry

    _instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, vocab: Vocab) -> GrammarTables:
        """The tables of `vocab`, built once and shared by every grammar over it."""
        tables = cls._instances.get(vocab)
        if tables is None:
            tables = cls._instances[vocab] = cls(vocab)
        return tables

    def model_id(self, base_id: int) -> int:
        """Model id of a base token that keeps its own id (ACs, specials)."""
        try:
            return self.single[base_id]
        except KeyError:
            raise ValueError(f"token {self.vocab.token_of[base_id]} has no model id of its own") from None

    def bar_cost(self, ts: int) -> int:
        """Fewest ids that open a bar with TimeSig `ts`: `Bar TimeSig` as one id, or two."""
        return 1 if ts in self.bar_ts else 2

    def mask(self, key: tuple) -> np.ndarray:
        """Boolean mask over model ids for a state key (cached)."""
        entry = self._masks.get(key)
        if entry is None:
            if len(self._masks) >= self.max_cached:  # bounded memory: forget the oldest states
                for old in list(self._masks)[: self.max_cached // 4]:
                    del self._masks[old]
            entry = self._masks[key] = (self._build(key), {})
        return entry[0]

    def blocked(self, key: tuple, size: int, device: torch.device) -> torch.Tensor:
        """Bool tensor of length `size` (the model's vocab, >= ours), True where an id is not
        allowed: `logits.masked_fill(blocked, -inf)` applies it (cached per state and device)."""
        mask = self.mask(key)
        tensors = self._masks[key][1]
        t = tensors.get((size, device))
        if t is None:
            blocked = np.ones(size, dtype=bool)
            np.logical_not(mask, out=blocked[: self.size])
            t = tensors[(size, device)] = torch.from_numpy(blocked).to(device)
        return t

    def _build(self, key: tuple) -> np.ndarray:
        (phase, pos, cur_ts, cur_acs, next_ts, next_acs, can_end, end_id, drums, tight, forced, low, high, mono) = key
        mask = np.zeros(self.size, dtype=bool)
        if forced >= 0:
            mask[forced] = True
            return mask
        exit_ = self.exit[phase]
        ok = (exit_ >= 0) & ~self.bad
        ok &= ~self.has_pitch if drums else ~self.has_drum
        if low >= 0:  # the track's pitch range
            ok &= (self.pitch_min >= low) & (self.pitch_max <= high)
        if mono:  # one note per onset: no chord inside an id, no second note at the current onset
            ok &= ~self.chord
            if phase in (PITCH, VEL, DUR):
                ok &= ~self.pitch_first
        # ids that stay in the current bar
        inside = ok & ~self.opens_bar
        if cur_ts >= 0:
            inside &= (self.first_pos < 0) | (self.first_pos > pos)
            inside &= self.last_pos < self.bar_positions[cur_ts]
        if phase == BAR:
            inside &= self.ts == cur_ts
            if cur_acs:  # the bar's ACs follow its TimeSig: stop right there
                inside &= self.length == 1
        # ids opening the next bar
        opening = ok & self.opens_bar
        if next_ts >= 0:
            opening &= (self.ts < 0) | (self.ts == next_ts)
            opening &= self.last_pos < self.bar_positions[next_ts]
            if next_acs:
                opening &= (self.length == 1) | ((self.length == 2) & (self.ts == next_ts))
        else:
            opening[:] = False
        mask = inside | opening
        if tight:
            cost = self.bar_cost(next_ts) if next_ts >= 0 else 0
            delta = np.where(exit_ >= 0, _COMPLETION[exit_], 99) - _COMPLETION[phase] - self.opens_bar * cost
            mask &= delta < 0
        if can_end and phase in _CAN_CLOSE:
            if tight:
                mask[:] = False
            mask[end_id] = True
        return mask


@dataclass
class BarPlan:
    """What one row must generate: one TimeSig base id per bar, the bar ACs (model ids) to force
    after each bar's TimeSig, and the end token (FillBar_End or Track_End); optionally the track's
    character to keep: a `pitch_range` (lowest, highest MIDI pitch) and `monophonic`."""

    time_signatures: list[int]
    bar_acs: list[list[int]]
    end_id: int
    drums: bool
    pitch_range: tuple[int, int] | None = None
    monophonic: bool = False


class BarGrammar:
    """State of one generated row; `advance(id)` is O(1), `key()` indexes the mask cache."""

    def __init__(self, tables: GrammarTables, plan: BarPlan, budget: int) -> None:
        if len(plan.time_signatures) == 0:
            raise ValueError("a grammar needs at least one bar to generate")
        if len(plan.bar_acs) != len(plan.time_signatures):
            raise ValueError("one list of bar ACs per bar is required")
        for ts in plan.time_signatures:
            if ts not in tables.bar_positions:
                raise ValueError(f"base id {ts} is not a TimeSig token")
        self.tables = tables
        self.plan = plan
        self.num_bars = len(plan.time_signatures)
        self.phase = START
        self.pos = -1
        self.bars_done = 0  # bars opened so far
        self.queue: list[int] = []  # forced ids still to emit
        self.acs_pending = False  # current bar's ACs wait for its TimeSig
        self.done = False
        self.remaining = budget
        # First bar (index in the plan) written while the budget forced the row to close: it and
        # every later bar may have been cut short. None: the budget never constrained the row.
        self.starved_from: int | None = None
        self._state: tuple[tuple, np.ndarray] | None = None  # (key, mask) of the current state
        # fewest ids to generate bars k.. (opening each bar + its ACs)
        cost = [tables.bar_cost(ts) + len(acs) for ts, acs in zip(plan.time_signatures, plan.bar_acs)]
        self._future = np.concatenate([np.cumsum(cost[::-1])[::-1], [0]]).tolist()
        if budget < self.need():
            raise ValueError(
                f"token budget {budget} is below the {self.need()} ids that {self.num_bars} bar(s) need at least"
            )

    def need(self) -> int:
        """Fewest ids that can still finish this row (the end token included)."""
        pending = len(self.plan.bar_acs[self.bars_done - 1]) if self.acs_pending else 0
        return _COMPLETION_LIST[self.phase] + len(self.queue) + pending + self._future[self.bars_done] + 1

    def key(self) -> tuple:
        plan, b = self.plan, self.bars_done
        forced = self.queue[0] if self.queue else -1
        cur_ts = plan.time_signatures[b - 1] if b > 0 else -1
        can_open = b < self.num_bars
        next_ts = plan.time_signatures[b] if can_open else -1
        next_acs = can_open and len(plan.bar_acs[b]) > 0
        tight = self.remaining - self.need() < _TIGHT_MARGIN + 1
        return (
            self.phase,
            self.pos,
            cur_ts,
            self.acs_pending,
            next_ts,
            next_acs,
            not can_open,
            plan.end_id,
            plan.drums,
            tight,
            forced,
            *(plan.pitch_range or (-1, -1)),
            plan.monophonic,
        )

    def _current(self) -> tuple[tuple, np.ndarray]:
        if self._state is None:
            key = self.key()
            if key[9] and self.starved_from is None:  # tight: only ids that close the row are allowed
                self.starved_from = max(0, self.bars_done - 1)
            self._state = (key, self.tables.mask(key))
        return self._state

    def starved_bars(self) -> list[int]:
        """Bars (indices in the plan) that may have been cut short by the token budget."""
        return [] if self.starved_from is None else list(range(self.starved_from, self.num_bars))

    def allowed(self) -> np.ndarray:
        """Boolean mask over model ids of what may come next."""
        return self._current()[1]

    def blocked(self, size: int, device: torch.device) -> torch.Tensor:
        """`GrammarTables.blocked` for the current state."""
        return self.tables.blocked(self._current()[0], size, device)

    def advance(self, model_id: int) -> None:
        """Consume one generated id; raises if the grammar did not allow it."""
        if self.done:
            raise RuntimeError("the row is already finished")
        if not self._current()[1][model_id]:
            bases = self.tables.vocab.model_to_base[model_id] if model_id < self.tables.size else ()
            tokens = [self.tables.vocab.token_of[b] for b in bases]
            raise ValueError(f"id {model_id} {tokens} not allowed in phase {PHASES[self.phase]}")
        self._state = None
        self.remaining -= 1
        if self.queue:
            self.queue.pop(0)
            return
        if model_id == self.plan.end_id:
            self.done = True
            return
        t = self.tables
        if t.opens_bar_list[model_id]:
            self.bars_done += 1
            self.pos = -1
            self.acs_pending = len(self.plan.bar_acs[self.bars_done - 1]) > 0
        new_phase = t.exit_list[self.phase][model_id]
        last_pos = t.last_pos_list[model_id]
        if last_pos >= 0:
            self.pos = last_pos
        if self.acs_pending and new_phase == HEAD:
            self.queue = list(self.plan.bar_acs[self.bars_done - 1])
            self.acs_pending = False
        self.phase = new_phase
