import pickle
from pathlib import Path

import pytest
import torch

from vera_cli import data
from vera_cli.data import (CLASSES, FOLDER, Split, batches, class_ids, crop, crop_offsets, flip_draws,
                           load_cifar10, mirror, normalize)
from vera_cli.fast import augment as fast_augment
from vera_cli.fast.build import kernels, library
from vera_cli.errors import VeraError

from synthetic import TEST_SIZE, TRAIN_SIZES, synthetic_batch


def test_loads_the_real_layout_into_one_uint8_tensor(cifar_root):
    cifar = load_cifar10(cifar_root, download=False)
    assert cifar.train.images.shape == (sum(TRAIN_SIZES), 3, 32, 32)
    assert cifar.train.images.dtype == torch.uint8
    assert cifar.test.images.shape == (TEST_SIZE, 3, 32, 32)
    assert cifar.train.labels.dtype == torch.int64
    assert cifar.classes == CLASSES
    # Channel-major rows: the first 1024 values of a row are the red plane.
    raw = synthetic_batch(TRAIN_SIZES[0], 0)[b"data"]
    assert torch.equal(cifar.train.images[0, 0].flatten(), torch.from_numpy(raw[0, :1024]))
    assert torch.equal(cifar.train.images[0, 2].flatten(), torch.from_numpy(raw[0, 2048:]))


def test_missing_data_without_download_says_what_to_do(tmp_path):
    with pytest.raises(VeraError, match=r"no CIFAR-10 found at .*cifar-10-batches-py: pass --data-dir"):
        load_cifar10(tmp_path / "nowhere", download=False)
    assert not (tmp_path / "nowhere").exists()


def test_offline_download_failure_is_explained(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(VeraError, match=r"could not download CIFAR-10 into .* \(OSError\); if this machine is offline"):
        load_cifar10(tmp_path, download=True)


@pytest.mark.parametrize("failure", [OSError("network unreachable"), KeyboardInterrupt()])
def test_a_failed_download_leaves_nothing_it_made(tmp_path, monkeypatch, failure):
    import torchvision.datasets

    class CutOff:
        # As torchvision does: the folder made, part of the archive written, then the connection lost.
        def __init__(self, root, *args, **kwargs):
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"part")
            raise failure

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", CutOff)
    for root in (tmp_path / "new" / "data", tmp_path / "existing"):
        (tmp_path / "existing").mkdir(exist_ok=True)
        (tmp_path / "existing" / "notes.txt").write_text("mine")
        with pytest.raises(VeraError if isinstance(failure, Exception) else KeyboardInterrupt):
            load_cifar10(root, download=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["existing", "existing/notes.txt"]


def _rewrite(root: Path, name: str, payload) -> None:
    (root / FOLDER / name).write_bytes(pickle.dumps(payload))


def test_wrong_shape_is_refused(fresh_cifar):
    batch = synthetic_batch(10, 0)
    batch[b"data"] = batch[b"data"][:, :100]
    _rewrite(fresh_cifar, "data_batch_2", batch)
    with pytest.raises(VeraError, match=r"data_batch_2: 'data' must be an N x 3072 uint8 array.*\(10, 100\)"):
        load_cifar10(fresh_cifar, download=False)


def test_labels_out_of_range_are_refused(fresh_cifar):
    batch = synthetic_batch(10, 0)
    batch[b"labels"][3] = 12
    _rewrite(fresh_cifar, "test_batch", batch)
    with pytest.raises(VeraError, match=r"test_batch: labels must lie in 0..9, found 0..12"):
        load_cifar10(fresh_cifar, download=False)


def test_label_count_must_match_images(fresh_cifar):
    batch = synthetic_batch(10, 0)
    batch[b"labels"] = batch[b"labels"][:7]
    _rewrite(fresh_cifar, "data_batch_1", batch)
    with pytest.raises(VeraError, match="expected 10 labels"):
        load_cifar10(fresh_cifar, download=False)


def test_wrong_class_names_are_refused(fresh_cifar):
    _rewrite(fresh_cifar, "batches.meta", {b"label_names": [b"a"] * 10})
    with pytest.raises(VeraError, match="class names"):
        load_cifar10(fresh_cifar, download=False)


def test_truncated_file_is_reported(fresh_cifar):
    path = fresh_cifar / FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(VeraError, match=r"data_batch_3 is truncated or corrupted"):
        load_cifar10(fresh_cifar, download=False)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(fresh_cifar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _rewrite(fresh_cifar, "data_batch_1", {b"data": _RunsCode(), b"labels": []})
    with pytest.raises(VeraError, match=r"refusing to load posix.system|refusing to load os.system"):
        load_cifar10(fresh_cifar, download=False)
    assert not (tmp_path / "pwned").exists()


def test_class_names_are_case_insensitive_and_keep_order():
    assert class_ids(["Cat", "BIRD", "dog"]) == [3, 2, 5]


@pytest.mark.parametrize("names, message", [
    (["cta"], r"unknown class 'cta': did you mean cat\?"),
    (["cat", "Cat"], r"class 'Cat' is named twice"),
    ([], r"no classes given"),
    (["zebra"], r"unknown class 'zebra': choose from airplane"),
])
def test_bad_class_lists_are_refused(names, message):
    with pytest.raises(VeraError, match=message):
        class_ids(names)


def test_subset_keeps_only_chosen_classes(cifar_root):
    train = load_cifar10(cifar_root, download=False).train
    subset = train.subset([3, 5])
    assert set(subset.labels.tolist()) == {3, 5}
    assert len(subset) == int(((train.labels == 3) | (train.labels == 5)).sum())


def test_random_crop_is_a_shifted_window_and_deterministic():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    first = crop(images, 4, *crop_offsets(16, 4, torch.Generator().manual_seed(1)))
    again = crop(images, 4, *crop_offsets(16, 4, torch.Generator().manual_seed(1)))
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again)
    assert torch.equal(crop(images, 0, *crop_offsets(16, 0, torch.Generator().manual_seed(1))), images)
    padded = torch.nn.functional.pad(images, (4,) * 4)
    for i in range(16):
        windows = [padded[i, :, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(first[i], w) for w in windows)


def test_batches_crop_within_the_configured_padding():
    # Every image is one constant colour, so a crop shows its zero padding as a border of zeros: its
    # width is the window's shift, which must never exceed crop_padding and must reach it for some image.
    split = Split(torch.full((200, 3, 32, 32), 200, dtype=torch.uint8), torch.arange(200) % 10)
    for padding in (2, 4):
        images = torch.cat([x for x, _ in batches(split, 50, torch.Generator().manual_seed(0), crop_padding=padding)])
        zero_rows = (images[:, 0] < 0).all(2).sum(1)  # normalised 0 is negative, 200 positive
        zero_cols = (images[:, 0] < 0).all(1).sum(1)
        assert int(zero_rows.max()) == int(zero_cols.max()) == padding
        assert int(zero_rows.min()) == 0
    unshifted = torch.cat([x for x, _ in batches(split, 50, torch.Generator().manual_seed(0))])
    assert bool((unshifted > 0).all())


def test_random_flip_mirrors_about_half_of_a_batch():
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    flipped = mirror(images, flip_draws(400, torch.Generator().manual_seed(0)))
    mirrored = (flipped == images.flip(3)).flatten(1).all(1)
    unchanged = (flipped == images).flatten(1).all(1)
    assert bool((mirrored | unchanged).all())
    assert 150 < int(mirrored.sum()) < 250


@pytest.mark.parametrize("padding, crops, flips", [(4, True, True), (2, True, False), (0, False, True), (0, False, False)])
def test_the_compiled_augmentation_gives_the_torch_operators_floats_exactly(machine_threads, padding, crops, flips):
    if library() is None:
        pytest.skip("no C compiler here: batches are made by torch's operators")
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    index = torch.randperm(300, generator=generator)[:37]
    offsets = crop_offsets(37, padding, generator) if crops else None
    flags = flip_draws(37, generator) if flips else None
    fast = fast_augment.augmented(images, index, padding, offsets, flags)
    expected = images[index]
    expected = crop(expected, padding, *offsets) if crops else expected
    expected = mirror(expected, flags) if flips else expected
    assert fast_augment.supports(images, padding) and fast.dtype == torch.float32
    assert torch.equal(fast, normalize(expected))


def test_a_seed_gives_the_same_batches_with_and_without_the_compiled_augmentation(monkeypatch, machine_threads):
    split = Split(torch.randint(0, 256, (90, 3, 32, 32), dtype=torch.uint8), torch.arange(90) % 10)
    made = []
    for switch in ("on", "off"):
        monkeypatch.setenv("VERA_CLI_KERNELS", switch)
        kernels.cache_clear()
        made.append(list(batches(split, 32, torch.Generator().manual_seed(3), crop_padding=2, flip=True,
                                 augment=fast_augment.augmented)))
    kernels.cache_clear()
    assert len(made[0]) == len(made[1]) == 3
    for (x, y), (x_torch, y_torch) in zip(*made):
        assert torch.equal(x, x_torch) and torch.equal(y, y_torch)


def test_the_compiled_augmentation_refuses_what_would_read_past_its_tensors():
    if library() is None:
        pytest.skip("no C compiler here")
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    stats = torch.zeros(3), torch.ones(3)
    with pytest.raises(IndexError, match="out of range for 4 images"):
        fast_augment.augment(images, torch.tensor([0, 4]), 0, None, None, *stats)
    with pytest.raises(ValueError, match=r"crop offsets must lie in \[0, 4\]"):
        fast_augment.augment(images, torch.tensor([0, 1]), 2, (torch.tensor([0, 5]), torch.tensor([0, 0])), None, *stats)
    with pytest.raises(ValueError, match=r"crop offsets and flips need one value per image \(2\)"):
        fast_augment.augment(images, torch.tensor([0, 1]), 2, (torch.tensor([0]), torch.tensor([0])), None, *stats)
    with pytest.raises(ValueError, match=r"crop offsets and flips need one value per image \(2\)"):
        fast_augment.augment(images, torch.tensor([0, 1]), 0, None, torch.tensor([True]), *stats)
    with pytest.raises(ValueError, match=r"mean and std need one value per channel \(3\)"):
        fast_augment.augment(images, torch.tensor([0, 1]), 0, None, None, torch.zeros(2), torch.ones(2))


def test_batches_cover_every_image_once_and_normalise():
    split = Split(torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70) % 10)
    seen = torch.cat([labels for _, labels in batches(split, 32, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(split.labels.tolist())
    ordered = list(batches(split, 32))
    assert [len(y) for _, y in ordered] == [32, 32, 6]
    x, _ = ordered[0]
    assert x.dtype == torch.float32
    expected = (split.images[:32].float() / 255 - torch.tensor(data.MEAN).view(1, 3, 1, 1)) / torch.tensor(data.STD).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)
