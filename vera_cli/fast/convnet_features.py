"""The ConvNet's convolutional prefix on the CPU as one autograd function over convnet_features.c.

relu(max_pool2d(conv(x), 2)) through conv1 and conv2, flattened as torch.flatten flattens NCHW: the same
function and gradients as the modules (to float rounding), about twice as fast on 2 cores. The weights are
the modules' own parameters, repacked on every call (a few thousand floats), so optimisers, state_dicts
and anything that reads them see nothing unusual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.fast.build import address, call_with_scratch, library, vector_width


def _plain_5x5(conv: nn.Conv2d, in_channels: int, out_channels: int) -> bool:
    return (type(conv) is nn.Conv2d and (conv.in_channels, conv.out_channels) == (in_channels, out_channels)
            and conv.kernel_size == (5, 5) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None
            and conv.weight.dtype == conv.bias.dtype == torch.float32 and conv.weight.device.type == "cpu")


def supports(x: torch.Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> bool:
    """Whether the kernels can run this input through these layers; otherwise the modules run.

    The ConvNet's shapes on 32x32 RGB float32 images on the CPU, not under autocast, with no gradient
    wanted for the images themselves, and a processor and compiler the kernels can use.
    """
    return (x.device.type == "cpu" and x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, 32, 32)
            and not x.requires_grad and not torch.is_autocast_enabled("cpu")
            and _plain_5x5(conv1, 3, 6) and _plain_5x5(conv2, 6, 16) and library() is not None)



class _Features(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = x.contiguous()
        # Every tensor whose address is passed is held in a name until the call returns.
        w1p = w1.detach().contiguous()
        b1p = F.pad(b1.detach(), (0, 2))
        w2p = w2.detach().permute(2, 3, 1, 0).contiguous()
        b2p = b2.detach().contiguous()
        p1 = x.new_empty(batch, 14, 14, 8)
        m1 = torch.empty(batch, 14, 14, 4, dtype=torch.uint8)
        m2 = torch.empty(batch, 5, 5, 2, 4, dtype=torch.uint8)
        out = x.new_empty(batch, 400)
        call_with_scratch("vc_forward", vector_width(), batch, torch.get_num_threads(), address(x), address(w1p),
                          address(b1p), address(w2p), address(b2p), address(p1), address(m1), address(m2), address(out))
        ctx.save_for_backward(x, w2, p1, m1, m2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w2, p1, m1, m2 = ctx.saved_tensors
        threads = torch.get_num_threads()
        grad = grad.contiguous()
        w2t = F.pad(w2.detach().permute(2, 0, 3, 1), (0, 2)).contiguous()
        dw1, db1 = x.new_zeros(threads, 5, 5, 3, 8), x.new_zeros(threads, 8)
        dw2, db2 = x.new_zeros(threads, 16, 5, 5, 8), x.new_zeros(threads, 16)
        call_with_scratch("vc_backward", vector_width(), x.shape[0], threads, address(x), address(p1), address(m1),
                          address(m2), address(grad), address(w2t), address(dw1), address(db1), address(dw2), address(db2))
        return (None, dw1.sum(0)[..., :6].permute(3, 2, 0, 1), db1.sum(0)[:6],
                dw2.sum(0)[..., :6].permute(0, 3, 1, 2), db2.sum(0))


def features(x: torch.Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> torch.Tensor:
    """flatten(relu(pool(conv2(relu(pool(conv1(x))))))) for (B, 3, 32, 32) images; check `supports` first."""
    return _Features.apply(x, conv1.weight, conv1.bias, conv2.weight, conv2.bias)
