"""Sphinx directives that render the docs from the code and configs, so they cannot drift.

``.. mmm-config:: train``
    The config of an entry point composed with Hydra's compose API from ``configs/`` (every
    key, its default and its meaning), grouped by config group. The meaning is the YAML
    comment of the key (trailing ``# ...`` or the comment lines right above it), else a note
    from ``docs/config_notes.yaml``. A key with neither, or a note that no key uses any more
    (the key was renamed, removed, or got its own comment), is a build warning (an error
    with ``-W``).
``.. mmm-module-doc:: train``
    The docstring of ``mmm/<entry>.py`` (what the command does).
``.. mmm-reject-reasons::``
    Every reason preprocessing rejects a file for, read from the source.
``.. mmm-config-group:: data``
    Every option of a config group (``data=folder``...): its header comment and the keys it sets.
``.. mmm-experiments::``
    Every ``configs/experiment/*.yaml``: what it is and what it overrides.
``.. mmm-token-example::``
    A real infill and new-track training sequence built with ``mmm.data.sequences`` from a
    small synthetic score, with checks that it is what the format says.
``.. mmm-gallery::``
    The audio/piano-roll gallery listed in ``docs/gallery/gallery.json`` (made by
    ``experiments/gallery/make_gallery.py``).
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
NOTES_FILE = REPO / "docs" / "config_notes.yaml"
GALLERY_DIR = REPO / "docs" / "gallery"
ENTRY_POINTS = {  # entry point -> primary config
    "preprocess": "preprocess",
    "train_tokenizer": "tokenizer",
    "train": "train",
    "sample": "sample",
    "evaluate": "evaluate",
    "serve": "serve",
}
PLUGIN_CONFIGS = {"submitit_slurm", "submitit_local", "basic"}  # defaults coming from Hydra plugins

logger = logging.getLogger(__name__)


# --- YAML files with their comments -----------------------------------------------------------
@dataclass
class KeyDoc:
    path: tuple[str, ...]  # relative to the file's package
    comment: str
    line: int


@dataclass
class ConfigFile:
    """One YAML file of configs/: header comment, defaults list, keys with their comments."""

    rel: str  # e.g. "data/common.yaml"
    header: str
    defaults: list[Any]
    values: dict
    keys: dict[tuple[str, ...], KeyDoc] = field(default_factory=dict)
    global_package: bool = False

    @property
    def group(self) -> str:
        return str(Path(self.rel).parent) if "/" in self.rel else ""

    @property
    def name(self) -> str:
        return Path(self.rel).stem

    def package(self) -> tuple[str, ...]:
        if self.global_package or not self.group:
            return ()
        return tuple(self.group.split("/"))


_KEY_RE = re.compile(r"""^(?P<indent>\s*)(?P<key>"[^"]*"|'[^']*'|[A-Za-z0-9_./@-]+)\s*:(?:\s|$)""")


def _strip_comment(rest: str) -> tuple[str, str]:
    """Split `value  # comment` outside quotes."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].rstrip(), rest[i + 1 :].strip()
    return rest.rstrip(), ""


def _join(lines: list[str]) -> str:
    return " ".join(x for x in (line.strip() for line in lines) if x)


def read_config_file(path: Path) -> ConfigFile:
    text = path.read_text()
    lines = text.splitlines()
    values = yaml.safe_load(text) or {}
    rel = str(path.relative_to(CONFIGS))
    cfg = ConfigFile(rel=rel, header="", defaults=list(values.pop("defaults", []) or []), values=values)
    cfg.global_package = bool(lines) and lines[0].strip() == "# @package _global_"
    stack: list[tuple[int, str]] = []  # (indent, key)
    pending: list[str] = []  # comment lines right above the next key
    header_done = False
    in_defaults = False
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped:
            if not header_done and pending:
                cfg.header, pending, header_done = _join(pending), [], True
            pending = []
            continue
        if stripped.startswith("#"):
            if stripped != "# @package _global_":
                pending.append(stripped.lstrip("#").strip())
            continue
        match = _KEY_RE.match(line)
        if match is None:  # a list item or a continuation line
            pending = []
            continue
        indent = len(match["indent"])
        key = match["key"].strip("\"'")
        _, comment = _strip_comment(line[match.end() :])
        if not header_done:
            # The file's leading comment block: a header, unless its last sentence describes
            # this first key (the lines after the last one ending with a period).
            header_done = True
            ends = [i for i, text in enumerate(pending[:-1]) if text.endswith(".")]
            if pending and ends:
                cfg.header, pending = _join(pending[: ends[-1] + 1]), pending[ends[-1] + 1 :]
            elif pending:
                cfg.header, pending = _join(pending), []
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if indent == 0:
            in_defaults = key == "defaults"
        if not in_defaults:
            keypath = tuple(k for _, k in stack) + (key,)
            cfg.keys[keypath] = KeyDoc(keypath, _join(pending + ([comment] if comment else [])), number)
        stack.append((indent, key))
        pending = []
    return cfg


def load_file(rel: str) -> ConfigFile:
    return read_config_file(CONFIGS / rel)


def group_options(group: str) -> list[str]:
    folder = CONFIGS / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def selectable_options(group: str) -> list[str]:
    """Options of a group, without the shared bases that its other options include."""
    options = group_options(group)
    files = {o: load_file(f"{group}/{o}.yaml") for o in options}
    bases = {sub for f in files.values() for g, sub, _, _ in _default_entries(f) if g is None and sub != "_self_"}
    return [o for o in options if o not in bases or o == "default"]


def _default_entries(cfg: ConfigFile) -> list[tuple[str | None, str, bool, tuple[str, ...] | None]]:
    """(group or None, option, is_override, package) of a defaults list; `_self_` is (None,
    "_self_", ...). `package` is set by `group@package` (`@_here_`: the including file's)."""
    out = []
    for entry in cfg.defaults:
        if isinstance(entry, str):
            out.append((None, entry, False, None))
        elif isinstance(entry, dict):
            for key, value in entry.items():
                override = key.startswith("override ")
                group, _, package = key.removeprefix("override ").strip().lstrip("/").partition("@")
                where = None if not package else () if package in ("_here_", "_global_") else tuple(package.split("."))
                out.append((group, str(value), override, where))
    return out


# --- composed configs ----------------------------------------------------------------------
@dataclass
class Composed:
    """An entry point's composed config and where each key's documentation comes from."""

    name: str
    primary: ConfigFile
    values: dict  # the composed config, interpolations not resolved
    choices: dict[str, str]  # group -> option
    files: list[tuple[tuple[str, ...], ConfigFile]]  # (package, file) in composition order
    groups: list[str]  # groups of the primary defaults list, in order


def compose(config_name: str, overrides: list[str] | None = None) -> Composed:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import mmm.config  # noqa: F401  registers the mmm.* resolvers used by the configs

    primary = load_file(f"{config_name}.yaml")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
        choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if v is not None}
        values = OmegaConf.to_container(cfg, resolve=False)
        values.pop("hydra", None)
    files: list[tuple[tuple[str, ...], ConfigFile]] = []
    groups = []

    def add(group: str, option: str, package: tuple[str, ...] | None = None) -> None:
        if option in PLUGIN_CONFIGS or not (CONFIGS / group / f"{option}.yaml").is_file():
            return
        file = load_file(f"{group}/{option}.yaml")
        for sub_group, sub_option, _, sub_package in _default_entries(file):
            if sub_option == "_self_":
                continue
            add(sub_group or group, sub_option, sub_package)
        files.append((file.package() if package is None else package, file))

    for group, option, _, package in _default_entries(primary):
        if option == "_self_" or group is None:
            continue
        groups.append(group)
        add(group, choices.get(group, option), package)
    for extra in overrides or []:  # +experiment=x and other appended groups
        key, _, option = extra.lstrip("+~").partition("=")
        if "/" not in key and (CONFIGS / key).is_dir() and key not in groups:
            add(key, option)
    files.append(((), primary))
    return Composed(config_name, primary, values, choices, files, groups)


def load_notes() -> dict[str, str]:
    data = yaml.safe_load(NOTES_FILE.read_text()) if NOTES_FILE.is_file() else {}
    notes = {}
    for section in ("keys", "extra", "options"):
        for key, text in (data.get(section) or {}).items():
            notes[f"{section}:{key}"] = " ".join(str(text).split())
    return notes


def describe_key(
    fullpath: tuple[str, ...], files: list[tuple[tuple[str, ...], ConfigFile]], notes: dict[str, str], used: set[str]
) -> tuple[str, str | None]:
    """(description, the file that sets the key last)."""
    comment, source = "", None
    for package, file in files:
        rel = fullpath[len(package) :] if fullpath[: len(package)] == package else None
        if rel is None or rel not in file.keys:
            continue
        source = file.rel
        if file.keys[rel].comment:
            comment = file.keys[rel].comment
    note_key = "keys:" + ".".join(fullpath)
    note = notes.get(note_key)
    if note is not None and not comment:  # `keys:` notes stand in for missing YAML comments only
        used.add(note_key)
        comment = note
    extra_key = "extra:" + ".".join(fullpath)
    if extra_key in notes:  # `extra:` notes complete a comment that is not about this key alone
        used.add(extra_key)
        comment = f"{comment} {notes[extra_key]}".strip()
    if not comment and fullpath[-1] == "_target_":
        comment = "the class (or function) Hydra instantiates with the keys beside it"
    if not comment and fullpath[-1] == "_partial_":
        comment = "instantiate as a partial: the code supplies the remaining arguments"
    return comment, source


def _has_own_docs(value: Any, path: tuple[str, ...], files, notes) -> bool:
    """Does any key below `path` carry its own comment or note?"""
    if not isinstance(value, dict):
        return False
    for key, child in value.items():
        sub = path + (str(key),)
        for package, file in files:
            rel = sub[len(package) :] if sub[: len(package)] == package else None
            if rel is not None and rel in file.keys and file.keys[rel].comment:
                return True
        if any(f"{s}:" + ".".join(sub) in notes for s in ("keys", "extra")) or _has_own_docs(child, sub, files, notes):
            return True
    return False


def leaves(value: Any, path: tuple[str, ...], files, notes, used) -> list[tuple[tuple[str, ...], Any]]:
    """Rows of a config: scalars, lists, empty mappings, and documented mappings whose keys
    have no documentation of their own (shown as one row)."""
    if not isinstance(value, dict) or not value:
        return [(path, value)]
    if path and "_target_" not in value:
        own, _ = describe_key(path, files, notes, set())
        if own and not _has_own_docs(value, path, files, notes):
            return [(path, value)]
    rows = []
    for key, child in value.items():
        rows.extend(leaves(child, path + (str(key),), files, notes, used))
    return rows


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value.strip() != value else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- docutils helpers -------------------------------------------------------------------------
def inline(text: str) -> list[nodes.Node]:
    """Text with `code` spans as literal nodes."""
    out: list[nodes.Node] = []
    for i, part in enumerate(re.split(r"`+", text)):
        if part:
            out.append(nodes.literal(part, part) if i % 2 else nodes.Text(part))
    return out


def para(text: str) -> nodes.paragraph:
    p = nodes.paragraph()
    p.extend(inline(text))
    return p


def table(
    header: list[str], rows: list[list[nodes.Node | str]], widths: list[int], classes: list[str] | None = None
) -> nodes.table:
    tbl = nodes.table(classes=["mmm-config-table", "colwidths-given", *(classes or [])])
    group = nodes.tgroup(cols=len(header))
    tbl += group
    for w in widths:
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for h in header:
        entry = nodes.entry()
        entry += nodes.paragraph(text=h)
        row += entry
    head += row
    body = nodes.tbody()
    group += body
    for cells in rows:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            if isinstance(cell, str):
                entry += para(cell)
            else:
                entry += cell
            row += entry
        body += row
    return tbl


def literal(text: str) -> nodes.paragraph:
    p = nodes.paragraph()
    p += nodes.literal(text, text)
    return p


def target_id(*parts: str) -> str:
    return nodes.make_id("cfg-" + "-".join(parts))


def rubric(env, label: str, title: str, code: str = "", rest: str = "") -> nodes.rubric:
    """A rubric that `:ref:` can link to by `label` (registered in the std domain)."""
    node = nodes.rubric(ids=[label])
    if code:
        node += nodes.literal(code, code)
    if title:
        node += nodes.Text(title)
    if rest:
        node += nodes.Text(rest)
    try:
        std = env.domains.standard_domain  # Sphinx >= 8.1
    except AttributeError:
        std = env.get_domain("std")
    std.anonlabels[label] = (env.docname, label)
    std.labels[label] = (env.docname, label, (code + title + rest).strip())
    return node


# --- directives -------------------------------------------------------------------------------
class _ConfigDirective(SphinxDirective):
    def _used(self) -> set[str]:
        env = self.env
        if not hasattr(env, "mmm_used_notes"):
            env.mmm_used_notes = {}
        return env.mmm_used_notes.setdefault(env.docname, set())

    def _depend(self, *paths: Path) -> None:
        for path in paths:
            if path.exists():
                self.env.note_dependency(str(path))

    def warn(self, message: str) -> None:
        logger.warning(message, location=(self.env.docname, self.lineno), type="mmm", subtype="config")


def _key_rows(rows_in, files, notes, used, warn, prefix_len: int = 0) -> list[list]:
    rows = []
    for path, value in rows_in:
        description, source = describe_key(path, files, notes, used)
        if not description:
            where = f"configs/{source}" if source else "its YAML file"
            warn(
                f"config key {'.'.join(path)!r} has no description: add a `# comment` to it in {where} "
                f"or a note under `keys:` in docs/config_notes.yaml"
            )
        rows.append([literal(".".join(path[prefix_len:]) or "."), literal(format_value(value)), description])
    return rows


class ConfigDirective(_ConfigDirective):
    """Every key of an entry point's composed config."""

    required_arguments = 1
    option_spec = {"overrides": directives.unchanged, "optional": directives.flag}

    def run(self) -> list[nodes.Node]:
        entry = self.arguments[0]
        if entry not in ENTRY_POINTS:
            self.warn(f"mmm-config: unknown entry point {entry!r}; known: {', '.join(ENTRY_POINTS)}")
            return []
        config_name = ENTRY_POINTS[entry]
        path = CONFIGS / f"{config_name}.yaml"
        if not path.is_file():
            if "optional" in self.options:
                note = nodes.note()
                note += para(
                    f"`configs/{config_name}.yaml` is not in this version of mmm yet: its keys will "
                    "be listed here, from the file itself, once it exists."
                )
                return [note]
            self.warn(f"mmm-config: configs/{config_name}.yaml does not exist")
            return []
        overrides = (self.options.get("overrides") or "").split()
        composed = compose(config_name, overrides)

        self._depend(NOTES_FILE, *(CONFIGS / f.rel for _, f in composed.files))
        notes, used = load_notes(), self._used()
        out: list[nodes.Node] = []
        intro = [f"Composed from `configs/{config_name}.yaml`"]
        if composed.groups:
            intro.append(
                " with the default options "
                + ", ".join(f"`{g}={composed.choices.get(g, '?')}`" for g in composed.groups)
            )
        intro.append(f" (`python -m mmm.{entry} --cfg job` prints it).")
        header = composed.primary.header
        if header.startswith("python "):
            first, _, rest = header.partition(" # ") if " # " in header else (header, "", "")
            out.append(nodes.literal_block(first, first, language="bash"))
            if rest:
                out.append(para(rest))
        elif header:
            out.append(para(header))
        out.append(para("".join(intro)))
        values = composed.values
        top = [k for k in values if k not in composed.groups]
        sections: list[tuple[str, list[tuple[tuple[str, ...], Any]]]] = []
        if top:
            sections.append(("", [row for k in top for row in leaves(values[k], (k,), composed.files, notes, used)]))
        for group in composed.groups:
            if "/" in group:
                continue  # hydra/... groups are not part of the job config
            if group in values:
                sections.append((group, leaves(values[group], (group,), composed.files, notes, used)))
        for group, rows_in in sections:
            section_id = target_id(entry, group or "top")
            if group:
                option = composed.choices.get(group, "?")
                file = load_file(f"{group}/{option}.yaml")
                header = file.header or notes.get(f"options:{group}/{option}", "")
                if f"options:{group}/{option}" in notes:
                    used.add(f"options:{group}/{option}")
                others = ", ".join(o for o in selectable_options(group) if o != option) or "none"
                out.append(rubric(self.env, section_id, "", group, f" (default option {option}; others: {others})"))
                if header:
                    out.append(para(header))
            else:
                out.append(rubric(self.env, section_id, "Top-level keys"))
            rows = _key_rows(rows_in, composed.files, notes, used, self.warn)
            out.append(table(["key", "default", "meaning"], rows, [30, 24, 46]))
        hydra_keys = {
            p: d for p, d in composed.primary.keys.items() if p[0] == "hydra" and not _is_parent(p, composed.primary)
        }
        if hydra_keys:
            out.append(rubric(self.env, target_id(entry, "hydra"), "Hydra settings of this entry point"))
            rows = []
            for p, _doc in hydra_keys.items():
                value = _get(composed.primary.values, p)
                description, _ = describe_key(p, [((), composed.primary)], notes, used)
                if not description:
                    self.warn(
                        f"config key {'.'.join(p)!r} of configs/{config_name}.yaml has no description: "
                        "add a `# comment` or a note under `keys:` in docs/config_notes.yaml"
                    )
                rows.append([literal(".".join(p)), literal(format_value(value)), description])
            out.append(table(["key", "default", "meaning"], rows, [30, 24, 46]))
        return out


def entry_module(entry: str) -> Path:
    """The file of entry point `python -m mmm.<entry>`: a module, or a package's __init__.py."""
    path = REPO / "mmm" / f"{entry}.py"
    return path if path.is_file() else REPO / "mmm" / entry / "__init__.py"


def module_docstring(entry: str) -> str:
    """The module docstring of `mmm/<entry>.py`, read without importing it."""
    import ast

    path = entry_module(entry)
    if not path.is_file():
        return ""
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _get(values: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        values = values[k]
    return values


def _is_parent(path: tuple[str, ...], file: ConfigFile) -> bool:
    value = _get(file.values, path)
    return isinstance(value, dict) and bool(value)


def literal_blocks(app, what, name, obj, options, lines: list[str]) -> None:  # noqa: ARG001
    """The code base writes plain-text docstrings, where an indented block after a paragraph is
    code or a layout (never an RST block quote): make each such block a literal block."""

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    starts, inside = [], None  # inside: indentation of the line that opened the current block
    for i, line in enumerate(lines):
        if inside is not None:
            if line.strip() and indent(line) <= inside:
                inside = None
            else:
                continue
        if not line.strip():
            continue
        if line.rstrip().endswith("::") or line.lstrip().startswith(".. "):
            inside = indent(line)
        elif (
            i + 2 < len(lines)
            and not lines[i + 1].strip()
            and lines[i + 2].strip()
            and indent(lines[i + 2]) > indent(line)
        ):
            starts.append(i)
            inside = indent(line)
    for i in reversed(starts):
        if lines[i].rstrip().endswith(":"):
            lines[i] = lines[i].rstrip() + ":"
        else:
            lines[i + 1 : i + 1] = ["", " " * indent(lines[i]) + "::"]


class ModuleDocDirective(SphinxDirective):
    """The docstring of an entry-point module (what the command does), read from its source."""

    required_arguments = 1
    option_spec = {"optional": directives.flag}

    def run(self) -> list[nodes.Node]:
        from docutils.statemachine import StringList

        entry = self.arguments[0]
        path = entry_module(entry)
        if not path.is_file():
            if "optional" not in self.options:
                logger.warning(f"mmm-module-doc: no module mmm/{entry}.py", location=(self.env.docname, self.lineno))
            return []
        self.env.note_dependency(str(path))
        holder = nodes.container(classes=["mmm-module-doc"])
        lines = module_docstring(entry).splitlines()
        literal_blocks(None, "module", f"mmm.{entry}", None, None, lines)
        self.state.nested_parse(StringList(lines, str(path)), self.content_offset, holder)
        return [holder]


class ConfigGroupDirective(_ConfigDirective):
    """Every option of a config group and the keys each one sets."""

    required_arguments = 1
    option_spec = {"entry": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        group = self.arguments[0]
        options = group_options(group)
        if not options:
            self.warn(f"mmm-config-group: no config group {group!r} in configs/")
            return []
        base_config = ENTRY_POINTS[self.options.get("entry", "train")]
        composed = compose(base_config)
        notes, used = load_notes(), self._used()
        self._depend(NOTES_FILE, *(CONFIGS / group / f"{o}.yaml" for o in options))
        files = {o: load_file(f"{group}/{o}.yaml") for o in options}
        included = {
            sub for f in files.values() for g, sub, _, _ in _default_entries(f) if g is None and sub != "_self_"
        }
        default = composed.choices.get(group)
        out: list[nodes.Node] = []
        for option in options:
            file = files[option]
            rest = (
                f" (default of {base_config}.yaml)"
                if option == default
                else " (shared base, included by the other options)"
                if option in included
                else ""
            )
            out.append(rubric(self.env, target_id(group, option), "", f"{group}={option}", rest))
            note_key = f"options:{group}/{option}"
            text = file.header or notes.get(note_key, "")
            if note_key in notes:
                used.add(note_key)
            if not text:
                self.warn(
                    f"config option configs/{file.rel} has no description: start the file with a comment "
                    f"or add `{group}/{option}` under `options:` in docs/config_notes.yaml"
                )
            parts = [text] if text else []
            bases = [sub for g, sub, _, _ in _default_entries(file) if sub != "_self_"]
            if bases:
                parts.append(
                    "Includes "
                    + ", ".join(f"`{b}`" + (" (from the Hydra plugin)" if b in PLUGIN_CONFIGS else "") for b in bases)
                    + "."
                )
            if parts:
                out.append(para(" ".join(parts)))
            package = file.package()
            chain = [(package, files[b]) for b in bases if b in files] + [(package, file)]
            search = chain + composed.files  # fall back on the composed config's comments
            rows_in = []
            for key in file.values:
                rows_in.extend(leaves(file.values[key], package + (str(key),), chain, notes, used))
            if rows_in:
                rows = _key_rows(rows_in, search, notes, used, self.warn, prefix_len=0)
                out.append(table(["key", "value", "meaning"], rows, [30, 24, 46]))
            elif not bases:
                out.append(para("Sets no key."))
        return out


class ExperimentsDirective(_ConfigDirective):
    """Every experiment file: header and the overrides it holds."""

    def run(self) -> list[nodes.Node]:
        options = group_options("experiment")
        composed = compose("train")
        notes, used = load_notes(), self._used()
        self._depend(*(CONFIGS / "experiment" / f"{o}.yaml" for o in options))
        out: list[nodes.Node] = []
        for option in options:
            file = load_file(f"experiment/{option}.yaml")
            out.append(rubric(self.env, target_id("experiment", option), "", f"+experiment={option}"))
            if file.header:
                out.append(para(file.header))
            else:
                self.warn(f"configs/experiment/{option}.yaml has no header comment saying what it is")
            swaps = [f"`{g}={o}`" for g, o, _, _ in _default_entries(file) if g]
            if swaps:
                out.append(para("Selects " + ", ".join(swaps) + ", then sets:"))
            search = [((), file)] + composed.files
            rows_in = []
            for key in file.values:
                rows_in.extend(leaves(file.values[key], (str(key),), [((), file)] + composed.files, notes, used))
            out.append(
                table(["key", "value", "meaning"], _key_rows(rows_in, search, notes, used, self.warn), [30, 24, 46])
            )
        return out


# --- token format worked example ----------------------------------------------------------------
def token_example() -> dict[str, Any]:
    """Build a real infill sample and a new-track sample from a 4-bar synthetic score."""
    from symusic import Note, Score, Tempo, TimeSignature, Track

    from mmm.controls.measure import bar_controls, track_controls
    from mmm.data.layout import tokenize_bars
    from mmm.data.sequences import SampleSpec, TrackPart, assemble, encode_sample
    from mmm.tokenizer import Vocab, build_tokenizer

    params = yaml.safe_load((CONFIGS / "tokenizer" / "mmm.yaml").read_text())["params"]
    tokenizer = build_tokenizer(params)
    vocab = Vocab(tokenizer)
    tpq = 480
    score = Score(tpq)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, 120.0))
    piano, bass = Track("Piano", 0, False), Track("Bass", 33, False)
    melody = [(60, 64), (62, 65), (64, 67), (65, 69)]  # (melody, upper) pitches per bar
    for bar, (low, high) in enumerate(melody):
        start = bar * 4 * tpq
        piano.notes.append(Note(start, 2 * tpq, low, 80))  # a half-note dyad, then a half note
        piano.notes.append(Note(start, 2 * tpq, high, 80))
        piano.notes.append(Note(start + 2 * tpq, 2 * tpq, low + 2, 72))
        bass.notes.append(Note(start, 4 * tpq, low - 24, 90))
    score.tracks.extend([piano, bass])
    bars = tokenize_bars(score, tokenizer, vocab)
    names = [t.name for t in bars.score.tracks]
    piano_i, bass_i = names.index("Piano"), names.index("Bass")
    pre_piano = bars.score.tracks[piano_i]
    families = [
        i
        for i, f in enumerate(vocab.bar_acs)
        if type(tokenizer.attribute_controls[f]).__name__ in ("BarNoteDensity", "BarOnsetPolyphony")
    ]
    bar_acs = bar_controls(tokenizer, vocab, pre_piano, bars.score.tpq, bars.bar_ticks)
    track_acs = track_controls(tokenizer, vocab, pre_piano, bars.score.tpq, bars.bar_ticks)
    track_families = [
        i for i, f in enumerate(vocab.track_acs) if type(tokenizer.attribute_controls[f]).__name__ == "TrackNoteDensity"
    ]
    span = (1, 3)

    def parts(with_bar_acs: list[int]) -> dict[int, TrackPart]:
        target = TrackPart(program=bars.programs[piano_i], bars=[list(b) for b in bars.bars[piano_i]])
        target.bar_acs = {b: [i for f in families for i in bar_acs[b][f]] for b in with_bar_acs}
        target.track_acs = [i for f in track_families for i in track_acs[f]]
        return {
            piano_i: target,
            bass_i: TrackPart(program=bars.programs[bass_i], bars=[list(b) for b in bars.bars[bass_i]]),
        }

    infill = SampleSpec(task="infill", tracks=[bass_i, piano_i], target=piano_i, span=span)
    infill_words = assemble(infill, parts(list(range(*span))), vocab)
    infill_ids, infill_labels = encode_sample(infill_words, vocab)
    track = SampleSpec(task="track", tracks=[bass_i, piano_i], target=piano_i)
    track_words = assemble(track, parts([]), vocab)
    track_ids, track_labels = encode_sample(track_words, vocab)

    # The example must be what the format says: checked on every docs build.
    tok = vocab.token_of
    flat = [tok[i] for i in infill_ids]
    assert flat[0] == "BOS_None" and flat.count("Infill_Bar") == span[1] - span[0]
    fill = flat[flat.index("FillBar_Start") + 1 : flat.index("FillBar_End")]
    original = [tok[i] for b in range(*span) for i in bars.bars[piano_i][b]]
    assert [t for t in fill if not t.startswith("AC")] == original, "the filled bars are the original bars"
    assert flat[-1] == "FillBar_End"
    masked = {tok[int(i)] for i, label in zip(infill_ids, infill_labels) if label < 0}
    track_ac_tokens = {t for t in flat if t.startswith("ACTrack")}
    assert track_ac_tokens, "the example shows track controls"
    assert masked == {"Infill_Bar", "FillBar_Start"} | {t for t in fill if t.startswith("AC")} | track_ac_tokens, masked
    assert [tok[i] for i in track_ids][-1] == "Track_End"
    decoded = tokenizer.decode(
        [vocab.track_start, vocab.program_id[0], *(i for b in bars.bars[piano_i] for i in b), vocab.track_end]
    )
    assert len(decoded.tracks[0].notes) == len(pre_piano.notes), "the piano bars decode to the same notes"
    return {
        "vocab": vocab,
        "tokenizer": tokenizer,
        "score": score,
        "bars": bars,
        "span": span,
        "infill_words": infill_words,
        "infill_ids": infill_ids,
        "infill_labels": infill_labels,
        "track_words": track_words,
        "track_ids": track_ids,
        "track_labels": track_labels,
        "piano": piano_i,
        "bass": bass_i,
    }


def _render_words(words: list[list[int]], vocab, labels_ids, span: tuple[int, int] = (0, 0)) -> str:
    """One line per structural token; bars as one line per position, under a `# bar i` line."""
    tok = vocab.token_of
    masked = {int(i) for i, label in zip(*labels_ids) if label < 0}
    lines: list[str] = []
    bar_no, fill_no, in_fill = 0, span[0], False

    def name(i: int) -> str:
        return f"[{tok[i]}]" if i in masked else tok[i]

    for word in words:
        first = tok[word[0]]
        if first == "Track_Start":
            bar_no = 0
        if first == "FillBar_Start":
            in_fill = True
        if first == "Infill_Bar":
            lines.append(f"    {name(word[0])}" + " " * 30 + f"# bar {bar_no}: to be infilled")
            bar_no += 1
            continue
        if first != "Bar_None":
            lines.append(name(word[0]) if len(word) == 1 else " ".join(map(name, word)))
            continue
        lines.append(f"    # bar {fill_no} (infilled)" if in_fill else f"    # bar {bar_no}")
        groups: list[list[int]] = [[]]
        for i in word:
            if tok[i].startswith("Position_") and groups[-1]:
                groups.append([])
            groups[-1].append(i)
        for g, group in enumerate(groups):
            lines.append(("    " if g == 0 else "      ") + " ".join(map(name, group)))
        if in_fill:
            fill_no += 1
        else:
            bar_no += 1
    return "\n".join(lines)


class TokenExampleDirective(SphinxDirective):
    option_spec = {"part": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(CONFIGS / "tokenizer" / "mmm.yaml"))
        cache = getattr(self.env.app, "_mmm_token_example", None)
        if cache is None:
            cache = self.env.app._mmm_token_example = token_example()
        ex, vocab = cache, cache["vocab"]
        part = self.options.get("part", "infill")
        if part == "score":
            rows = []
            for i, track in enumerate(ex["score"].tracks):
                notes = ", ".join(f"{n.pitch}@{n.time // 480}q({n.duration // 480}q)" for n in track.notes)
                rows.append([literal(str(i)), f"{track.name} (program {track.program})", literal(notes)])
            return [table(["track", "instrument", "notes: pitch@onset(duration), in quarter notes"], rows, [8, 22, 70])]
        if part == "infill":
            text = _render_words(ex["infill_words"], vocab, (ex["infill_ids"], ex["infill_labels"]), ex["span"])
            n, masked = len(ex["infill_ids"]), int((ex["infill_labels"] < 0).sum())
            summary = f"{n} tokens, {masked} of them prompt-only (in brackets: no loss on them)."
        elif part == "track":
            text = _render_words(ex["track_words"], vocab, (ex["track_ids"], ex["track_labels"]))
            n, masked = len(ex["track_ids"]), int((ex["track_labels"] < 0).sum())
            summary = f"{n} tokens, {masked} of them prompt-only (in brackets)."
        else:
            logger.warning(f"mmm-token-example: unknown part {part!r}", location=(self.env.docname, self.lineno))
            return []
        block = nodes.literal_block(text, text, language="text")
        return [block, para(summary)]


# --- rejection reasons -----------------------------------------------------------------------
def reject_reasons() -> list[tuple[str, str, str]]:
    """(reason, where, message) of every `Rejected(...)` raised in mmm/, and the reasons
    preprocessing records itself (unreadable files, time-outs), read from the source."""
    import ast

    found: dict[str, tuple[list[str], list[str]]] = {}
    for path in sorted((REPO / "mmm").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                reason, message = None, ""
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rejected" and node.args:
                    if isinstance(node.args[0], ast.Constant):
                        reason = node.args[0].value
                        if len(node.args) > 1:
                            message = _message(node.args[1])
                elif isinstance(node, ast.Dict):
                    keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                    if "reason" in keys and "detail" in keys:
                        value = node.values[keys.index("reason")]
                        if isinstance(value, ast.Constant):
                            reason = value.value
                            message = _message(node.values[keys.index("detail")])
                if reason is None:
                    continue
                where = f"{path.relative_to(REPO).with_suffix('').as_posix().replace('/', '.')}.{func.name}"
                entry = found.setdefault(reason, ([], []))
                if where not in entry[0]:
                    entry[0].append(where)
                if message and message not in entry[1]:
                    entry[1].append(message)
    return [(r, ", ".join(w), "; ".join(m)) for r, (w, m) in sorted(found.items())]


def _message(node) -> str:
    import ast

    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}" for v in node.values
        )
    return ""


class RejectReasonsDirective(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        rows = []
        for path in (REPO / "mmm").rglob("*.py"):
            self.env.note_dependency(str(path))
        for reason, where, message in reject_reasons():
            rows.append([literal(reason), literal(where), literal(message) if message else ""])
        return [table(["reason", "checked in", "detail in the report"], rows, [18, 30, 52])]


# --- gallery -------------------------------------------------------------------------------------
class GalleryDirective(SphinxDirective):
    """Images and audio players of docs/gallery/gallery.json."""

    def run(self) -> list[nodes.Node]:
        manifest = GALLERY_DIR / "gallery.json"
        self.env.note_dependency(str(manifest))
        if not manifest.is_file():
            note = nodes.note()
            note += para(
                "The gallery has not been generated in this checkout: run "
                "`python experiments/gallery/make_gallery.py` (see experiments/gallery/README.md)."
            )
            return [note]
        data = json.loads(manifest.read_text())
        out: list[nodes.Node] = []
        if data.get("about"):
            out.append(para(data["about"]))
        docdir = Path(self.env.doc2path(self.env.docname)).parent
        for item in data["items"]:
            out.append(nodes.rubric(text=item["title"], ids=[nodes.make_id("gallery-" + item["id"])]))
            if item.get("description"):
                out.append(para(item["description"]))
            if item.get("command"):
                out.append(nodes.literal_block(item["command"], item["command"], language="python"))
            last_label = None
            for media in item.get("media", []):
                path = GALLERY_DIR / media["file"]
                if not path.is_file():
                    logger.warning(
                        f"gallery: {path} listed in gallery.json is missing", location=(self.env.docname, self.lineno)
                    )
                    continue
                label = media.get("label", "")
                if label and label != last_label:
                    out.append(nodes.paragraph("", "", nodes.strong(label, label)))
                last_label = label
                if media["kind"] == "image":
                    rel = str(Path("gallery") / media["file"]) if docdir == REPO / "docs" else str(path)
                    out.append(nodes.image(uri=rel, alt=f"{item['title']}: {label}", classes=["mmm-gallery-image"]))
                else:
                    # Audio files are copied to _static/gallery/ when the build finishes.
                    src = f"_static/gallery/{media['file']}"
                    mime = {".ogg": "audio/ogg", ".mp3": "audio/mpeg"}.get(path.suffix, "audio/wav")
                    markup = (
                        f'<audio class="mmm-audio" controls preload="none">'
                        f'<source src="{html.escape(src)}" type="{mime}">'
                        f'<a href="{html.escape(src)}">{html.escape(media["file"])}</a></audio>'
                    )
                    out.append(nodes.raw("", markup, format="html"))
        return out


def _copy_gallery_audio(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html" or not GALLERY_DIR.is_dir():
        return
    import shutil

    target = Path(app.outdir) / "_static" / "gallery"
    target.mkdir(parents=True, exist_ok=True)
    for path in GALLERY_DIR.iterdir():
        if path.suffix in (".ogg", ".mp3", ".wav", ".mid"):
            shutil.copy2(path, target / path.name)


# --- consistency ---------------------------------------------------------------------------------
def _purge(app: Sphinx, env, docname: str) -> None:
    getattr(env, "mmm_used_notes", {}).pop(docname, None)


def _merge(app: Sphinx, env, docnames, other) -> None:
    env.mmm_used_notes = {**getattr(env, "mmm_used_notes", {}), **getattr(other, "mmm_used_notes", {})}


def _check_notes(app: Sphinx, env) -> None:
    """A note about a key that no rendered config has is stale: the key was renamed or removed."""
    rendered = getattr(env, "mmm_used_notes", None)
    if not rendered:
        return  # no page renders a config (a partial build): nothing to compare with
    used = set().union(*rendered.values())
    for key in sorted(set(load_notes()) - used):
        logger.warning(
            f"docs/config_notes.yaml: {key!r} documents no key or option of any rendered config "
            "(renamed or removed?): fix or delete the note",
            type="mmm",
            subtype="config",
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("mmm-config", ConfigDirective)
    app.add_directive("mmm-config-group", ConfigGroupDirective)
    app.add_directive("mmm-module-doc", ModuleDocDirective)
    app.add_directive("mmm-reject-reasons", RejectReasonsDirective)
    app.add_directive("mmm-experiments", ExperimentsDirective)
    app.add_directive("mmm-token-example", TokenExampleDirective)
    app.add_directive("mmm-gallery", GalleryDirective)
    app.connect("autodoc-process-docstring", literal_blocks)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.connect("env-check-consistency", _check_notes)
    app.connect("build-finished", _copy_gallery_audio)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
