"""bf16 mixed precision: where the hardware multiplies bf16 natively, and attention where torch's kernel is slow.

On a 2-core AMD EPYC (AVX512-BF16) a 2048-square bf16 product ran 2.2-2.3x faster than the fp32 one, and the
pretrain-vit ViT trained 1.7-1.8x faster under bf16 autocast with attention as below; on a 2-core Intel Xeon
(AMX) 6.6x and 1.57x. Where bf16 is emulated (a CPU without those instructions, a GPU before Ampere) it is
slower than fp32, which is what `precision: auto` avoids.

The models call `F.scaled_dot_product_attention`. On the CPU in bf16 its fused kernel ran a ViT block's
attention (batch 256, 64 tokens, 4 heads of 32) forward and backward in 96 ms, its math backend in 51 ms,
and the two products with a softmax between them in 22 ms; in fp32 the fused kernel is the fastest of the
three (39 ms, against 52 and 47). `explicit_attention()` computes that one case as the products and leaves
every other call, and every other op, to torch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU from Ampere on (or ROCm), a CPU with AVX512-BF16
    or AMX."""
    if device.type == "cuda":
        # torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (a T4, a V100).
        return torch.cuda.is_available() and bool(torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type == "cpu":
        # Private in torch, hence looked up: a torch without them reads as "not known to be native".
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check() for check in checks if check is not None)
    return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether training at `precision` (fp32, bf16 or auto: bf16 where it is native) runs under bf16 autocast."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


@contextlib.contextmanager
def bf16_autocast(device_type: str) -> Iterator[None]:
    """bf16 autocast on `device_type`, with attention as explicit products on the CPU."""
    with torch.autocast(device_type, dtype=torch.bfloat16), (explicit_attention() if device_type == "cpu"
                                                              else contextlib.nullcontext()):
        yield


def products(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
             scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, with dropout on the attention weights as torch's kernels apply it. Torch's bf16
    softmax computes in fp32 and rounds its output once: at the token counts the patch sizes give (1 to 1,024,
    powers of 4) the weights are bit for bit an fp32 softmax's rounded to bf16; at some other row lengths (63 or
    127, say) its fp32 sums run in another order and a few weights differ by one bf16 step. Its backward reads
    those bf16 weights; keeping an fp32 copy of them for it cost the recipe's step 1.16x (docs/performance.md).
    Largest error against fp32 attention, one block's shapes at batch 8 under bf16 autocast: these products
    0.0101, torch's fused kernel 0.0055; scores computed in fp32 too would give 0.0071 but cost the recipe's step
    9 % of its speed, and the recipe's accuracy did not ask for it."""
    scores = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    weights = scores.softmax(-1)
    return F.dropout(weights, dropout_p) @ value if dropout_p else weights @ value


def _attention_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    """F.scaled_dot_product_attention's parameters, to bind a call's arguments by name."""


_SIGNATURE = inspect.signature(_attention_arguments)


class explicit_attention(TorchFunctionMode):  # noqa: N801 (a context manager, named as one)
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            given = call.arguments
            if _explicit_pays(**given):
                return products(given["query"], given["key"], given["value"], given["dropout_p"], given["scale"])
        return func(*args, **kwargs)


def _explicit_pays(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask, dropout_p: float,
                   is_causal: bool, scale: float | None, enable_gqa: bool) -> bool:
    plain = attn_mask is None and not is_causal and not enable_gqa and query.dim() == 4
    return plain and query.device.type == "cpu" and query.dtype == torch.bfloat16
