"""Preprocessing cost curve: seconds vs number of files, at 1 and 2 workers.

    python experiments/preprocess/bench.py --write-readme   # full run: README table + cost_curve.png
    python experiments/preprocess/bench.py --quick          # a few minutes; figures on the last line
    python experiments/preprocess/bench.py --midi ../shared/midi --sizes 8 16 35

Files: the first N files (sorted by relative path, as `data=folder` reads them) of `--midi`,
symlinked into a temporary folder per N. Without `--midi`, the embedded Bach chorales
(`data=embedded`, `configs/data/embedded.yaml`): the bench builds the corpus the way the
pipeline does (music21 -> MIDI into `data/music21_midi`, once, about 30 s on 2 cores) or reuses it.

Each run is what a user runs: `preprocess(cfg.data, cfg.tokenizer)` with `data=folder
data.path=<subset> data.store=<fresh temporary store> data.preprocess.num_workers=<w>`
(the repository's configs, composed by Hydra), timed from the call to its return. Runs are
interleaved (every repeat goes through every size at 1 and 2 workers, sizes and worker order
alternating between repeats) so that machine load hits all of them alike. One uncounted
warm-up run comes first (the first call in a process pays lazy imports and caches). A fit
seconds = start-up + per-file x N per worker count gives the fixed and the per-file cost, and
the N from which 2 workers beat 1. The import cost a command-line user pays on top (`python -m
mmm.preprocess` starts a new interpreter) is measured once, in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEGAN = time.perf_counter()  # "took" counts the imports below (tens of seconds on a loaded machine)

from hydra import compose, initialize_config_dir

from mmm.data.sources import FolderSource, build_source
from mmm.data.store_writer import preprocess

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SIZES = (8, 16, 32, 64, 128)
QUICK_SIZES = (8, 32)
WORKERS = (1, 2)


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("preprocess", overrides=overrides)


def corpus(midi: Path | None, n: int) -> tuple[Path, list[str], str]:
    """(root, the first n relative names, description) of `--midi` or of the embedded corpus."""
    if midi is not None:
        source = FolderSource(midi)
        what = f"`{midi}`"
    else:
        # As `python -m mmm.preprocess data=embedded` builds it (converts once, then reuses the cache).
        source_cfg = config(["data=embedded"]).data.source
        print(
            f"no --midi: using the embedded corpus ({source_cfg.corpus}) in {source_cfg.cache_dir} "
            "(converting it from music21 first if it is not there)",
            flush=True,
        )
        try:
            source = build_source(dict(source_cfg))
        except Exception as e:
            sys.exit(
                f"could not build the embedded corpus ({type(e).__name__}: {e}); pass --midi <folder of MIDI files>"
            )
        what = f"the embedded corpus (`data=embedded`: music21 {source_cfg.corpus!r}, {len(source)} works)"
    names = [source[i].name for i in range(min(n, len(source)))]
    return source.root, names, what


def subset(root: Path, names: list[str], folder: Path) -> Path:
    """Symlink `names` (relative to `root`) into `folder`, keeping their relative paths."""
    for name in names:
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((root / name).resolve())
    return folder


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (the workers)."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def run(midi: Path, workers: int, store: Path) -> tuple[float, float, dict]:
    """One run of `python -m mmm.preprocess data=folder data.path=<midi> data.store=<store>
    data.preprocess.num_workers=<workers>`, in this process: (wall seconds, CPU seconds, report)."""
    cfg = config(
        ["data=folder", f"data.path={midi.resolve()}", f"data.store={store}", f"data.preprocess.num_workers={workers}"]
    )
    cpu, start = cpu_seconds(), time.perf_counter()
    report = preprocess(cfg.data, cfg.tokenizer)
    return time.perf_counter() - start, cpu_seconds() - cpu, report


def import_seconds() -> float:
    """Wall seconds of a new interpreter importing what `python -m mmm.preprocess` imports (second of two)."""
    code = "import hydra, mmm.preprocess"
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return times[-1]


def fit(xs: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, largest |residual| / y)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))


def load_note(loads: list[float]) -> str:
    """What the load during the run means for the absolute times (the bench's own workers load
    at most 2 cores)."""
    if max(loads) > (os.cpu_count() or 1) + 0.5:
        return ": other work shared the machine, so absolute times are depressed by that load"
    return ": no other work on the machine"


def break_even(fits: dict[int, tuple]) -> str:
    """Files from which 2 workers are faster than 1, by the fits."""
    (a1, b1, _), (a2, b2, _) = fits[1], fits[2]
    if b2 >= b1:
        return "never (2 workers are not faster per file)"
    n = (a2 - a1) / (b1 - b2)
    return "from the first file" if n < 1 else f"from about {n:.0f} files"


def plot(sizes, seconds, fits, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for w, color in zip(WORKERS, ("tab:blue", "tab:orange")):
        a, b, _ = fits[w]
        label = f"{w} worker{'s' if w > 1 else ''}"
        for n in sizes:
            ax.scatter([n] * len(seconds[w][n]), seconds[w][n], color=color, s=14)
        ax.plot([0, max(sizes)], [a, a + b * max(sizes)], color=color, label=f"{label}: {a:.1f} s + {b:.3f} s/file")
        bx.plot(sizes, [n / statistics.median(seconds[w][n]) for n in sizes], "o-", color=color, label=label)
    ax.set(xlabel="files", ylabel="seconds (each run; line: least squares)", xlim=(0, None), ylim=(0, None))
    bx.set(xlabel="files", ylabel="files/s (median)", xscale="log", ylim=(0, None))
    bx.set_xticks(list(sizes), [str(n) for n in sizes])
    bx.minorticks_off()
    for x in (ax, bx):
        x.grid(alpha=0.3)
        x.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--midi",
        type=Path,
        default=None,
        help="folder of .mid/.midi/.abc files (default: the embedded Bach chorales, built if absent)",
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help=f"numbers of files (default {SIZES})")
    ap.add_argument("--repeats", type=int, default=None, help="runs per size and worker count (default 2; --quick 1)")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 1 repeat")
    ap.add_argument(
        "--no-fsync",
        action="store_true",
        help="diagnosis only: make os.fsync a no-op (in the workers too: they are forked) to see "
        "what the store's flushes to disk cost; never with --write-readme",
    )
    ap.add_argument("--write-readme", action="store_true", help="write the results into README.md and cost_curve.png")
    args = ap.parse_args()
    if args.no_fsync:
        if args.write_readme:
            sys.exit("--no-fsync measures something users do not run: not with --write-readme")
        os.fsync = lambda fd: None  # mmm.files.atomic calls os.fsync through the module
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    repeats = args.repeats or (1 if args.quick else 2)
    load_start = os.getloadavg()

    root, names, what = corpus(args.midi, max(sizes))
    if len(names) < max(sizes):
        print(f"{what} has {len(names)} files: sizes above it are dropped", flush=True)
        sizes = sorted({min(n, len(names)) for n in sizes})
    if len(sizes) < 2:
        sys.exit("need at least two sizes for a cost curve")
    seconds = {w: {n: [] for n in sizes} for w in WORKERS}
    cpu = {w: {n: [] for n in sizes} for w in WORKERS}
    reports, loads = {}, []
    with tempfile.TemporaryDirectory(prefix="mmm_preprocess_bench_") as tmp:
        tmp = Path(tmp)
        folders = {n: subset(root, names[:n], tmp / f"files_{n}") for n in sizes}
        warm, _, _ = run(folders[sizes[0]], 1, tmp / "warmup_store")
        print(f"warm-up (first call in this process, {sizes[0]} files, 1 worker): {warm:.1f} s", flush=True)
        imports = import_seconds()
        print(f"imports of `python -m mmm.preprocess` in a new interpreter: {imports:.1f} s", flush=True)
        k = 0
        for r in range(repeats):
            for i, n in enumerate(sizes if r % 2 == 0 else sizes[::-1]):
                for w in WORKERS if (r + i) % 2 == 0 else WORKERS[::-1]:
                    k += 1
                    s, c, reports[n] = run(folders[n], w, tmp / f"store_{k}")
                    seconds[w][n].append(s)
                    cpu[w][n].append(c)
                    loads.append(os.getloadavg()[0])
                    print(
                        f"repeat {r + 1}/{repeats}: {n} files, {w} worker(s): {s:.1f} s wall, {c:.1f} s CPU, "
                        f"load {loads[-1]:.1f}",
                        flush=True,
                    )
    med = {w: {n: statistics.median(seconds[w][n]) for n in sizes} for w in WORKERS}
    fits = {w: fit(sizes, [med[w][n] for n in sizes]) for w in WORKERS}
    cpu_fits = {w: fit(sizes, [statistics.median(cpu[w][n]) for n in sizes]) for w in WORKERS}
    total = time.perf_counter() - BEGAN

    table = "\n".join(
        [
            "| files | kept | chunks | 1 worker: s (runs) | 2 workers: s (runs) | 1 worker files/s | 2 workers files/s "
            "| speed-up 2/1 | CPU s per file (1 / 2 workers) |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {n} | {reports[n]['kept']} | {sum(v['chunks'] for v in reports[n]['splits'].values())} "
                + "".join(f"| {med[w][n]:.1f} ({', '.join(f'{x:.1f}' for x in seconds[w][n])}) " for w in WORKERS)
                + "".join(f"| {n / med[w][n]:.2f} " for w in WORKERS)
                + f"| {med[1][n] / med[2][n]:.2f}x "
                + f"| {statistics.median(cpu[1][n]) / n:.2f} / {statistics.median(cpu[2][n]) / n:.2f} |"
                for n in sizes
            ),
        ]
    )
    fit_lines = "\n".join(
        f"- {w} worker{'s' if w > 1 else ''}: {fits[w][0]:.2f} s + {fits[w][1]:.3f} s per file "
        f"(largest residual {100 * fits[w][2]:.0f}% of a median); CPU time {cpu_fits[w][0]:.2f} s + "
        f"{cpu_fits[w][1]:.3f} s per file (residual {100 * cpu_fits[w][2]:.0f}%)"
        for w in WORKERS
    )
    load_line = (
        f"load average (1 min) {load_start[0]:.1f} at the start, {min(loads):.1f}-{max(loads):.1f} after the "
        f"runs, {os.getloadavg()[0]:.1f} at the end"
    )
    summary = (
        f"ratios: 2 workers / 1 worker {med[1][sizes[-1]] / med[2][sizes[-1]]:.2f}x at {sizes[-1]} files; "
        f"per-file {fits[1][1]:.3f} s (1 worker), {fits[2][1]:.3f} s (2 workers), CPU {cpu_fits[1][1]:.3f} s; "
        f"start-up {fits[1][0]:.2f} s / {fits[2][0]:.2f} s (+ imports {imports:.1f} s, first call {warm:.1f} s); "
        f"2 workers pay {break_even(fits)}; load {statistics.fmean(loads):.1f}; took {total:.0f} s"
    )
    print(table)
    print(fit_lines)
    print(load_line)
    if args.write_readme:
        import torch

        readme = HERE / "README.md"
        # The results go between the markers; what is before and after them (the hand-written
        # reading of the figures) is kept.
        text = readme.read_text()
        head = text.split("<!-- results -->")[0]
        tail = text.split("<!-- /results -->")[1] if "<!-- /results -->" in text else "\n"
        title = (
            f"mmm.preprocess on the first N files of {what.replace('`', '')}; "
            f"{os.cpu_count()} CPU cores, mean load {statistics.fmean(loads):.1f}"
        )
        plot(sizes, seconds, fits, HERE / "cost_curve.png", title)
        readme.write_text(
            f"{head}<!-- results -->\nFiles: the first N of {what}. {repeats} runs per cell, median shown. "
            f"Machine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}, Python "
            f"{sys.version.split()[0]}; {load_line}{load_note(loads)}. "
            f"The whole bench took {total / 60:.1f} min.\n\n{table}\n\n"
            f"Fit, seconds = start-up + per-file cost x files (least squares on the medians):\n\n{fit_lines}\n\n"
            f"2 workers pay {break_even(fits)} by the fits. Not in the curve: the first call in a process "
            f"took {warm:.1f} s for {sizes[0]} files (lazy imports), and a new interpreter importing "
            f"`mmm.preprocess` takes {imports:.1f} s, which `python -m mmm.preprocess` adds to every run.\n\n"
            f"![cost curve](cost_curve.png)\n<!-- /results -->{tail}"
        )
    print(summary)


if __name__ == "__main__":
    main()
