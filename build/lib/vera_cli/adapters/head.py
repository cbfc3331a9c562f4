"""The classifier head's trainable parameters: the layer the model names in `classifier_name`, which may train fully
beside an adapter (PEFT's `modules_to_save`). Counting them apart lets a reader compare adapters on
the VeRA paper's terms (head excluded) and on total terms.
"""

from __future__ import annotations

from torch import nn

from vera_cli.adapters.layer import base_of
from vera_cli.adapters.targets import has_head, head_name


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head's own trainable parameters (an adapter on it is not the head): none when it is frozen or the
    model names no head."""
    if not has_head(model):
        return []
    return [p for p in base_of(model.get_submodule(head_name(model))).parameters() if p.requires_grad]
