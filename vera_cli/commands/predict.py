"""`vera predict`: classify image files with a pretrain run, an adapt run, or a base with adapters over it.

Every (image, adapter) row of one call is served by one model, the base carrying each adapter by
name, in mixed batches: each row through its own adapter (vera_cli.adapters.mixed). Images are
read by `vera_cli.images` (its RULE for anything but 32x32 RGB), normalised as the runs were
trained (vera_cli.data) and classified by the base's test-time rule (`model.tta`: alone, or the
mean of the image's and its mirror image's logits).

A file that cannot be read is reported and skipped; with `strict` nothing is classified instead.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vera_cli import fast
from vera_cli.adapters.mixed import forward_mixed
from vera_cli.bases import fingerprint, load_pretrained, pretrain_config
from vera_cli.cifar_classes import CLASSES
from vera_cli.commands.served import AdapterRuns, load_adapter_runs, resolve_runs
from vera_cli.data import normalize
from vera_cli.errors import VeraError
from vera_cli.images import RULE, Picture, UnreadableImage, image_files, read_image
from vera_cli.metrics import test_views
from vera_cli.runs import Run, open_run
from vera_cli.train import resolve_device

ROWS_PER_BATCH = 256
CSV_HEADER = ["image", "adapter"]


@dataclass
class Prediction:
    picture: Picture
    adapter: Optional[str]  # the adapt run, as given; None: the base alone
    top: list[tuple[str, float]]  # (class, probability), most probable first

    def to_dict(self) -> dict[str, Any]:
        picture = self.picture
        return {"image": str(picture.path), "adapter": self.adapter,
                "input": {"width": picture.width, "height": picture.height, "mode": picture.mode,
                          "converted": picture.converted},
                "top": [{"class": name, "probability": probability} for name, probability in self.top]}


@dataclass
class Skipped:
    path: Path
    reason: str

    def line(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class PredictResult:
    base_run: Run
    tta: str
    predictions: list[Prediction]
    skipped: list[Skipped]

    @property
    def converted(self) -> bool:
        return any(p.picture.converted for p in self.predictions)

    def to_dict(self) -> dict[str, Any]:
        return {"base_run": str(self.base_run.path), "tta": self.tta, "conversion": RULE,
                "predictions": [p.to_dict() for p in self.predictions],
                "skipped": [{"image": str(s.path), "error": s.reason} for s in self.skipped]}


def read_assignments(path: str) -> list[tuple[str, Optional[str]]]:
    """(image, adapt run or None for the base) rows of a CSV file headed `image,adapter`."""
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise VeraError(f"{path} is not a UTF-8 text file: --adapters-csv takes a CSV of image,adapter rows") from exc
    except OSError as exc:
        raise VeraError(f"--adapters-csv {path}: {exc.strerror or exc}") from None
    # A spreadsheet's header may be capitalised (Image,Adapter).
    if not rows or [cell.strip().lower() for cell in rows[0]] != CSV_HEADER:
        raise VeraError(f"{path} must start with the header line image,adapter")
    assignments = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip():
            raise VeraError(f"{path}, line {number}: expected image,adapter (an empty adapter or 'base': the base)")
        image, adapter = (cell.strip() for cell in row)
        assignments.append((image, None if adapter in ("", "base") else adapter))
    if not assignments:
        raise VeraError(f"{path} names no image")
    return assignments


def _rows(images: list[str], adapter_runs: list[Run], csv_rows: list[tuple[str, Optional[str]]] | None
          ) -> list[tuple[Path, Optional[Run]]]:
    """(image file, adapt run or None for the base) for every prediction to make."""
    if csv_rows is not None:
        opened: dict[str, Run] = {}
        for _, adapter in csv_rows:
            if adapter is not None and adapter not in opened:
                try:
                    opened[adapter] = open_run(adapter, ("adapt",))
                except VeraError as error:
                    raise VeraError(f"--adapters-csv, adapter {adapter}: {error}") from None
        return [(Path(image), opened[adapter] if adapter else None) for image, adapter in csv_rows]
    files = image_files(images)
    if not files:
        raise VeraError(f"no image files in {', '.join(images)}: name image files or folders that hold some")
    return [(file, run) for file in files for run in adapter_runs] if adapter_runs else [(file, None) for file in files]


def _read(files: list[Path], strict: bool, warn: Callable[[str], None]) -> tuple[dict[Path, Picture], list[Skipped]]:
    pictures, skipped = {}, []
    for path in dict.fromkeys(files):
        try:
            pictures[path] = read_image(path)
        except UnreadableImage as exc:
            skipped.append(Skipped(path, str(exc)))
    if skipped and strict:
        raise VeraError(f"{len(skipped)} of {len(pictures) + len(skipped)} images cannot be read, nothing classified "
                        f"(--strict): " + "; ".join(s.line() for s in skipped))
    for entry in skipped:
        warn(f"warning: {entry.line()}; skipped")
    if not pictures:
        raise VeraError("none of the images can be read: nothing to classify")
    return pictures, skipped


@torch.no_grad()
def _logits(loaded: AdapterRuns, pixels: torch.Tensor, adapters: list[Optional[Path]], tta: str,
            device: torch.device) -> torch.Tensor:
    """Each row's logits: rows of the shared model in mixed batches, each run with its own model on its rows."""
    logits = torch.empty(len(adapters), len(CLASSES))
    plans = {None: [i for i, a in enumerate(adapters) if a is None or a in loaded.names]}
    plans.update({path: [i for i, a in enumerate(adapters) if a == path] for path in loaded.alone})
    for own, rows in plans.items():
        model = loaded.model if own is None else loaded.alone[own]
        forward = fast.forward(model.eval())
        for start in range(0, len(rows), ROWS_PER_BATCH):
            chunk = rows[start:start + ROWS_PER_BATCH]
            images = normalize(pixels[chunk].to(device))
            names = [loaded.names.get(adapters[i]) for i in chunk] if own is None else None
            views = [forward(view) if names is None else forward_mixed(model, view, names, forward)
                     for view in test_views(images, tta)]
            logits[chunk] = torch.stack(views).float().mean(0).cpu()
    return logits


def predict_images(run_path: str, images: list[str], adapter_paths: list[str] = (), adapters_csv: str | None = None,
                   top: int = 3, strict: bool = False, device_name: str | None = None,
                   warn: Callable[[str], None] = print) -> PredictResult:
    """Classify `images` (files and folders) with `run_path`: a pretrain run, optionally with `adapter_paths` over it
    (every image through each adapter), or an adapt run; or the rows of `adapters_csv` (image,adapter)."""
    if not 1 <= top <= len(CLASSES):
        raise VeraError(f"--top must be from 1 to {len(CLASSES)}, got {top}")
    if adapters_csv is not None and (images or adapter_paths):
        raise VeraError("--adapters-csv names the images and their adapters: give no images or --adapter beside it")
    if adapters_csv is None and not images:
        raise VeraError("name the images to classify (files or folders), or give --adapters-csv FILE")
    csv_rows = read_assignments(adapters_csv) if adapters_csv is not None else None
    base_run, adapter_runs = resolve_runs(run_path, list(adapter_paths))
    rows = _rows(images, adapter_runs, csv_rows)
    pictures, skipped = _read([image for image, _ in rows], strict, warn)
    rows = [(image, adapter) for image, adapter in rows if image in pictures]

    base, base_cfg = load_pretrained(base_run, resolve_device(device_name or pretrain_config(base_run).device))
    used = {run.path: run for _, run in rows if run is not None}
    loaded = load_adapter_runs(base, list(used.values()), fingerprint(base))
    tta = base_cfg.model.tta
    pixels = torch.stack([pictures[image].pixels for image, _ in rows])
    adapters = [run.path if run is not None else None for _, run in rows]
    probabilities = _logits(loaded, pixels, adapters, tta, next(base.parameters()).device).softmax(1)
    best = probabilities.topk(top, dim=1)
    predictions = [Prediction(pictures[image], str(adapter) if adapter is not None else None,
                              [(CLASSES[c], float(p)) for p, c in zip(values.tolist(), indices.tolist())])
                   for (image, _), adapter, values, indices in zip(rows, adapters, best.values, best.indices)]
    return PredictResult(base_run, tta, predictions, skipped)
