"""The documentation: the Sphinx site builds with warnings as errors, a broken reference to mmm
fails it, and the commands and API calls the pages show are valid for the current code."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "_ext"))


def _installed(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):
        return False


needs_sphinx = pytest.mark.skipif(
    not _installed("sphinx", "furo"),
    reason="Sphinx and furo are not installed: `pip install -e '.[docs]'` to build and test the docs",
)


def sphinx_build(src: Path, out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`sphinx-build -W --keep-going` (as the Makefile/CI run it), in a fresh process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-b",
            "html",
            "-W",
            "--keep-going",
            "-q",
            "-E",
            "-d",
            str(out / "doctrees"),
            str(src),
            str(out / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.slow
@needs_sphinx
def test_site_builds_without_warnings(tmp_path: Path) -> None:
    result = sphinx_build(DOCS, tmp_path)
    assert result.returncode == 0, f"docs build failed:\n{result.stdout[-5000:]}\n{result.stderr[-10000:]}"
    html = tmp_path / "html"
    pages = [
        "index",
        "quickstart",
        "gallery",
        "gigamidi",
        "slurm",
        "token_format",
        "reliability",
        "api/generation",
        "api/model",
        "api/tokenizer",
        "api/pretrained",
        "api/training",
        "api/files",
        "api/render",
        "api/data",
        *(f"entry_points/{e}" for e in ("preprocess", "train_tokenizer", "train", "sample", "evaluate")),
    ]
    for page in pages:
        assert (html / f"{page}.html").is_file(), page
    train = (html / "entry_points" / "train.html").read_text()
    # Rendered from the YAML: a key, its default and its comment.
    assert "every_n_train_steps" in train and "validate_before_training" in train
    assert "log the untrained val loss at step 0" in train
    token = (html / "token_format.html").read_text()
    assert "FillBar_Start" in token and "Infill_Bar" in token
    api = (html / "api" / "generation.html").read_text()
    assert 'id="mmm.generation.api.MMM.infill"' in api and 'id="mmm.generation.api.MMM.add_track"' in api


@pytest.mark.slow
@needs_sphinx
def test_broken_mmm_reference_fails_the_build(tmp_path: Path) -> None:
    """With the real conf.py, a renamed function (autodoc of a missing name, a reference to it)
    fails the build, and these are its only warnings (the valid ones beside them pass)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        f"__file__ = {str(DOCS / 'conf.py')!r}\n"
        "exec(compile(open(__file__).read(), __file__, 'exec'))\n"
        "html_static_path, html_css_files = [], []\n"
    )
    (src / "index.rst").write_text(
        "Probe\n=====\n\n.. autofunction:: mmm.render.audio.render_wav\n\n.. autofunction:: mmm.render.audio.find_sound_font\n\n"
        "See :func:`mmm.render.audio.render_wav`, :class:`mmm.render.audio.AudioDependencyError` (not documented here), "
        ":func:`mmm.render.audio.render_wave` and :func:`symusic.Score.dump_midi` (not mmm's: ignored).\n"
    )
    result = sphinx_build(src, tmp_path / "out")
    assert result.returncode != 0
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    expected = ("find_sound_font", "mmm.render.audio.render_wave", "mmm.render.audio.AudioDependencyError")
    for name in expected:
        assert any(name in w for w in warnings), (name, result.stderr[-3000:])
    assert all(any(name in w for name in expected) for w in warnings), result.stderr[-3000:]


# --- the pages' examples against the code ---------------------------------------------------------
def code_blocks(language: str) -> list[tuple[str, str]]:
    """(page, code) of every `.. code-block:: <language>` in docs/**/*.rst."""
    blocks = []
    for page in sorted(DOCS.rglob("*.rst")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != f".. code-block:: {language}":
                continue
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            blocks.append((str(page.relative_to(DOCS)), inspect.cleandoc("\n".join(body))))
    return blocks


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, entry point, overrides) of every `python -m mmm.<entry> ...` in the pages."""
    commands = []
    for page, code in code_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            match = re.match(r"(?:srun )?python -m mmm\.(\w+)(.*)", line)
            if match is None or match[1] == "checkpoint":  # mmm.checkpoint takes plain arguments, not Hydra overrides
                continue
            args = [a for a in shlex.split(match[2]) if a not in ("-m", "--multirun")]
            if "--cfg" in args:
                args = args[: args.index("--cfg")]
            commands.append((page, match[1], args))
    return commands


def test_pages_show_commands() -> None:
    entries = {entry for _, entry, _ in documented_commands()}
    assert {"preprocess", "train_tokenizer", "train", "sample"} <= entries


@needs_sphinx
@pytest.mark.parametrize(
    "page,entry,args", documented_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60]
)
@pytest.mark.slow
def test_documented_command_composes(page: str, entry: str, args: list[str]) -> None:
    """Every override a page shows is one the configs accept (Hydra's compose API)."""
    from mmm_docs import CONFIGS, ENTRY_POINTS, compose

    config = ENTRY_POINTS[entry]
    if not (CONFIGS / f"{config}.yaml").is_file():
        pytest.skip(f"configs/{config}.yaml is not in this checkout yet")
    # A sweep (`a=1,2`) composes each value alone: keep the first one.
    overrides = [re.sub(r"^([^=\[]+=)([^\[\]{},]+),.*$", r"\1\2", a) for a in args]
    composed = compose(config, overrides)  # raises on an unknown key or a bad value
    assert composed.values


def python_calls() -> list[tuple[str, ast.Call, str]]:
    """(page, call, method name) of every `x.infill(...)`-like call in the pages' Python blocks."""
    calls = []
    for page, code in code_blocks("python"):
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                calls.append((page, node, name))
    return calls


def test_python_examples_match_the_api() -> None:
    """The pages' calls of the API bind to the current signatures (a renamed argument fails)."""
    from mmm.generation.api import MMM
    from mmm.render.audio import render_wav

    functions = {
        "from_pretrained": MMM.from_pretrained,
        "infill": MMM.infill,
        "add_track": MMM.add_track,
        "generate": MMM.generate,
        "save_pretrained": MMM.save_pretrained,
        "render_wav": render_wav,
    }
    checked = set()
    for page, call, name in python_calls():
        if name not in functions:
            continue
        signature = inspect.signature(functions[name])
        args = (
            [None] * len(call.args) if name in ("render_wav", "from_pretrained") else [None, *([None] * len(call.args))]
        )
        kwargs = {k.arg: None for k in call.keywords}
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            pytest.fail(f"{page}: `{ast.unparse(call)}` does not match {name}{signature}: {err}")
        checked.add(name)
    assert {"from_pretrained", "infill", "add_track", "generate", "render_wav"} <= checked


@needs_sphinx
def test_config_comment_parser() -> None:
    """Keys, trailing comments, comment lines above a key and file headers are read as meant."""
    from mmm_docs import load_file

    common = load_file("data/common.yaml")
    assert common.header.startswith("Settings shared by every data source")
    assert common.keys[("preprocess", "min_bars")].comment == "shorter pieces are rejected"
    assert common.keys[("split",)].comment.startswith("fractions of pieces")
    train = load_file("train.yaml")
    assert "Resume" in train.keys[("ckpt_path",)].comment  # the two lines above the key
    tokenizer = load_file("tokenizer/mmm.yaml")
    assert tokenizer.keys[("vocab_size",)].comment.startswith("BPE vocabulary size")
    assert "single definition" in tokenizer.header and "BPE vocabulary" not in tokenizer.header
    assert load_file("experiment/demo.yaml").global_package
