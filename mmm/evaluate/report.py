"""What an evaluation writes: JSON-safe metrics, the PNG plots and the Markdown report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmm.evaluate.metrics import MUSICAL_STATS


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN -> null, numpy scalars -> python, floats rounded to 6 decimals."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.integer | bool):
        return obj if isinstance(obj, bool) else int(obj)
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) or math.isinf(obj) else round(float(obj), 6)
    return obj


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def plot(metrics: dict, stats_values: Mapping[str, Mapping[str, list[float]]], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    lik = metrics["likelihood"]
    names = [n for n in ("model", "bigram", "unigram") if n in lik]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key in zip(axes, ("bits_per_token", "bits_per_note", "bits_per_bar")):
        values = [lik[n][key] or 0 for n in names]
        ax.bar(names, values, color=["C0", "C1", "C2"][: len(names)])
        ax.set_title(key.replace("_", " "))
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"test-split likelihood ({metrics['data']['sequences']} sequences)")
    fig.tight_layout()
    fig.savefig(out_dir / "likelihood.png", dpi=100)
    plt.close(fig)
    files.append("likelihood.png")

    controls = [
        (level, name, c) for level in ("bar", "track") for name, c in metrics["controls"].get(level, {}).items()
    ]
    if controls:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(controls)), 3.5))
        x = np.arange(len(controls))
        ax.bar(x - 0.2, [c["with_control"]["exact"] or 0 for *_, c in controls], 0.4, label="with control")
        ax.bar(x + 0.2, [c["without_control"]["exact"] or 0 for *_, c in controls], 0.4, label="without (baseline)")
        ax.set_xticks(x, [f"{lv}\n{n}" for lv, n, _ in controls], fontsize=7)
        ax.set_ylabel("exact-bin accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "controls_accuracy.png", dpi=100)
        plt.close(fig)
        files.append("controls_accuracy.png")
        ordinal = [(lv, n, c) for lv, n, c in controls if c["kind"] in ("int", "float") and c["pairs"]]
        if ordinal:
            cols = min(4, len(ordinal))
            rows = -(-len(ordinal) // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
            for ax, (lv, n, c) in zip(axes.flat, ordinal):
                req = np.array([p[0] for p in c["pairs"]], dtype=float)
                for k, label, marker in ((1, "with", "o"), (2, "without", "x")):
                    ach = np.array([np.nan if p[k] is None else p[k] for p in c["pairs"]], dtype=float)
                    jitter = (np.random.default_rng(k).random(len(req)) - 0.5) * 0.15 * (np.ptp(req) or 1) / 5
                    ax.scatter(req + jitter, ach, s=12, marker=marker, label=label, alpha=0.7)
                lo, hi = np.nanmin(req), np.nanmax(req)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                ax.set_title(f"{lv} {n}", fontsize=9)
                ax.set_xlabel("requested", fontsize=8)
                ax.set_ylabel("achieved", fontsize=8)
            for ax in list(axes.flat)[len(ordinal) :]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / "controls_scatter.png", dpi=100)
            plt.close(fig)
            files.append("controls_scatter.png")

    if any(stats_values["real"].get(m) for m in MUSICAL_STATS):
        fig, axes = plt.subplots(2, 3, figsize=(11, 6))
        legend = False
        for ax, m in zip(axes.flat, MUSICAL_STATS):
            real = [x for x in stats_values["real"].get(m, []) if not math.isnan(x)]
            gen = [x for x in stats_values["generated"].get(m, []) if not math.isnan(x)]
            both = real + gen
            if both:
                edges = np.linspace(min(both), max(both) + 1e-9, 11)
                ax.hist(real, edges, alpha=0.5, label="real", density=True)
                ax.hist(gen, edges, alpha=0.5, label="generated", density=True)
                if not legend:
                    ax.legend(fontsize=8)
                    legend = True
            ov = metrics["musical_stats"][m]["overlap"]
            ax.set_title(f"{m} (overlap {_fmt(ov, 2)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "musical_stats.png", dpi=100)
        plt.close(fig)
        files.append("musical_stats.png")
    return files


def summary_lines(metrics: dict) -> list[str]:
    """The headline: does the model beat the baselines, is every output well formed."""
    lik, st = metrics["likelihood"], metrics["structure"]["all"]
    model = lik["model"]["bits_per_note"]
    best = min(("bigram", "unigram"), key=lambda n: lik[n]["bits_per_note"] or math.inf)
    beats = model is not None and lik[best]["bits_per_note"] is not None and model < lik[best]["bits_per_note"]
    rates = [st[k] for k in ("decoded", "exact_bars", "untouched")]
    lines = [
        f"- bits/note: model {_fmt(model)} vs {best} {_fmt(lik[best]['bits_per_note'])}: "
        f"{'beats' if beats else 'does NOT beat'} both n-gram baselines."
    ]
    if st["outputs"] == 0:
        return [*lines, "- structure: no API request (num_requests=0)."]
    ok = all(r == 1.0 for r in rates)
    return [
        *lines,
        f"- structure over {st['outputs']} API outputs: decode {_fmt(rates[0])}, exact bar count "
        f"{_fmt(rates[1])}, untouched outside the span {_fmt(rates[2])}"
        + (" (all 100%)." if ok else " (NOT all 100%: see below)."),
    ]


RATES = ("bits_per_token", "bits_per_note", "bits_per_bar")


def _rates_row(label: str, rates: dict, keys: tuple[str, ...] = RATES) -> str:
    return f"| {label} | " + " | ".join(_fmt(rates[k]) for k in keys) + " |"


def report_markdown(metrics: dict, plots: list[str]) -> str:
    """The report: a headline, then one section per part of the evaluation."""
    data = metrics["data"]
    lines = [
        "# MMM evaluation",
        "",
        f"Checkpoint `{metrics['checkpoint']}` ({metrics['model']['parameters']:,} parameters, vocab "
        f"{metrics['model']['vocab_size']}, context {metrics['model']['max_seq_len']}); store `{data['store']}`, "
        f"split `{data['split']}`: {data['chunks']} chunks, {data['sequences']} sequences, "
        f"seed {metrics['settings']['seed']}.",
        "",
        *summary_lines(metrics),
        "",
        *_likelihood_section(metrics["likelihood"]),
        *_context_section(metrics["likelihood"]["infill_context"]),
        *listening_section(metrics.get("listening")),
        *_structure_section(metrics["structure"]),
        *_controls_section(metrics["controls"]),
        *_musical_section(metrics),
        *_plots_section(plots, metrics["timings"]),
    ]
    return "\n".join(lines)


def _likelihood_section(lik: dict) -> list[str]:
    lines = [
        "## Likelihood (test sequences)",
        "",
        "| model | nats/token | bits/token | bits/note | bits/bar |",
        "|---|---|---|---|---|",
        *[_rates_row(name, lik[name], ("nats_per_token", *RATES)) for name in ("model", "bigram", "unigram")],
    ]
    m = lik["model"]
    lines += [
        "",
        f"{m['tokens']} target tokens, {m['notes']} notes, {m['bars']} bars. Baselines fitted on "
        f"{lik['baselines']['train_sequences']} train-split sequences built like the test ones: "
        f"unigram {lik['baselines']['unigram']}; "
        f"bigram {lik['baselines']['bigram']}.",
        "",
    ]
    if "augmented" in lik:
        aug = lik["augmented"]
        lines += [
            "The same test draws with the training augmentation (pitch and velocity shifts: the model's "
            "training distribution), the baselines refitted on augmented training sequences.",
            "",
            "| augmented test sequences | bits/token | bits/note | bits/bar |",
            "|---|---|---|---|",
            *[_rates_row(name, aug[name]) for name in ("model", "bigram", "unigram")],
            "",
        ]
    return lines


CONDITION_LABELS = {
    "real": "the real prompt",
    "shifted": "the other tracks shifted one bar later",
    "other_piece": "the other tracks from another piece",
    "alone": "the target track alone",
}


def _context_section(ic: dict) -> list[str]:
    lines = [
        "### Bar infilling: does the fill listen to the other tracks?",
        "",
        f"The fill section's NLL of {ic['samples']} infill samples (mean {_fmt(ic['mean_context_tracks'], 1)} "
        "context tracks) after four prompts: the same target bars, ACs and random choices each time. "
        "A model that uses the other tracks does best after the real prompt.",
        "",
        "| prompt | bits/token | bits/note | bits/bar | bits/note vs the real prompt |",
        "|---|---|---|---|---|",
    ]
    for name, label in CONDITION_LABELS.items():
        rates = ic["conditions"][name]
        ratio = 1.0 if name == "real" else ic["ratio_to_real"][name]
        lines.append(_rates_row(label, rates)[:-1] + f"| {_fmt(ratio)}x |")
    return [*lines, ""]


LISTENING_COLUMNS = {
    "consonance": "consonance with the real other tracks",
    "onset_pitch_f1": "onset+pitch F1",
    "onset_f1": "onset F1",
    "onset_pitch_class_f1": "onset+pitch-class F1",
    "in_range": "pitches in the track's range ±3",
    "notes_per_original": "notes / original",
}


def listening_section(listening: dict | None) -> list[str]:
    if not listening:
        return []
    s = listening["settings"]
    lines = [
        "## Listening: infills judged against the real piece",
        "",
        f"{s['bars']} bars in the middle of every pitched track of {s['pieces']} "
        + s.get("what", f"test pieces (their first {s['window_bars']} bars)")
        + f", infilled without controls, seeds {s['seeds']}; F1 pooled over the spans; "
        "consonance: share of (generated onset, note sounding in another real track) pairs a consonance "
        "(interval class 0, 3, 4, 5, 7, 8 or 9).",
        "",
        "| | " + " | ".join(LISTENING_COLUMNS.values()) + " | spans |",
        "|---" * (len(LISTENING_COLUMNS) + 2) + "|",
    ]
    for name, row in listening["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row[k]) for k in LISTENING_COLUMNS) + f" | {row['spans']} |")
    if listening["failures"]:
        lines += ["", "Failed infills:", *[f"- `{f}`" for f in listening["failures"]]]
    return [*lines, ""]


def _structure_section(st: dict) -> list[str]:
    lines = [
        "## Structure (API outputs)",
        "",
        "| task | outputs | decode | exact bar count | untouched outside the span |",
        "|---|---|---|---|---|",
    ]
    for task, s in st.items():
        if task == "failures":
            continue
        lines.append(
            f"| {task} | {s['outputs']} | {_fmt(s['decoded'])} | {_fmt(s['exact_bars'])} | {_fmt(s['untouched'])} |"
        )
    if st["failures"]:
        lines += ["", "Failures:", *[f"- `{f}`" for f in st["failures"]]]
    return [*lines, ""]


def _controls_section(controls: dict) -> list[str]:
    lines = [
        "## Attribute-control adherence",
        "",
        "Requested values are drawn from the values each control takes in the evaluated split; the "
        "achieved value is recomputed on the output with miditok's classes. *without*: the same request "
        "(piece, span, seed) generated without the control.",
        "",
        "| level | control | n | exact (with / without) | ±1 bin (with / without) | Spearman (with / without) "
        "| Jaccard (with / without) |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in ("bar", "track"):
        for name, c in controls.get(level, {}).items():
            w, wo = c["with_control"], c["without_control"]
            lines.append(
                f"| {level} | {name} | {w['n']} | {_fmt(w['exact'])} / {_fmt(wo['exact'])} | "
                f"{_fmt(w.get('within_1'))} / {_fmt(wo.get('within_1'))} | "
                f"{_fmt(w.get('spearman'))} / {_fmt(wo.get('spearman'))} | "
                f"{_fmt(w.get('jaccard'))} / {_fmt(wo.get('jaccard'))} |"
            )
    return [*lines, ""]


def _musical_section(metrics: dict) -> list[str]:
    lines = [
        "## Musical statistics: generated vs real bars (uncontrolled infills)",
        "",
        "| statistic | real | generated | abs diff | histogram overlap | n real / generated |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in metrics["musical_stats"].items():
        lines.append(
            f"| {name} | {_fmt(s['real_mean'])} | {_fmt(s['generated_mean'])} | {_fmt(s['abs_diff'])} | "
            f"{_fmt(s['overlap'])} | {s['n_real']} / {s['n_generated']} |"
        )
    r = metrics["pitch_in_context_range"]
    return [
        *lines,
        "",
        f"Generated notes of uncontrolled infills within the target track's pitch range around the span "
        f"(+-3 semitones): {_fmt(r['within_3_semitones'])} of {r['generated_notes']}.",
        "",
    ]


def _plots_section(plots: list[str], g: dict) -> list[str]:
    return [
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        f"Run time {g['total_s']:.0f} s (likelihood {g['likelihood_s']:.0f} s, generation {g['generation_s']:.0f} s, "
        f"listening {g.get('listening_s', 0):.0f} s, {g['generated_tokens']} tokens generated at "
        f"{_fmt(g['tokens_per_s'], 0)} tokens/s).",
        "",
    ]
