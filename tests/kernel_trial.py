"""A ConvNet forward and backward through `vera_cli.fast.forward`, against a kernel cache that a test prepared.

Called in a child of the fork server (tests/forkserver.py): a damaged library that crashes its process
(SIGBUS, a sanitizer runtime's exit) ends that child, and the test sees its exit status.
"""

import json
import os
from pathlib import Path

import torch

from test_models import _assert_same_function_and_gradients
from vera_cli import fast
from vera_cli.models import ConvNet


def mapped_kernels() -> list[list]:
    """[inode, path] of every kernel library this process has mapped."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "kernels-" in Path(fields[5]).name:
            found.add((int(fields[4]), fields[5]))
    return [list(pair) for pair in sorted(found)]


def owned_by_another_user(inode: int) -> None:
    """Make the file or folder `inode` seem another user's to os.stat, os.lstat and os.fstat."""
    def disowning(real):
        def patched(*args, **kwargs):
            info = real(*args, **kwargs)
            if info.st_ino != inode:
                return info
            fields = list(info[:10])
            fields[4] = info.st_uid + 1
            return os.stat_result(fields)
        return patched

    os.stat, os.lstat, os.fstat = disowning(os.stat), disowning(os.lstat), disowning(os.fstat)


def convnet_step(cache: str, out: str, settings: str = "{}") -> None:
    """Settings: "env", variables to set; "foreign", the inode of a file or folder that seems
    to belong to another user."""
    options = json.loads(settings)
    os.environ.update({"XDG_CACHE_HOME": cache, **options.get("env", {})})
    if "foreign" in options:
        owned_by_another_user(options["foreign"])
    torch.manual_seed(0)
    _assert_same_function_and_gradients(ConvNet(), torch.randn(16, 3, 32, 32), [])
    Path(out).write_text(json.dumps({"compute": fast.compute_path(), "libraries": mapped_kernels()}))
