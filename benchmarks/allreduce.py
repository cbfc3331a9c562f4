"""Time one DDP gradient exchange of the ConvNet: an all-reduce of 76,286 fp32 values (305 KB).

torchrun --standalone --nproc-per-node 2 benchmarks/allreduce.py     # gloo on CPU
torchrun --standalone --nproc-per-node 8 benchmarks/allreduce.py     # NCCL when each process has a GPU
"""

import os
import time

import torch
import torch.distributed as dist

GRADIENT_VALUES = 76_286  # vera_cli.models.ConvNet's parameters
WARM_UP, TIMED = 20, 400


def main() -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    gradient = torch.randn(GRADIENT_VALUES, device="cuda" if cuda else "cpu")
    for _ in range(WARM_UP):
        dist.all_reduce(gradient)
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED):
        dist.all_reduce(gradient)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / TIMED
    if dist.get_rank() == 0:
        print(f"all-reduce of {GRADIENT_VALUES:,} fp32 ({GRADIENT_VALUES * 4 / 1e3:.0f} KB) over "
              f"{dist.get_world_size()} {dist.get_backend()} processes: {seconds * 1e3:.3f} ms per call")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
