"""A small CIFAR-10 in the real on-disk format, for tests and CI's installed-wheel check.

    python tests/synthetic.py DIR    # writes DIR/cifar-10-batches-py/
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from vera_cli.data import CLASSES, FOLDER, TEST_FILE, TRAIN_FILES

# Uneven on purpose: the loader must accept any number of images per batch file.
TRAIN_SIZES = [52, 47, 61, 40, 50]
TEST_SIZE = 100


def synthetic_batch(count: int, seed: int) -> dict:
    """Images whose colour depends on the class, so that a model can learn them in an epoch or two."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    palette = np.linspace(20, 235, len(CLASSES) * 3).reshape(len(CLASSES), 3)
    base = palette[labels][:, :, None].repeat(1024, axis=2)
    noise = rng.normal(0, 25, size=base.shape)
    data = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(count, 3072)
    return {b"batch_label": b"synthetic", b"labels": labels.tolist(), b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(count)]}


def write_cifar(root: Path, train_sizes=TRAIN_SIZES, test_size=TEST_SIZE) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for index, (name, size) in enumerate(zip(TRAIN_FILES, train_sizes)):
        (folder / name).write_bytes(pickle.dumps(synthetic_batch(size, index)))
    (folder / TEST_FILE).write_bytes(pickle.dumps(synthetic_batch(test_size, 99)))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


if __name__ == "__main__":
    print(write_cifar(Path(sys.argv[1])) / FOLDER)
