#!/usr/bin/env python3
"""Write docs/configuration.md from the config dataclasses and the shipped configs.

    python docs/make_configuration.py           # rewrite the page
    python docs/make_configuration.py --check   # exit 1 when the page is stale

Types come from the dataclasses' type hints, defaults from the library's own loader (each shipped
config loaded as its command loads it), comments from the shipped YAML line of each key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vera_cli import config as cfg  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
# As vera_cli/cli.py maps them: command, config class, the shipped config it loads by default.
COMMANDS = [
    ("pretrain", cfg.PretrainConfig, "pretrain"),
    ("adapt", cfg.AdaptConfig, "adapt-vera"),
    ("compare", cfg.CompareConfig, "compare"),
    ("experiment", cfg.ExperimentConfig, "experiment"),
]
INTRO = """\
Every command reads one YAML config: a shipped one by name (`--config pretrain-fast`) or a file
(`--config mine.yaml`). Options on the command line override it, and `--set key=value` overrides any
key (`--set train.label_smoothing=0.1`). A config may start from another with `extends: NAME` and
state only what differs; a file of yours that extends nothing (directly or through your other files)
starts from the command's own config below, so every key it leaves out has the value plain
`--print-config` shows. `vera config show NAME` prints a config resolved; `--print-config` on
pretrain, adapt, compare and experiment prints the effective config and stops.

`adapt` and `count-params` load `adapt-<method>` for `--method` or `--set adapter.method` (else
the `adapter.method` a `--config` file names, else `vera`); every `adapt-<method>` extends `adapt`. In an experiment file,
an `adapt:` section that changes the method should say `extends: adapt-<method>` to take that
method's learning rate. `experiment` holds a whole pretrain config under `pretrain.` and a
whole adapt config under `adapt.`. Below, each command's default config lists every key with its
type, its value as the command loads it and the comment on its line in the shipped YAML; each other
shipped config lists the keys it changes. The transfer-protocol keys (`exclude_classes`, `shots`,
`validation`, `min_steps`, `distill_*`, `train_head`, `head_lr`, compare's `lrs`, `head_lrs`,
`bases`, `select_by`) are explained in [protocols.md](protocols.md).
"""


def flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def hint(cls: type, dotted: str):
    for part in dotted.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def type_name(h) -> str:
    origin, args = typing.get_origin(h), typing.get_args(h)
    if origin is typing.Literal:
        names = [str(a) for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    return h.__name__


def shown(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def yaml_comments(text: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(header comment, {dotted key: comment on its line}, {section: config it extends}) of one YAML file."""
    header, notes, extends, stack, last = [], {}, {}, [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            column = len(line) - len(stripped)
            if not stack and not notes and not extends:
                header.append(stripped[1:].strip())
            elif last and column == last[1]:  # a comment continued on the next line, aligned
                notes[last[0]] += " " + stripped[1:].strip()
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":", 1)[0]
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if key == "extends":
            extends[path[: -len("extends")]] = stripped.split(":", 1)[1].split("#")[0].strip()
        # A key set without a comment hides the comment of the config it extends: that one was about its value.
        notes[path], last = "", None
        if " #" in line:
            notes[path] = line.split(" #", 1)[1].strip()
            last = (path, line.index(" #") + 1)
    return " ".join(header), notes, extends


def comments(name: str) -> dict[str, str]:
    """Each key's comment in config `name`, its own file first, then the configs it (or a section) extends."""
    _, notes, extends = yaml_comments(cfg.config_source(name)[1])
    found: dict[str, str] = {}
    for prefix, parent in extends.items():
        found.update({prefix + key: note for key, note in comments(parent).items()})
    found.update(notes)
    return found


def root(name: str) -> str:
    parent = cfg.read_yaml(*cfg.config_source(name)).get("extends")
    return root(parent) if parent else name


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(cls: type, name: str, base: dict | None = None) -> list[str]:
    """Every key of config `name` (or, given `base`, the keys whose value differs from it)."""
    values = flat(cfg.to_dict(cfg.load(cls, name, {})))
    notes = comments(name)
    lines = ["| key | type | value | comment |", "|---|---|---|---|"]
    for key, value in values.items():
        if base is None or base[key] != value:
            lines.append(f"| `{key}` | {cell(type_name(hint(cls, key)))} | `{cell(shown(value))}` | {cell(notes.get(key, ''))} |")
    return lines


def render() -> str:
    out = ["# Configuration reference", "",
           "<!-- Generated by `python docs/make_configuration.py` from vera_cli's config dataclasses and shipped"
           " configs (vera_cli/configs/). Do not edit by hand. -->", "", INTRO]
    names = cfg.config_names()
    others = {command: [n for n in names if root(n) in (command, default) and n != default]
              for command, _, default in COMMANDS}
    out += ["| command | config class | default config | other shipped configs |", "|---|---|---|---|"]
    for command, cls, default in COMMANDS:
        listed = ", ".join(f"`{n}`" for n in others[command])
        out.append(f"| `{command}` | `{cls.__name__}` | `{default}` | {listed} |")
    for command, cls, default in COMMANDS:
        out += ["", f"## {command}", "", f"> {yaml_comments(cfg.config_source(default)[1])[0]}", "",
                f"`vera {command}` loads `{default}` unless `--config` names another:", ""]
        out += table(cls, default)
        base = flat(cfg.to_dict(cfg.load(cls, default, {})))
        for name in others[command]:
            out += ["", f"### {name}", "", f"> {yaml_comments(cfg.config_source(name)[1])[0]}", "",
                    f"Keys that differ from `{default}`:", ""]
            out += table(cls, name, base)
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python docs/make_configuration.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
