"""`vera eval` with several adapters on one base, and `vera predict` on image files."""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from vera_cli import cli, fast
from vera_cli.adapter_files import apply_adapter
from vera_cli.adapters.inject import merged_plain
from vera_cli.adapters.routing import Routing
from vera_cli.bases import fingerprint, load_pretrained
from vera_cli.commands import served
from vera_cli.commands.evaluate import evaluate_runs
from vera_cli.data import Split, load_cifar10
from vera_cli.images import RULE, UnreadableImage, read_image, to_cifar
from vera_cli.metrics import accuracy_report, predict_logits
from vera_cli.runs import Run

ADAPTERS = {"vera": [], "lora": ["--method", "lora", "--rank", "4", "--set", "adapter.targets=[all]"],
            "head": ["--train-head"], "full": ["--method", "full"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_root) -> Path:
    """A pretrain run, `base`, and an adapt run over it per entry of ADAPTERS, made once for the module."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--data-dir", str(cifar_root), "--device", "cpu", "--no-progress", "--batch-size", "32"]
    assert cli.run(["pretrain", *common, "--epochs", "2", "--run-dir", str(root / "base")]) == 0
    for name, options in ADAPTERS.items():
        assert cli.run(["adapt", *common, "--epochs", "1", "--base", str(root / "base"), *options,
                        "--run-dir", str(root / name)]) == 0
    return root


@pytest.fixture
def linked(vera, runs):
    """`vera` in a fresh working folder whose runs/ is the module's runs."""
    Path("runs").symlink_to(runs, target_is_directory=True)
    return vera


BASE = "runs/base"
SHARED = ["runs/vera", "runs/lora", "runs/head"]


def per_copy_reports(base_path: Path, adapters: list[str], cifar_root: Path, merged: bool) -> dict[str, dict]:
    """What `vera eval` reported before adapters shared the base: a deep copy of the base per adapter."""
    base, cfg = load_pretrained(Run(base_path), torch.device("cpu"))
    data = load_cifar10(cifar_root, download=False)
    reports = {}
    for path in adapters:
        model = copy.deepcopy(base)
        meta = apply_adapter(model, Path(path), fingerprint(base))
        if merged:
            merged_plain(model)
        logits = predict_logits(fast.forward(model.eval()), data.test, cfg.model.tta)
        chosen = [data.classes.index(name) for name in meta["classes"]]
        reports[path] = accuracy_report(logits, data.test.labels, data.classes, chosen).to_dict()
    return reports


@pytest.mark.parametrize("merged", [False, True])
def test_eval_of_several_adapters_shares_one_base_and_reports_what_copies_did(linked, cifar_root, monkeypatch, merged):
    copies = []
    monkeypatch.setattr(served, "copy", SimpleNamespace(deepcopy=lambda model: copies.append(1) or copy.deepcopy(model)))
    adapters = [*SHARED, "runs/full"]
    result = evaluate_runs(BASE, adapters, merged, str(cifar_root), "cpu")
    # A copy for the full fine-tune's own model (and the pristine base it starts from), none for the others.
    assert len(copies) == 2
    reports = {name: report.to_dict() for name, report in result.reports.items()}
    assert list(reports) == ["base", *adapters]
    assert {path: reports[path] for path in adapters} == per_copy_reports(Path(BASE), adapters, cifar_root, merged)


def test_eval_cli_lists_every_adapter_of_one_base(linked):
    result = linked("eval", BASE, "--adapter", *SHARED, "--json")
    assert result.code == 0, result.err
    assert list(result.json()["reports"]) == ["base", *SHARED]


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def huge_header_png(path: Path) -> Path:
    """A valid PNG header that claims 100,000 x 100,000 pixels: a decompression bomb as Pillow sees one."""
    data = bytearray((Path(write_png(path, np.zeros((1, 1, 3), np.uint8)))).read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_the_stated_rule_is_torchvisions_resize_and_centre_crop():
    from torchvision import transforms

    torchvision_rule = transforms.Compose([transforms.Resize(32, antialias=True), transforms.CenterCrop(32)])
    rng = np.random.default_rng(0)
    for height, width in ((48, 64), (70, 50), (20, 20), (33, 97)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert np.array_equal(np.asarray(to_cifar(image)), np.asarray(torchvision_rule(image))), (height, width)
    assert "short side is 32 pixels (bilinear, antialiased)" in RULE


def test_broken_links_loops_and_unreadable_files_in_a_folder_are_named_not_dropped(tmp_path, monkeypatch):
    from vera_cli.images import UnreadableImage, image_files

    good = write_png(tmp_path / "good.png", np.zeros((32, 32, 3), dtype=np.uint8))
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "sub.png").mkdir()  # a folder, even with an image's name, is not listed
    listed = image_files([str(tmp_path)])
    assert [path.name for path in listed] == ["gone.png", "good.png", "loop.png"]
    for name, reason in (("gone.png", "no such file"), ("loop.png", "a loop of symbolic links")):
        with pytest.raises(UnreadableImage, match=f"^{reason}$"):
            read_image(tmp_path / name)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refused)
    with pytest.raises(UnreadableImage, match=r"^not readable \(permission denied\)$"):
        read_image(good)


def test_a_pipe_in_a_folder_is_not_listed_but_one_named_is_read(tmp_path):
    import os
    import threading

    from vera_cli.images import image_files

    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = write_png(tmp_path / "good.png", pixels).read_bytes()
    os.mkfifo(tmp_path / "pipe.png")
    # Opening a pipe with no writer waits for one: listed, it stopped `vera predict images/` for good.
    assert [path.name for path in image_files([str(tmp_path)])] == ["good.png"]
    writer = threading.Thread(target=(tmp_path / "pipe.png").write_bytes, args=(png,))
    writer.start()
    # Named on the command line, a pipe is read as a file is: `vera predict RUN <(curl ...)`.
    assert image_files([str(tmp_path / "pipe.png")]) == [tmp_path / "pipe.png"]
    assert torch.equal(read_image(tmp_path / "pipe.png").pixels, torch.from_numpy(pixels).permute(2, 0, 1))
    writer.join()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to cap the address space")
def test_a_strip_whose_resized_image_passes_pillows_limit_is_refused_without_the_memory(tmp_path):
    import subprocess
    import sys

    # 4 KB on disk and 2,000,000 pixels, within Pillow's limit; resized to a short side of 32 it is 32x64,000,000,
    # 8 GB of RGB, before the crop keeps 32 rows of it.
    Image.new("L", (1, 2_000_000), 128).save(tmp_path / "strip.png")
    Image.new("L", (1, 80_000), 128).save(tmp_path / "thin.png")  # 32x2,560,000 resized: within the limit
    script = f"""
import resource
from pathlib import Path
from vera_cli.images import UnreadableImage, read_image
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 1024 * 2**20, resource.RLIM_INFINITY))
for name in ("strip.png", "thin.png"):
    try:
        print(tuple(read_image(Path({str(tmp_path)!r}) / name).pixels.shape))
    except UnreadableImage as exc:
        print(exc)
"""
    said = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stderr
    assert said.stdout.splitlines() == [
        "1x2,000,000 pixels, which the rule would resize to 32x64,000,000, more than Pillow's limit of "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels (Image.MAX_IMAGE_PIXELS): crop it nearer to square first",
        "(3, 32, 32)"]


def test_a_photo_is_turned_upright_as_its_exif_orientation_says(tmp_path):
    rng = np.random.default_rng(2)
    stored = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))  # 48 wide, 32 high, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    stored.save(tmp_path / "plain.jpg", quality=100)
    upright = read_image(tmp_path / "rotated.jpg")
    # Read as stored: 48x32, and upright 32x48, centre-cropped to rows 8..40 of the turned image.
    assert (upright.width, upright.height) == (48, 32)
    turned = np.asarray(Image.open(tmp_path / "plain.jpg").transpose(Image.Transpose.ROTATE_270))[8:40]
    assert np.abs(upright.pixels.permute(1, 2, 0).numpy().astype(int) - turned.astype(int)).max() <= 1
    assert not torch.equal(read_image(tmp_path / "plain.jpg").pixels, upright.pixels)
    assert RULE.endswith("every image is first turned upright as its EXIF orientation says (a camera's rotated photo)")


def test_images_of_any_mode_and_size_become_32x32_rgb_and_bad_files_say_why(tmp_path):
    rng = np.random.default_rng(1)
    gray = write_png(tmp_path / "gray.png", rng.integers(0, 256, (20, 40), dtype=np.uint8))
    rgba = write_png(tmp_path / "rgba.png", rng.integers(0, 256, (48, 64, 4), dtype=np.uint8))
    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert torch.equal(read_image(write_png(tmp_path / "exact.png", exact)).pixels, torch.from_numpy(exact).permute(2, 0, 1))
    for path, mode in ((gray, "L"), (rgba, "RGBA")):
        picture = read_image(path)
        assert picture.pixels.shape == (3, 32, 32) and picture.pixels.dtype == torch.uint8
        assert picture.mode == mode and picture.converted
    assert torch.equal(read_image(gray).pixels[0], read_image(gray).pixels[2])  # gray stays gray


def bad_files(folder: Path) -> dict[str, str]:
    """Files `vera predict` must skip, by name, with the reason it gives."""
    noisy = write_png(folder / "truncated.png", np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noisy.write_bytes(noisy.read_bytes()[:600])
    (folder / "notes.txt").write_text("not an image")
    huge_header_png(folder / "huge.png")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(folder / "float.tif")
    return {"truncated.png": "damaged or truncated", "notes.txt": "not an image Pillow can read",
            "huge.png": "larger than Pillow's limit", "float.tif": "a float image (mode F)"}


def test_predict_on_pngs_of_the_test_split_equals_eval(linked, cifar_root):
    data = load_cifar10(cifar_root, download=False)
    folder = Path("images")
    folder.mkdir()
    count = 30
    for index in range(count):
        write_png(folder / f"{index:03d}.png", data.test.images[index].permute(1, 2, 0).numpy())
    sample = Split(data.test.images[:count], data.test.labels[:count])
    base, cfg = load_pretrained(Run(Path(BASE)), torch.device("cpu"))
    for run in (BASE, *SHARED):
        model = copy.deepcopy(base)
        if run != BASE:
            apply_adapter(model, Path(run), fingerprint(base))
        expected = predict_logits(fast.forward(model.eval()), sample, cfg.model.tta).argmax(1)
        result = linked("predict", run, str(folder), "--top", "1", "--json")
        assert result.code == 0, result.err
        rows = result.json()["predictions"]
        assert [row["image"] for row in rows] == [str(folder / f"{index:03d}.png") for index in range(count)]
        assert [data.classes.index(row["top"][0]["class"]) for row in rows] == expected.tolist(), run
        assert not any(row["input"]["converted"] for row in rows)


def probabilities(rows: list[dict]) -> dict[tuple[str, str | None], dict[str, float]]:
    return {(row["image"], row["adapter"]): {entry["class"]: entry["probability"] for entry in row["top"]} for row in rows}


def test_several_adapters_serve_every_image_in_one_mixed_batch_as_each_alone(linked, monkeypatch):
    rng = np.random.default_rng(3)
    images = [str(write_png(Path(f"{name}.png"), rng.integers(0, 256, shape, dtype=np.uint8)))
              for name, shape in (("a", (32, 32, 3)), ("b", (50, 70, 3)), ("c", (40, 30)))]
    Path("assign.csv").write_text("image,adapter\na.png,runs/vera\nb.png,runs/lora\nc.png,\na.png,runs/head\n"
                                  "c.png,runs/full\nb.png,base\n")
    mixed_calls = []
    groups = Routing.groups
    monkeypatch.setattr(Routing, "groups", lambda self, layer, device: mixed_calls.append(1) or groups(self, layer, device))
    crossed = linked("predict", BASE, *images, "--adapter", "runs/vera", "--adapter", "runs/lora",
                   "--top", "10", "--json")
    assert crossed.code == 0, crossed.err
    assert mixed_calls, "several adapters are served as one mixed batch"
    from_csv = linked("predict", BASE, "--adapters-csv", "assign.csv", "--top", "10", "--json")
    assert from_csv.code == 0, from_csv.err
    rows = crossed.json()["predictions"] + from_csv.json()["predictions"]
    assert [(row["image"], row["adapter"]) for row in from_csv.json()["predictions"]] == [
        ("a.png", "runs/vera"), ("b.png", "runs/lora"), ("c.png", None), ("a.png", "runs/head"),
        ("c.png", "runs/full"), ("b.png", None)]
    for (image, adapter), probs in probabilities(rows).items():
        alone = linked("predict", adapter or BASE, image, "--top", "10", "--json")
        expected = probabilities(alone.json()["predictions"])[(image, adapter)]
        assert probs.keys() == expected.keys()
        assert all(abs(probs[name] - expected[name]) < 1e-5 for name in probs), (image, adapter)


def test_unreadable_images_are_skipped_with_one_line_each_or_refused_with_strict(linked):
    folder = Path("photos")
    folder.mkdir()
    good = write_png(folder / "good.png", np.random.default_rng(4).integers(0, 256, (24, 36, 3), dtype=np.uint8))
    reasons = bad_files(folder)
    jpeg = folder / "photo.jpg"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(jpeg, quality=90)
    named = [str(folder), str(folder / "notes.txt")]  # a folder lists image extensions; notes.txt is named itself
    result = linked("predict", BASE, *named, "--json")
    assert result.code == 0, result.err
    rows = result.json()
    assert [row["image"] for row in rows["predictions"]] == [str(good), str(jpeg)]
    assert all(row["input"]["converted"] for row in rows["predictions"]) and rows["conversion"] == RULE
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4
    for name, reason in reasons.items():
        assert any(line.startswith(f"warning: {folder / name}: {reason}") for line in warnings), name
    assert {entry["image"] for entry in rows["skipped"]} == {str(folder / name) for name in reasons}
    strict = linked("predict", BASE, *named, "--strict")
    assert strict.code == 2 and strict.out == ""
    assert strict.err.startswith("error: 4 of 6 images cannot be read, nothing classified (--strict)")
    assert all(str(folder / name) in strict.err for name in reasons)
    text = linked("predict", BASE, str(good), "--top", "2")
    assert text.code == 0 and "converted: images other than 32x32 RGB" in " ".join(text.out.split())


@pytest.mark.parametrize("arguments, message", [
    (["x.png", "--top", "11"], "--top must be from 1 to 10"),
    (["x.png", "--adapters-csv", "missing.csv"], "--adapters-csv names the images and their adapters"),
    ([], "name the images to classify"),
    (["--adapters-csv", "bad.csv"], "bad.csv must start with the header line image,adapter"),
    (["missing.png", "--strict"], "missing.png: no such file"),
    (["--adapters-csv", "nope.csv"], "error: --adapters-csv nope.csv: No such file or directory"),
    (["--adapters-csv", "base.csv"], f"error: --adapters-csv, adapter {BASE}: {BASE} is a pretrain run; this needs an "
                                     "adapt run"),
])
def test_predict_refuses_bad_input(linked, arguments, message):
    Path("bad.csv").write_text("picture,run\nx.png,\n")
    Path("base.csv").write_text(f"image,adapter\nx.png,{BASE}\n")
    result = linked("predict", BASE, *arguments)
    assert result.code == 2 and message in result.err, result.err


def test_paths_that_look_like_rich_markup_print_as_they_are(capsys):
    from rich.console import Console

    from vera_cli.report import prediction_table

    picture = {"width": 32, "height": 32, "mode": "RGB", "converted": False}
    result = {"base_run": "runs/[b]base", "tta": "none", "conversion": RULE, "skipped": [],
              "predictions": [{"image": "photos/a[/x].png", "adapter": "runs/[red]A", "input": picture,
                               "top": [{"class": "cat", "probability": 0.5}]}]}
    console = Console(record=True, width=200)
    console.print(prediction_table(result))
    text = console.export_text()
    assert "photos/a[/x].png" in text and "runs/[red]A" in text and "runs/[b]base" in text
    cli._log("warning: photos/a[/x].png: no such file; skipped")
    assert "warning: photos/a[/x].png: no such file; skipped" in capsys.readouterr().err


def test_run_paths_in_the_accuracy_tables_print_as_they_are():
    from rich.console import Console

    from vera_cli.metrics import accuracy_report
    from vera_cli.report import accuracy_table, compare_table, comparison_table

    report = accuracy_report(torch.eye(2), torch.tensor([0, 1]), ["cat", "dog"])
    console = Console(record=True, width=200)
    console.print(accuracy_table(report, "Test accuracy, runs/a[/x]"))
    console.print(comparison_table({"base": report, "runs/[red]A": report}, "Adapted runs/[b]base -> runs/c[/y]"))
    console.print(compare_table([], "Comparison runs/[i]d on cat"))
    text = console.export_text()
    for shown in ("Test accuracy, runs/a[/x]", "runs/[red]A", "Adapted runs/[b]base -> runs/c[/y]", "Comparison runs/[i]d"):
        assert shown in text, shown


def test_an_adapters_csv_with_a_byte_order_mark_reads_as_one_without(tmp_path):
    from vera_cli.commands.predict import read_assignments

    plain = tmp_path / "plain.csv"
    plain.write_text('image,adapter\n"a, b.png",runs/A\nc.png,\n', encoding="utf-8")
    marked = tmp_path / "marked.csv"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_assignments(str(marked)) == read_assignments(str(plain)) == [("a, b.png", "runs/A"), ("c.png", None)]
    # A spreadsheet's capitalised header too.
    capitalised = tmp_path / "capitalised.csv"
    capitalised.write_text(plain.read_text().replace("image,adapter", "Image,Adapter"))
    assert read_assignments(str(capitalised)) == read_assignments(str(plain))


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64  # 0..65472
    Image.fromarray(values).save(tmp_path / "deep.png")
    picture = read_image(tmp_path / "deep.png")
    assert picture.mode.startswith("I") and picture.converted
    expected = torch.from_numpy((values.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
    assert all(torch.equal(channel, expected) for channel in picture.pixels)


def test_count_params_states_the_storage_of_many_adapters(vera):
    result = vera("count-params", "--adapters", "100", "--json")
    assert result.code == 0, result.err
    storage = {row["method"]: row for row in result.json()["storage"]}
    assert storage["vera"]["values"] == 542 and storage["lora"]["values"] == 36_928
    assert storage["vera"]["total_bytes"] == 100 * storage["vera"]["file_bytes"] + 8
    assert storage["lora"]["total_bytes"] == 100 * storage["lora"]["file_bytes"]
    assert storage["vera"]["file_bytes"] == result.json()["adapter_bytes"] == 2_864
    assert storage["lora"]["file_bytes"] > 4 * 36_928
    head = vera("count-params", "--method", "head", "--adapters", "3")
    assert head.code == 2 and "compares the storage of VeRA and LoRA adapters: use it with --method vera or lora" in head.err
    for option, value, message in (("--adapters", "-1", "--adapters is how many adapters to store: a positive integer, got -1"),
                                   ("--versus-lora", "0", "--versus-lora is LoRA's rank: a positive integer, got 0")):
        wrong = vera("count-params", option, value)
        assert wrong.code == 2 and message in wrong.err, wrong.err


@pytest.mark.parametrize("values", [np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32),
                                    np.arange(32 * 32, dtype=np.int32).reshape(32, 32) * 4])
def test_float_and_32_bit_integer_images_are_refused_by_name_not_clipped(tmp_path, values):
    # Pillow's convert would clip both to 0..255: the float image in 0..1 would come out black.
    path = tmp_path / "scientific.tif"
    Image.fromarray(values).save(path)
    mode = "F" if values.dtype == np.float32 else "I"
    with Image.open(path) as image:
        assert image.mode == mode
    with pytest.raises(UnreadableImage, match=rf"^a (float|32-bit integer) image \(mode {mode}\), .*8 or 16 unsigned bits"):
        read_image(path)


def test_a_signed_16_bit_tiff_is_refused_as_what_it_is(tmp_path):
    # Pillow writes no signed 16-bit TIFF itself: an unsigned one with its sample format tag set to signed.
    path = tmp_path / "elevation.tif"
    values = (np.arange(32 * 32, dtype=np.int16).reshape(32, 32) - 500).astype(np.uint16)
    Image.frombuffer("I;16", (32, 32), values.tobytes(), "raw", "I;16", 0, 1).save(path, tiffinfo={339: 2})
    with Image.open(path) as image:
        assert image.mode == "I" and np.asarray(image).min() == -500
    with pytest.raises(UnreadableImage, match=r"^a signed 16-bit integer image \(mode I\), .*8 or 16 unsigned bits"):
        read_image(path)


def test_a_16_bit_png_that_pillow_opens_as_32_bit_integers_is_scaled_not_refused(tmp_path, monkeypatch):
    # Older Pillows (pyproject allows >= 9.1) open a 16-bit grayscale PNG as I, not I;16: made to do so here.
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    values = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64  # 0..65472
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode == "I"
    picture = read_image(tmp_path / "deep.png")
    expected = torch.from_numpy((values.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
    assert picture.mode == "I" and all(torch.equal(channel, expected) for channel in picture.pixels)


@pytest.mark.parametrize("maxval", [65535, 4095])
def test_a_16_bit_pgm_is_scaled_to_8_bits_not_refused(tmp_path, maxval):
    # Pillow opens a PGM of maxval over 255 as I, its values scaled to 0..65535: 16-bit grayscale.
    values = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * maxval // (32 * 32 - 1)
    (tmp_path / "deep.pgm").write_bytes(b"P5 32 32 %d\n" % maxval + values.astype(">u2").tobytes())
    with Image.open(tmp_path / "deep.pgm") as image:
        assert image.mode == "I"
        full = np.asarray(image).astype(np.int64)
    assert full.max() == 65535
    picture = read_image(tmp_path / "deep.pgm")
    expected = torch.from_numpy((full * 255 + 32767) // 65535).to(torch.uint8)
    assert picture.mode == "I" and all(torch.equal(channel, expected) for channel in picture.pixels)
