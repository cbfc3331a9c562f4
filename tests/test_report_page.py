"""`vera report RUN`: one self-contained HTML page and its Markdown twin, for compare, adapt and experiment runs."""

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from conftest import fake_compare_run, fake_run
from vera_cli.report_page import REPORT_FILES, reproduce_command
from vera_cli.runs import Run

ACCURACY = {"lora": [0.60, 0.62, 0.61], "vera": [0.65, 0.66, 0.67], "head": [0.50, 0.52, 0.53],
            "vera-sliced": [0.61, 0.61, 0.61]}
PLAN = {"rows": 12, "first_row": "lora-r8-replay-s0", "seconds_per_row": 5.0, "budget": "55s",
        "dropped": ["vera-sliced-r8-replay-s2"], "settings": 4}


class Page(HTMLParser):
    """What a reader of the page gets: its title, tables (as rows of cells), pictures and every link."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.title, self.tables, self.images, self.links, self.tags = "", [], [], [], set()
        self.code: list[str] = []
        self._cell = self._in_title = self._in_code = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [value for key, value in attrs.items() if key in ("href", "src", "srcset", "action", "data")]
        if tag == "title":
            self._in_title = True
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "code":
            self._in_code = True
            self.code.append("")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None
        elif tag == "code":
            self._in_code = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell += data
        if self._in_code:
            self.code[-1] += data


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_compare_report_is_one_self_contained_page_with_tables_verdicts_pictures_and_the_command(vera):
    run = fake_compare_run(Path("runs/cmp"), ACCURACY, plan=PLAN, reference="lora-r8")
    result = vera("report", str(run))
    assert result.code == 0, result.err
    assert result.err.split("\n")[:2] == ["report written to runs/cmp/report.html", "report written to runs/cmp/report.md"]
    page = Page((run / "report.html").read_text())
    assert page.title == "vera compare runs/cmp"
    # Nothing fetched from anywhere: no links, no scripts or style sheets, every picture a PNG data URI.
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert all(link.startswith("data:image/png;base64,") for link in page.links)
    assert len(page.images) == 3  # accuracy against parameters, against training time, per class
    for image in page.images:
        width, height = png_size(base64.b64decode(image["src"].partition(",")[2]))
        assert width > 800 and height > 300 and image["alt"]
    accuracy, verdicts, costs = page.tables
    assert accuracy[0][:4] == ["method", "rank", "targets", "forgetting"]
    assert [r[0] for r in accuracy[1:]] == ["base", "lora", "vera", "head", "vera-sliced"]
    assert accuracy[2][accuracy[0].index("overall")] == "61.0 ± 2.5"
    by_method = {r[0]: dict(zip(verdicts[0], r)) for r in verdicts[1:]}
    assert by_method["lora"]["verdict"] == "reference"
    assert (by_method["vera"]["Δ overall"], by_method["vera"]["95 % CI"], by_method["vera"]["verdict"]) == (
        "+5.0", "[+2.5, +7.5]", "better")
    assert by_method["head"]["verdict"] == "worse"
    assert by_method["vera-sliced"]["verdict"] == "no detectable difference at 95 %"
    cost_of = {r[0]: dict(zip(costs[0], r)) for r in costs[1:]}
    assert (cost_of["vera"]["train s"], cost_of["vera"]["peak MiB"], cost_of["lora"]["front"]) == ("8.00", "200",
                                                                                                   "bytes, time")
    assert reproduce_command(Run(run)) in page.code
    assert yaml.safe_load(page.code[-1])["reference"] == "lora-r8"  # the config, last
    text = (run / "report.html").read_text()
    assert "cut to fit --budget 55s: 1 row(s) dropped (vera-sliced-r8-replay-s2)" in text
    markdown = (run / "report.md").read_text()
    assert markdown.startswith("# vera compare runs/cmp\n")
    assert "| vera | 8 | linear | replay | 3 | +5.0 | [+2.5, +7.5] | better |" in markdown
    assert markdown.count("](data:image/png;base64,") == 3 and reproduce_command(Run(run)) in markdown


def test_the_reproduce_command_repeats_the_recorded_config(vera):
    run = fake_compare_run(Path("runs/cmp"), ACCURACY, seeds=2, budget="30m")
    command = reproduce_command(Run(run)).split()
    assert command[:2] == ["vera", "compare"]
    printed = vera(*command[1:], "--print-config", data=False)
    assert printed.code == 0, printed.err
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert yaml.safe_load(printed.out) == {**recorded, "run_dir": "runs/cmp-again"}


def test_a_report_replaces_only_its_own_files(vera):
    run = fake_compare_run(Path("runs/cmp"), ACCURACY)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert vera("report", str(run)).code == 0
    first = (run / "report.html").read_bytes()
    assert vera("report", str(run)).code == 0
    after = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert set(after) == set(before) | {run / name for name in REPORT_FILES}
    assert all(after[path] == data for path, data in before.items())
    assert (run / "report.html").read_bytes() == first  # the same run gives the same page


def test_bad_report_paths_are_one_line_errors(vera, tmp_path):
    fake_run(Path("runs"), "pre", kind="pretrain")
    fake_run(Path("runs"), "stopped", status="interrupted")
    for path, message in (("runs/none", "error: runs/none is not a run directory (no status.json)"),
                          ("runs/pre", "error: runs/pre is a pretrain run; this needs a compare or adapt or experiment run"),
                          ("runs/stopped", "error: runs/stopped is interrupted, not finished")):
        result = vera("report", path)
        assert result.code == 2 and result.err.startswith(message) and result.err.count("\n") == 1, result.err
    assert not list(Path("runs").rglob("report.*"))
    run = fake_compare_run(Path("runs/cmp"), ACCURACY)
    (run / "rows" / "vera-r8-replay-s1" / "summary.json").write_text("{}")
    damaged = vera("report", str(run))
    assert damaged.code == 2 and damaged.err.count("\n") == 1
    assert "runs/cmp/rows/vera-r8-replay-s1/summary.json is damaged" in damaged.err
    assert not (run / "report.html").exists()


def test_adapt_and_experiment_reports(vera, pretrained):
    made = vera("experiment", "--base", str(pretrained), "--classes", "cat", "dog", "--set", "adapt.train.epochs=2",
                "--run-dir", "runs/exp")
    assert made.code == 0, made.err
    for run, tables in (("runs/exp/adapt", 1), ("runs/exp", 1 + 3)):
        result = vera("report", run)
        assert result.code == 0, result.err
        page = Page(Path(run, "report.html").read_text())
        assert len(page.tables) == tables
        per_class = page.tables[-1]
        assert per_class[0][:2] == ["class", "base"] and per_class[4][0] == "cat *"
        summary = json.loads(Path("runs/exp/adapt/summary.json").read_text())
        assert per_class[4][1] == f"{100 * summary['base']['per_class'][3]['accuracy']:.2f}%"
        assert len(page.images) == 2  # per class, training curves
        assert f"inference {summary['inference_ms_per_image']:.3f} ms per image" in Path(run, "report.md").read_text()
        assert f"vera {'adapt' if run.endswith('adapt') else 'experiment'} --config {run}/config.yaml" in page.code[0]


def pixel_variance(path: Path) -> float:
    from PIL import Image, ImageStat

    with Image.open(path) as image:
        return ImageStat.Stat(image.convert("L")).var[0]


@pytest.mark.slow  # starts a browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_chromium_renders_the_report(vera, tmp_path):
    run = fake_compare_run(Path("runs/cmp"), ACCURACY, plan=PLAN, reference="lora-r8")
    assert vera("report", str(run)).code == 0
    shot = tmp_path / "shot.png"
    # As root Chromium refuses to start inside its sandbox; the page is our own file.
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
    subprocess.run(["chromium", "--headless", *sandbox, "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
                    "--window-size=1280,2400", (run / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert png_size(shot.read_bytes()) == (1280, 2400)
    # A blank page has no variance; tables, text and plots have plenty.
    assert pixel_variance(shot) > 500
