"""`vera report RUN`: a finished compare, adapt or experiment run as one page, in HTML and in Markdown.

The page holds the tables the terminal shows (the same rich tables, as real tables), the pictures as PNG
data URIs, the config and the command that repeats the run: nothing beside it, nothing fetched. Both files
are built whole in memory, then each is written atomically into the run as report.html and report.md,
replacing an earlier report and no other file.
"""

from __future__ import annotations

import base64
import html
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Union

from rich.table import Table
from rich.text import Text as RichText

from vera_cli import config as config_module
from vera_cli.bases import model_config, resolve_base, run_config
from vera_cli.checkpoint import METRICS_FILE
from vera_cli.comparison import METRICS, ROWS_FILE, TableLine, aggregate, base_line, grid, paired_groups, read_rows, setting_of
from vera_cli.config import CompareConfig, ExperimentConfig
from vera_cli.errors import VeraError
from vera_cli.files import read_json, read_jsonl, read_text, write_bytes_atomic
from vera_cli.grid_progress import PLAN_FILE, GridPlan
from vera_cli.metrics import AccuracyReport
from vera_cli.models import build_model
from vera_cli.param_count import count_params
from vera_cli.plot import X_AXES, comparison_figure, figure_png, require_matplotlib
from vera_cli.report import comparison_table, compare_table, cost_line, cost_table, count_tables, verdict_table
from vera_cli.run_plots import per_class_bars, training_curves
from vera_cli.runs import CONFIG_FILE, Run, open_run

KINDS = ("compare", "adapt", "experiment")
REPORT_FILES = ("report.html", "report.md")


@dataclass
class Heading:
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Code:
    text: str
    language: str


@dataclass
class Picture:
    png: bytes
    alt: str


Block = Union[Heading, Paragraph, Code, Picture, Table]


def write_report(path: str) -> list[Path]:
    """Write `path`'s report.html and report.md; returns their paths."""
    run = open_run(path, KINDS)
    require_matplotlib()
    kind = run.kind
    title = f"vera {kind} {run.path}"
    blocks = [*_header(run), *{"compare": _compare, "adapt": _adapt, "experiment": _experiment}[kind](run),
              Heading("Config"), Code(read_text(run.file(CONFIG_FILE)), "yaml")]
    pages = {name: text.encode() for name, text in zip(REPORT_FILES, (to_html(title, blocks), to_markdown(title, blocks)))}
    for name, data in pages.items():
        write_bytes_atomic(run.file(name), data)
    return [run.file(name) for name in pages]


def reproduce_command(run: Run) -> str:
    """The command that repeats `run` from its recorded config, into a new run directory beside it."""
    return (f"vera {run.kind} --config {shlex.quote(str(run.file(CONFIG_FILE)))} "
            f"--run-dir {shlex.quote(str(run.path) + '-again')}")


def _header(run: Run) -> list[Block]:
    status = run.status
    summary = _summary(run)
    facts = [f"{run.kind} run, {status.get('status')}", f"started {status.get('created', '?')}"]
    if isinstance(summary.get("wall_seconds"), (int, float)):
        facts.append(f"{summary['wall_seconds']:.1f} s of wall time")
    if summary.get("base_run"):
        facts.append(f"base {summary['base_run']}")
    return [Paragraph("; ".join(facts) + "."), Heading("Reproduce"),
            Paragraph("From the folder the run was made in (the config is the one at the end of this page):"),
            Code(reproduce_command(run), "bash")]


def _summary(run: Run) -> dict[str, Any]:
    summary = read_json(run.file("summary.json"))
    if not isinstance(summary, dict):
        raise VeraError(f"{run.file('summary.json')} is damaged (not a mapping): repeat the run")
    return summary


def _report(raw: Any, where: Path) -> AccuracyReport:
    try:
        return AccuracyReport.from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise VeraError(f"{where} is damaged (no accuracy report: {type(exc).__name__} {exc}): repeat the run") from exc


def _compare(run: Run) -> list[Block]:
    cfg = config_module.load_recorded(CompareConfig, run_config(run), str(run.file(CONFIG_FILE)))
    order = {point.name: index for index, point in enumerate(grid(cfg))}
    rows = sorted(read_rows(run.file(ROWS_FILE)), key=lambda row: order.get(row.name, len(order)))
    if not rows:
        raise VeraError(f"{run.file(ROWS_FILE)} holds no row: repeat the comparison")
    tests, bases = {}, {}
    for row in rows:
        where = run.file("rows") / row.name / "summary.json"
        summary = read_json(where)
        if row.overall is not None:  # a row whose learning rate lost on validation was never tested
            tests[row.name] = _report(summary.get("test") if isinstance(summary, dict) else None, where)
        bases.setdefault(row.base, _report(summary.get("base"), where))
    base_lines = [base_line({m: report.metric(m) for m in METRICS}, label) for label, report in bases.items()]
    table = aggregate(base_lines, rows, cfg.select_by, cfg.reference)
    plan = GridPlan.read(run.file(PLAN_FILE))
    cut = plan.cut_note() if plan else ""
    blocks: list[Block] = [Heading("Tables"),
                           compare_table(table, f"Comparison on {', '.join(cfg.classes)}", cfg.select_by, cut),
                           verdict_table(table, "Against the reference line, paired by seed", cfg.select_by,
                                         cfg.reference, cut),
                           Paragraph("A verdict compares a line with its reference seed by seed: the same seed draws the "
                                     "same training images for both, so what the seed does to both drops out of their "
                                     "difference. \"better\" or \"worse\" means the 95 % Student t-interval of the "
                                     "mean difference excludes zero; with one seed nothing can be concluded."),
                           cost_table(table, "What each line cost")]
    if plan is not None:
        blocks += [Heading("Time"), *(Paragraph(line[0].upper() + line[1:] + ".") for line in plan.lines())]
    blocks.append(Heading("Pictures"))
    for axis in X_AXES:
        if any(axis.value(line) is not None for line in table if line.method != "base"):
            blocks.append(Picture(figure_png(comparison_figure(table, cfg.classes, axis)),
                                  f"Test accuracy against {axis.label}"))
    members: dict[str, list[str]] = {}
    for row in rows:
        members.setdefault(setting_of(row), []).append(row.name)
    for key, entrants in paired_groups([line for line in table if line.method != "base" and line.selected]).items():
        shown = _per_class_lines(entrants, cfg.select_by)
        if not shown:
            continue
        label = ", ".join(f"{axis} {value}" for axis, value in zip(("shots", "base"), key) if value is not None)
        reports = {"base": bases[key[1]]}
        for line in shown:
            reports[line.name + (" (reference)" if line.verdict == "reference" else "")] = AccuracyReport.pooled(
                [tests[name] for name in members[line.setting]])
        title = "Per class, the mean over seeds" + (f" ({label})" if label else "")
        blocks.append(Picture(figure_png(per_class_bars(reports, title)), title))
    return blocks


def _per_class_lines(entrants: list[TableLine], select_by: str) -> list[TableLine]:
    """The lines the per-class chart shows beside the base: the reference and the best other line."""
    reference = [line for line in entrants if line.verdict == "reference"]
    others = [line for line in entrants if line.verdict != "reference" and line.mean[select_by] is not None]
    best = max(others, key=lambda line: line.mean[select_by], default=None)
    return reference + ([best] if best is not None else [])


def _adapt(run: Run) -> list[Block]:
    summary = _summary(run)
    where = run.file("summary.json")
    if "test" in summary and summary["test"] is None:
        raise VeraError(f"{run.path} was never tested (a comparison's row whose learning rate lost on validation): "
                        f"vera eval {run.path} measures it on the test split")
    base, test = _report(summary.get("base"), where), _report(summary.get("test"), where)
    method = str(summary.get("method", "adapted"))
    held_out = summary.get("held_out") or []
    title = f"{method} on {', '.join(test.chosen_classes)}: {run.path}"
    blocks: list[Block] = [Heading("Tables"), comparison_table({"base": base, method: test}, f"Adapted {run.path}", held_out),
                           Paragraph(f"{summary.get('trainable_parameters', 0):,} trainable parameters, adapter file "
                                     f"{summary.get('adapter_bytes', 0):,} bytes; {cost_line(summary)}."),
                           Heading("Pictures"), Picture(figure_png(per_class_bars({"base": base, method: test}, title)),
                                                        "Per-class test accuracy, base and adapted")]
    records = read_jsonl(run.file(METRICS_FILE))
    if records:
        blocks.append(Picture(figure_png(training_curves(records, title)), "Training loss and test accuracy per epoch"))
    return blocks


def _experiment(run: Run) -> list[Block]:
    cfg = config_module.load_recorded(ExperimentConfig, run_config(run), str(run.file(CONFIG_FILE)))
    model = model_config(resolve_base(cfg.base)) if cfg.base else cfg.pretrain.model
    return [Heading("Parameters"), *count_tables(count_params(build_model(model), cfg.adapt.adapter)),
            *_adapt(Run(run.file("adapt")))]


# Self-contained: every style here, no font, script or picture fetched from anywhere.
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; max-width: 1280px;
       margin: 2rem auto; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #eaeef2; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1.5rem 0 .4rem; }
table { border-collapse: collapse; font-size: .85rem; margin-bottom: .5rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { background: #f6f8fa; text-align: left; border-bottom: 2px solid #d0d7de; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody + tbody { border-top: 2px solid #d0d7de; }
caption { caption-side: bottom; text-align: left; color: #57606a; font-size: .8rem; padding-top: .4rem; }
.wide { overflow-x: auto; }
pre { background: #f6f8fa; padding: .8rem 1rem; overflow-x: auto; font-size: .85rem; border-radius: 6px; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: .85rem; }
.better { color: #1a7f37; font-weight: 600; }
.worse { color: #cf222e; font-weight: 600; }
"""


def to_html(title: str, blocks: list[Block]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", *_render(blocks, HTML_FORMS)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def to_markdown(title: str, blocks: list[Block]) -> str:
    return "\n\n".join([f"# {title}", *_render(blocks, MARKDOWN_FORMS)]) + "\n"


def _render(blocks: list[Block], forms: dict[type, Callable[[Any], str]]) -> list[str]:
    return [forms[Table if isinstance(block, Table) else type(block)](block) for block in blocks]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plain(value: Any) -> str:
    """A rich renderable's text without its markup ([bold], [green])."""
    if value is None:
        return ""
    if isinstance(value, RichText):
        return value.plain
    return RichText.from_markup(str(value)).plain


def table_cells(table: Table) -> tuple[list[str], list[list[str]], list[bool]]:
    """(headings, rows, whether each row ends a section) of a rich table, as plain text."""
    columns = [[_plain(cell) for cell in column.cells] for column in table.columns]
    rows = [list(row) for row in zip(*columns)]
    return [_plain(column.header) for column in table.columns], rows, [row.end_section for row in table.rows]


NUMBER = ' class="num"'
VERDICT = {"better": ' class="better"', "worse": ' class="worse"'}


def _html_table(table: Table) -> str:
    headings, rows, sections = table_cells(table)
    right = [column.justify == "right" for column in table.columns]

    def cells(tag: str, values: Iterable[str]) -> str:
        return "".join(f'<{tag}{NUMBER if align else VERDICT.get(value, "")}>{html.escape(value)}</{tag}>'
                       for value, align in zip(values, right))

    parts = [f"<h3>{html.escape(_plain(table.title))}</h3>" if table.title else "", '<div class="wide"><table>']
    if table.caption:
        parts.append(f"<caption>{html.escape(_plain(table.caption))}</caption>")
    if table.show_header:
        parts.append(f"<thead><tr>{cells('th', headings)}</tr></thead>")
    parts.append("<tbody>")
    for row, ends in zip(rows, sections):
        parts.append(f"<tr>{cells('td', row)}</tr>" + ("</tbody><tbody>" if ends else ""))
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _markdown_table(table: Table) -> str:
    headings, rows, _ = table_cells(table)

    def line(values: Iterable[str]) -> str:
        return "| " + " | ".join(value.replace("|", "\\|") for value in values) + " |"

    if not table.show_header:
        headings = [""] * len(headings)
    rule = "|" + "|".join("---:" if column.justify == "right" else "---" for column in table.columns) + "|"
    parts = [f"**{_plain(table.title)}**"] if table.title else []
    parts.append("\n".join([line(headings), rule, *map(line, rows)]))
    if table.caption:
        parts.append(_plain(table.caption))  # as it is: a caption's own asterisks (* trained on) would turn to emphasis
    return "\n\n".join(parts)


HTML_FORMS: dict[type, Callable[[Any], str]] = {
    Heading: lambda block: f"<h2>{html.escape(block.text)}</h2>",
    Paragraph: lambda block: f"<p>{html.escape(block.text)}</p>",
    Code: lambda block: f'<pre><code class="language-{block.language}">{html.escape(block.text)}</code></pre>',
    Picture: lambda block: (f'<figure><img src="{data_uri(block.png)}" alt="{html.escape(block.alt)}">'
                            f"<figcaption>{html.escape(block.alt)}</figcaption></figure>"),
    Table: _html_table,
}
MARKDOWN_FORMS: dict[type, Callable[[Any], str]] = {
    Heading: lambda block: f"## {block.text}",
    Paragraph: lambda block: block.text,
    Code: lambda block: f"```{block.language}\n{block.text.rstrip()}\n```",
    Picture: lambda block: f"![{block.alt}]({data_uri(block.png)})",
    Table: _markdown_table,
}
