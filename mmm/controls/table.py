"""Attribute controls (ACs) by name: the one table between control values and AC token ids.

`Controls` reads the tokenizer's AC families and names them (``note_density``,
``pitch_classes``, ...). It encodes values given to the generation API into the base ids that
training sequences hold (`bar_ids`, `track_ids`), and decodes AC ids back into values
(`values`): evaluation and the server name what they measure with it.

Measuring ACs on notes (miditok's classes, giving ids) is `mmm.controls.measure`; this module only
translates between ids and values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from miditok import MMM as MMMTokenizer

from mmm.tokenizer import Vocab

_DURATIONS = {
    "Whole": "whole",
    "Half": "half",
    "Quarter": "quarter",
    "Eight": "eighth",
    "Sixteenth": "sixteenth",
    "ThirtySecond": "thirty_second",
}
_CONTROL_NAMES = {
    "ACBarOnsetPolyphonyMin": "polyphony_min",
    "ACBarOnsetPolyphonyMax": "polyphony_max",
    "ACBarPitchClass": "pitch_classes",
    "ACBarNoteDensity": "note_density",
    "ACBarNoteDuration": "note_durations",
    "ACTrackOnsetPolyphonyMin": "polyphony_min",
    "ACTrackOnsetPolyphonyMax": "polyphony_max",
    "ACTrackNoteDensityMin": "note_density_min",
    "ACTrackNoteDensityMax": "note_density_max",
    "ACTrackNoteDuration": "note_durations",
    "ACTrackRepetition": "repetition",
}


@dataclass
class _Control:
    name: str
    family: int  # order of emission
    kind: str  # "int" | "set" | "durations" | "float"
    values: dict = field(default_factory=dict)  # value -> base id ("durations": name -> [id_0, id_1])
    order: int = 0  # order inside the family (min before max)
    at_least: bool = False  # the top int value means "this many or more" (e.g. note density 18+)

    def describe(self) -> str:
        if self.kind == "int":
            lo, hi = min(self.values), max(self.values)
            text = f"int {lo}..{hi}" if len(self.values) == hi - lo + 1 else f"int among {sorted(self.values)}"
            return f"{self.name}: {text}" + (f" ({hi} means {hi} or more)" if self.at_least else "")
        if self.kind == "set":
            return f"{self.name}: list of ints among {sorted(self.values)}"
        if self.kind == "durations":
            return f"{self.name}: list among {list(self.values)}"
        return f"{self.name}: float in [0, 1] (snapped to {sorted(self.values)})"


class Controls:
    """Attribute controls by name, validated against the tokenizer's AC families.

    Bar level (``controls=``): polyphony_min, polyphony_max (onset polyphony), pitch_classes
    (list of 0..11), note_density (notes in the bar), note_durations (list of whole, half,
    quarter, eighth, sixteenth: the durations present). Track level (``track_controls=``):
    polyphony_min, polyphony_max, note_density_min, note_density_max (notes per bar),
    note_durations, repetition (0..1, snapped to the tokenizer's bins).
    """

    def __init__(self, tokenizer: MMMTokenizer, vocab: Vocab, seen: Sequence[int] | None = None) -> None:
        """`seen`: the AC base ids that occurred in the model's training data (from the checkpoint);
        a value never seen there is refused. None: every value of the vocabulary is accepted."""
        self.vocab = vocab
        self.bar: dict[str, _Control] = {}
        self.track: dict[str, _Control] = {}
        for family, ac in enumerate(tokenizer.attribute_controls):
            level = self.bar if family in vocab.bar_acs else self.track
            computed = getattr(ac, "factors", None)
            for token in ac.tokens:
                type_, value = token.split("_", 1)
                base_id = tokenizer.vocab[token]
                duration = next((d for d in _DURATIONS if type_.endswith("NoteDuration" + d)), None)
                if duration is not None:
                    durations = list(_DURATIONS)[: len(computed) if computed is not None else len(_DURATIONS)]
                    if duration not in durations:
                        continue  # miditok never computes it: the model never saw it set
                    prefix = type_[: -len(duration)]
                    ctl = level.setdefault(
                        _CONTROL_NAMES[prefix], _Control(_CONTROL_NAMES[prefix], family, "durations")
                    )
                    ctl.values.setdefault(_DURATIONS[duration], [None, None])[int(value)] = base_id
                    continue
                name = _CONTROL_NAMES.get(type_)
                if name is None:
                    continue
                kind = "set" if type_ == "ACBarPitchClass" else "float" if type_ == "ACTrackRepetition" else "int"
                ctl = level.setdefault(name, _Control(name, family, kind, order=int(type_.endswith("Max"))))
                if kind == "float":
                    ctl.values[float(value)] = base_id
                else:
                    ctl.values[int(value.rstrip("+"))] = base_id
                    ctl.at_least |= value.endswith("+")
        if seen is not None:
            self._keep_seen(set(seen))
        self._decode = self._inverse()

    def _keep_seen(self, seen: set[int]) -> None:
        for table in (self.bar, self.track):
            for name, ctl in list(table.items()):
                top = max(ctl.values) if ctl.kind == "int" else None
                ctl.values = {
                    k: v for k, v in ctl.values.items() if all(i in seen for i in (v if isinstance(v, list) else [v]))
                }  # durations: two ids
                if not ctl.values:
                    del table[name]
                ctl.at_least = ctl.at_least and top in ctl.values  # "18 or more" only if 18+ was seen

    def table(self, level: str) -> dict[str, _Control]:
        """The controls of `level` ("bar" or "track") by name, in the order of their families."""
        return self.bar if level == "bar" else self.track

    def describe(self, level: str) -> str:
        return (
            "; ".join(c.describe() for c in self.table(level).values())
            or "(none: this tokenizer has no attribute controls)"
        )

    # --- values -> ids -----------------------------------------------------------------------
    def _ids(self, level: str, controls: Mapping[str, Any]) -> list[int]:
        table = self.table(level)
        arg = "controls" if level == "bar" else "track_controls"
        if not isinstance(controls, Mapping):
            raise ValueError(f"{arg} must be a mapping of control name -> value, got {controls!r}")
        out: list[tuple[int, int, int, int]] = []  # (family, order, rank, id)
        for name, value in controls.items():
            ctl = table.get(name)
            if ctl is None:
                raise ValueError(
                    f"{arg}: unknown control {name!r}; valid {level}-level controls: {self.describe(level)}"
                )
            bad = ValueError(f"{arg}: invalid value {value!r} for {ctl.describe()}")
            if ctl.kind == "int":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in ctl.values:
                    raise bad
                out.append((ctl.family, ctl.order, 0, ctl.values[int(value)]))
            elif ctl.kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise bad
                nearest = min(ctl.values, key=lambda b: abs(b - value))
                out.append((ctl.family, ctl.order, 0, ctl.values[nearest]))
            elif ctl.kind == "set":
                if isinstance(value, (str, Mapping)) or not isinstance(value, (Sequence, set, frozenset)):
                    raise bad
                items = list(value)
                if not items or any(
                    isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) not in ctl.values
                    for x in items
                ):
                    raise bad
                out.extend(
                    (ctl.family, ctl.order, int(x), ctl.values[int(x)]) for x in sorted(set(int(x) for x in items))
                )
            else:  # durations: emit every family token, 1 for the listed durations
                if isinstance(value, (str, Mapping)) or not isinstance(value, (Sequence, set, frozenset)):
                    raise bad
                if any(x not in ctl.values for x in value):
                    raise bad
                for rank, (dname, ids) in enumerate(ctl.values.items()):
                    out.append((ctl.family, ctl.order, rank, ids[int(dname in value)]))
        return [i for *_, i in sorted(out)]

    def track_ids(self, track_controls: Mapping[str, Any] | None) -> list[int]:
        """Base ids of the track ACs, in the order training sequences hold them."""
        return self._ids("track", track_controls) if track_controls else []

    def bar_ids(self, controls: Mapping | None, bars: Sequence[int]) -> dict[int, list[int]]:
        """Base ids of the bar ACs of each bar in `bars` (absolute indices). `controls` is one
        mapping for every bar, or ``{bar_index: mapping}``."""
        if not controls:
            return {}
        if not isinstance(controls, Mapping):
            raise ValueError(f"controls must be a mapping, got {controls!r}")
        keys = list(controls)
        per_bar = all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys)
        if per_bar:
            outside = sorted(set(int(k) for k in keys) - set(bars))
            if outside:
                raise ValueError(
                    f"controls given for bar(s) {outside} that are not generated (generated bars: {list(bars)})"
                )
            return {int(k): self._ids("bar", v) for k, v in controls.items() if v}
        if any(isinstance(k, (int, np.integer)) for k in keys):
            raise ValueError("controls: give either one mapping of controls, or {bar_index: mapping}, not both")
        ids = self._ids("bar", controls)
        return {b: ids for b in bars}

    # --- ids -> values -----------------------------------------------------------------------
    def _inverse(self) -> dict[int, tuple[_Control, Any]]:
        """Base id -> (control, value); a durations id gives (duration name, 0 or 1)."""
        inverse: dict[int, tuple[_Control, Any]] = {}
        for table in (self.bar, self.track):
            for ctl in table.values():
                for value, ids in ctl.values.items():
                    if ctl.kind != "durations":
                        inverse[ids] = (ctl, value)
                        continue
                    for flag, i in enumerate(ids):
                        if i is not None:
                            inverse[i] = (ctl, (value, flag))
        return inverse

    def values(self, ids: Sequence[int]) -> dict[str, Any]:
        """{name: value} of the AC base ids of one level (one bar's, or one track's), as
        `bar_ids`/`track_ids` take them: sets and durations as frozensets. Other ids, and values
        this table does not hold, are skipped."""
        out: dict[str, Any] = {}
        for i in ids:
            entry = self._decode.get(int(i))
            if entry is None:
                continue
            ctl, value = entry
            if ctl.kind in ("int", "float"):
                out[ctl.name] = value
            elif ctl.kind == "set":
                out.setdefault(ctl.name, set()).add(value)
            else:
                dname, flag = value
                names = out.setdefault(ctl.name, set())
                if flag:
                    names.add(dname)
        return {k: frozenset(v) if isinstance(v, set) else v for k, v in out.items()}

    def bins(self, level: str, name: str) -> list[float] | None:
        """The ordered values of an "int", "float" or "set" control (None for durations)."""
        ctl = self.table(level)[name]
        return None if ctl.kind == "durations" else sorted(ctl.values)

    def empty_value(self, level: str, name: str) -> Any:
        """The value of a control on a bar without notes (None: undefined, a miss)."""
        ctl = self.table(level)[name]
        if ctl.kind == "int" and name == "note_density" and 0 in ctl.values:
            return 0
        return None
