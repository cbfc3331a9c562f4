"""An adapted layer: a frozen base layer carrying one or more named adapters.

Each adapter's part in a layer (`LayerAdapter`: VeRA, LoRA, or a full copy of the layer's weights)
keeps its tensors on the layer, so that the state dict, `.to()` and deepcopy see them: the adapter
named "default" directly (`fc1.vera_d`, the name an adapter file gives it), any other under
`adapters.<name>` (`fc1.adapters.cat.vera_d`). The layer computes its base plus the active adapter,
the base alone (adapters disabled, or none active here), or in a mixed batch each sample's own
adapter (`routing`, set by `vera_cli.adapters.mixed` for the length of a call).

A low-rank delta is built from two factors, a "down" one (r x fan_in) and an "up" one (out x r).
How a factor acts on the input depends on the base layer, so each base type has a geometry mixin:
nn.Linear multiplies over the last dimension; nn.Conv2d runs the down factor as a convolution with
the layer's own kernel size, stride, padding and dilation into r channels, and the up factor as a
1x1 convolution, as PEFT's LoRA does. The full (out, in, kh, kw) kernel is built for merging (and
by vera_cli.fast, for a forward pass where that costs fewer multiply-adds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vera_cli.adapters.errors import AdapterError

if TYPE_CHECKING:
    from vera_cli.adapters.routing import Group, Routing

# The adapter `inject` adds, and the one whose tensors keep their plain names.
DEFAULT = "default"
# The container of the other adapters' tensors on each layer.
NAMED = "adapters"


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why `layer` cannot carry an adapter, or None when it can."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"is a grouped convolution (groups={layer.groups}); convolution adapters support groups=1 only"
        if layer.padding_mode != "zeros":
            return f"pads with {layer.padding_mode!r}; convolution adapters support zero padding only"
        return None
    if isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        # nn.MultiheadAttention hands this layer's weight to its attention function: a wrapper would never run.
        return "is the output projection of an nn.MultiheadAttention, which reads its weight without calling it"
    if isinstance(layer, nn.Linear):
        return None
    return f"is a {type(layer).__name__}; adapters wrap nn.Linear and nn.Conv2d"


def outer_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` without entering adapted layers (each is yielded, its base and adapters are not): a
    layer with many named adapters holds a module per adapter, and some callers look on every batch."""
    seen: set[int] = set()

    def walk(module: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
        if id(module) in seen:
            return
        seen.add(id(module))
        yield name, module
        if not isinstance(module, AdaptedLayer):
            for child_name, child in module._modules.items():
                if child is not None:
                    yield from walk(child, f"{name}.{child_name}" if name else child_name)

    return walk(model, "")


def base_of(module: nn.Module) -> nn.Module:
    """The plain layer: an adapted layer's base, any other module itself."""
    return module.base if isinstance(module, AdaptedLayer) else module


class Registrations:
    """How many parameters adapted layers and adapter holders have registered in this process: a part's tensor
    replaced by a new Parameter (load_state_dict with assign, setattr) is registered, so a table of parts' tensors
    built before the last registration may hold a replaced one (routing.Tables)."""

    count = 0


class CountsRegistrations(nn.Module):
    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        Registrations.count += 1


class AdapterHolder(CountsRegistrations):
    """Where a named adapter's tensors live in one layer: a plain module that counts its registrations."""


class LayerAdapter:
    """One named adapter's part in one layer. Not a module: its tensors are registered on `holder` (the layer
    itself for the default adapter); this object says how they compute. Methods take the layer, which owns
    the geometry, rather than keeping a reference to it (a cycle would keep every copy of a model alive)."""

    method: ClassVar[str]
    low_rank: ClassVar[bool] = True  # base output plus a delta, rather than the layer's own replaced weights

    def __init__(self, holder: nn.Module, tensors: dict[str, torch.Tensor], dropout: float, order: int) -> None:
        self.holder = holder
        self.names = tuple(tensors)
        for name, tensor in tensors.items():
            holder.register_parameter(name, nn.Parameter(tensor))
        self.dropout = dropout
        self.order = order  # when the adapter was added, for a stable order of names across layers

    def tensor(self, name: str) -> nn.Parameter:
        # The holder's own dict, not a reference kept here: always the current parameter, and cheap in a mixed batch.
        return self.holder._parameters[name]

    def tensors(self) -> dict[str, nn.Parameter]:
        return {name: self.tensor(name) for name in self.names}

    def remove(self) -> None:
        for name in self.names:
            delattr(self.holder, name)

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        # Dropout acts on the adapter's input only.
        dropped = F.dropout(x, self.dropout, layer.training) if self.dropout > 0 else x
        return layer.base(x) + self.delta(layer, dropped)

    def delta(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input x, computed without the full weight."""
        raise NotImplementedError

    def frozen_delta_input(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """What the delta needs of x that frozen weights alone compute: x itself, unless a subclass knows more."""
        return x

    def delta_from_frozen(self, layer: AdaptedLayer, frozen: torch.Tensor) -> torch.Tensor:
        return self.delta(layer, frozen)

    def delta_weight(self, layer: AdaptedLayer) -> torch.Tensor:
        """The same contribution in the base weight's shape."""
        raise NotImplementedError

    def merged_weights(self, layer: AdaptedLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base layer's weight and bias with this adapter folded in (bias None: unchanged)."""
        return layer.base.weight + self.delta_weight(layer).to(layer.base.weight.dtype), None

    def group_key(self) -> Any:
        """Parts with equal keys compute together in a mixed batch (one `mixed` call)."""
        return (type(self), self.rank)

    @staticmethod
    def mixed(layer: AdaptedLayer, x: torch.Tensor, out: torch.Tensor, group: Group) -> torch.Tensor:
        """`out` (the base's output for the whole batch) with the group's samples adapted, each by its own part."""
        raise NotImplementedError

    @staticmethod
    def whole(layer: AdaptedLayer, x: torch.Tensor, group: Group) -> torch.Tensor | None:
        """The layer's output for a group that holds every sample of the batch, without the base's output beneath
        it, where that costs less; None: the base's output, then `mixed`."""
        return None


class AdaptedLayer(CountsRegistrations):
    """Wraps a frozen layer; carries named adapters (`parts`), of which one is active."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        reason = unsupported_reason(base)
        if reason is not None:
            raise AdapterError(f"this layer {reason}")
        self.base = base
        # The factors' sizes: a conv's fan-in counts every weight of one output channel.
        self.fan_in = base.weight[0].numel()
        self.out_features = base.weight.shape[0]
        self.parts: dict[str, LayerAdapter] = {}
        self.orders: dict[str, int] = {}  # each part's `order`, kept beside `parts` so that listing names is one dict update
        self.active: str | None = None
        self.disabled = False
        self.merged_name: str | None = None
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.routing: Routing | None = None
        self.mixed_plan: tuple[tuple[str, ...], list] | None = None  # see routing.layer_groups
        # A layer wrapped in a model in eval mode stays in it (adapter dropout off) until the model's mode changes.
        self.train(base.training)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    # Where an adapter's tensors live.

    def holder(self, name: str) -> nn.Module:
        if name == DEFAULT:
            return self
        if NAMED not in self._modules:
            self.add_module(NAMED, nn.ModuleDict())
        named = self._modules[NAMED]
        if name not in named:
            named[name] = AdapterHolder()
        return named[name]

    def add_part(self, name: str, part: LayerAdapter) -> None:
        self.parts[name] = part
        self.orders[name] = part.order
        self.mixed_plan = None

    def remove_part(self, name: str) -> None:
        self.parts.pop(name).remove()
        del self.orders[name]
        self.mixed_plan = None
        named = self._modules.get(NAMED)
        if named is not None and name in named:
            del named[name]
            if not len(named):
                del self._modules[NAMED]

    # Which adapter computes.

    def current(self) -> LayerAdapter | None:
        """The part this call computes when every sample uses the same adapter; None: the base alone."""
        routing = self.routing
        if routing is not None:
            return self.parts.get(routing.single) if routing.single is not None else None
        if self.disabled or self.merged_name is not None:
            return None  # a merged adapter is in the base's weights
        return self.parts.get(self.active) if self.active is not None else None

    def plain_delta(self) -> bool:
        """Whether this call computes base(x) + delta(x) of one low-rank adapter, unmerged and without dropout:
        what vera_cli.fast may compute another way."""
        part = self.current()
        return part is not None and part.low_rank and part.dropout == 0

    def _active_part(self) -> LayerAdapter:
        part = self.current()
        if part is None:
            raise AdapterError("this layer computes no adapter now (none active here, disabled, or merged)")
        return part

    # The active adapter, as the single-adapter layers always offered it.

    @property
    def merged(self) -> bool:
        return self.merged_name is not None

    @property
    def rank(self) -> int:
        return self._active_part().rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._active_part().delta(self, x)

    def frozen_delta_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._active_part().frozen_delta_input(self, x)

    def delta_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        return self._active_part().delta_from_frozen(self, frozen)

    def delta_weight(self) -> torch.Tensor:
        return self._active_part().delta_weight(self)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._active_part().projections(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing is not None:
            if x.shape[0] != routing.size:
                raise AdapterError(f"a mixed batch names an adapter for {routing.size} samples, but this layer got "
                                   f"{x.shape[0]} rows: adapted layers must see the batch as their first dimension")
            if not routing.uniform:
                return self._mixed(x, routing)
        part = self.current()
        return self.base(x) if part is None else part.output(self, x)

    def _mixed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        groups = routing.groups(self, x.device)
        if len(groups) == 1 and groups[0].rows is None:
            whole = groups[0].kind.whole(self, x, groups[0])
            if whole is not None:
                return whole
        out = self.base(x)
        for group in groups:
            out = group.kind.mixed(self, x, out, group)
        return out

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter `name` (default: the active one) into the base weights; one adapter at a time."""
        name = name if name is not None else self.active
        if self.merged_name == name or name not in self.parts:
            return
        if self.merged_name is not None:
            raise AdapterError(f"adapter {self.merged_name!r} is merged: unmerge it before merging {name!r}")
        weight, bias = self.parts[name].merged_weights(self)
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise AdapterError("refusing to merge: the adapter's weights are not finite (the run diverged; lower the learning rate)")
        # The base's own weights are kept, so that unmerging restores them exactly (no rounding left behind).
        original_bias = self.base.bias.detach().clone() if bias is not None else None
        self._unmerged = (self.base.weight.detach().clone(), original_bias)
        self.base.weight.copy_(weight)
        if bias is not None:
            self.base.bias.copy_(bias)
        self.merged_name = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._unmerged is None:
            return
        weight, bias = self._unmerged
        self.base.weight.copy_(weight)
        if bias is not None:
            self.base.bias.copy_(bias)
        self._unmerged = None
        self.merged_name = None


class LinearGeometry:
    """Factors act as matrix products over the last dimension; per-feature vectors scale it."""

    base: nn.Linear

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.apply_weight(x, weight, self.base.bias)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def positions(x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    @staticmethod
    def down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)

    def down_geometry(self) -> tuple:
        """What `down` depends on besides x and a: layers alike in it project one input alike."""
        return ()

    @staticmethod
    def up(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, b)

    @staticmethod
    def per_feature(v: torch.Tensor) -> torch.Tensor:
        return v

    @staticmethod
    def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(n, k) values, one row per sample, shaped to scale the k features of `like` (n, ..., k)."""
        return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[1])

    def down_per_sample(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Each sample through its own (k, in) matrix: x (n, ..., in), a (n, k, in) -> (n, ..., k)."""
        return self.up_per_sample(x, a)

    @staticmethod
    def up_per_sample(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        product = torch.bmm(h.reshape(n, -1, h.shape[-1]), b.reshape(n, b.shape[1], -1).transpose(1, 2))
        return product.view(*h.shape[:-1], b.shape[1])


class Conv2dGeometry:
    """Factors act as convolutions on (N, C, H, W); per-feature vectors scale the channels."""

    base: nn.Conv2d

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.apply_weight(x, weight, self.base.bias)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.base.stride, self.base.padding, self.base.dilation)

    def positions(self, x: torch.Tensor) -> int:
        # Output positions, to within the border the kernel loses.
        stride_y, stride_x = self.base.stride
        return x.shape[0] * (x.shape[-2] // stride_y) * (x.shape[-1] // stride_x)

    def down_geometry(self) -> tuple:
        base = self.base
        return tuple(base.weight.shape[1:]), base.stride, base.padding, base.dilation

    def down(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # (r, fan_in) viewed as an (r, in, kh, kw) kernel: a view, also of a sliced pair's columns.
        kernel = a.view(a.shape[0], *self.base.weight.shape[1:])
        return F.conv2d(x, kernel, None, self.base.stride, self.base.padding, self.base.dilation)

    @staticmethod
    def up(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, b.view(b.shape[0], b.shape[1], 1, 1))

    @staticmethod
    def per_feature(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]

    @staticmethod
    def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v[:, :, None, None]

    def down_per_sample(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Each sample through its own kernel, as one grouped convolution: x (n, C, H, W), a (n, k, C, kh, kw)
        (or (n, k, C * kh * kw)) -> (n, k, H', W')."""
        n, k = a.shape[:2]
        kernel = a.reshape(n * k, *self.base.weight.shape[1:])
        y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernel, None, self.base.stride, self.base.padding,
                     self.base.dilation, groups=n)
        return y.view(n, k, *y.shape[2:])

    @staticmethod
    def up_per_sample(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Each sample through its own 1x1 convolution: h (n, r, H, W), b (n, out, r[, 1, 1]) -> (n, out, H, W)."""
        n, out = b.shape[:2]
        y = F.conv2d(h.reshape(1, -1, *h.shape[2:]), b.reshape(n * out, -1, 1, 1), groups=n)
        return y.view(n, out, *y.shape[2:])


class AdaptedLinear(LinearGeometry, AdaptedLayer):
    """An nn.Linear carrying adapters."""


class AdaptedConv2d(Conv2dGeometry, AdaptedLayer):
    """An nn.Conv2d carrying adapters."""


def adapted_class(layer: nn.Module) -> type[AdaptedLayer]:
    return AdaptedConv2d if isinstance(layer, nn.Conv2d) else AdaptedLinear
