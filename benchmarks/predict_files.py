#!/usr/bin/env python3
"""`vera predict` on image files against `vera eval` on the same test images.

    python benchmarks/predict_files.py --data-dir DIR --run RUN

Writes the CIFAR-10 test images as files three ways and classifies each folder as `vera predict RUN FOLDER`
does (`predict_images`), against `vera eval RUN` (`evaluate_runs`) on the same images:
  - PNG at 32x32: the very pixels eval reads, so the two must count the same images correct;
  - JPEG (quality 95) upscaled to 96x96 and to 224 wide by 300 high (bicubic): predict brings each back to 32x32
    by its stated rule (short side to 32, centre crop), so these measure what the rule and JPEG cost.
RUN is a pretrain run (the base alone) or an adapt run (its base with its adapter). Each folder's row gives the
images counted correct, the accuracy and predict's images per second (reading and conversion included).
`benchmarks/run.py` calls `predict_files` on the adapt run of its `vera experiment`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from vera_cli.allocator import keep_freed_memory
from vera_cli.cifar_classes import CLASSES
from vera_cli.commands.evaluate import evaluate_runs
from vera_cli.commands.predict import predict_images
from vera_cli.data import load_cifar10

# name -> (file suffix, how an image of the test split is written)
FORMS: dict[str, tuple[str, Callable[[Image.Image, Path], None]]] = {
    "png 32x32": (".png", lambda image, path: image.save(path)),
    "jpeg 96x96": (".jpg", lambda image, path: image.resize((96, 96), Image.BICUBIC).save(path, quality=95)),
    "jpeg 224x300": (".jpg", lambda image, path: image.resize((224, 300), Image.BICUBIC).save(path, quality=95)),
}


def write_images(images: torch.Tensor, folder: Path, suffix: str, write: Callable[[Image.Image, Path], None]) -> None:
    """Each (3, 32, 32) uint8 image as a file named by its position in the split, so that its label can be found."""
    folder.mkdir(parents=True)
    for index, pixels in enumerate(images):
        write(Image.fromarray(pixels.permute(1, 2, 0).numpy()), folder / f"{index:05d}{suffix}")


def predict_files(data_dir: str, run: str, workdir: Path) -> dict:
    test = load_cifar10(data_dir, download=False).test
    evaluated = evaluate_runs(run, [], data_dir=data_dir, device_name="cpu")
    report = evaluated.reports[next(reversed(evaluated.reports))]  # an adapt run's own, else the base's
    result = {"run": run, "images": len(test), "eval_correct": report.correct, "eval_accuracy": report.overall,
              "forms": {}}
    for name, (suffix, write) in FORMS.items():
        folder = workdir / name.replace(" ", "-")
        write_images(test.images, folder, suffix, write)
        started = time.perf_counter()
        predicted = predict_images(run, [str(folder)], top=1, warn=lambda _: None)
        seconds = time.perf_counter() - started
        order = sorted(predicted.predictions, key=lambda p: p.picture.path.name)
        classes = torch.tensor([CLASSES.index(p.top[0][0]) for p in order])
        correct = int((classes == test.labels).sum())
        result["forms"][name] = {"correct": correct, "accuracy": correct / len(test),
                                 "skipped": len(predicted.skipped), "converted": predicted.converted,
                                 "images_per_second": len(test) / seconds}
    return result


def main() -> None:
    keep_freed_memory()  # as the CLI does for every command
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--run", required=True, help="a pretrain or adapt run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(predict_files(args.data_dir, args.run, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
