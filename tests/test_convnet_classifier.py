"""The ConvNet's classifier on cached features as one autograd node (torch's operators, or one compiled kernel
call each way): the plain path's function and gradients."""

import pytest
import torch

from vera_cli import config
from vera_cli.adapters.inject import inject
from vera_cli.config import AdaptConfig, AdapterConfig
from vera_cli.data import batch_indices, load_cifar10, normalize
from vera_cli.fast import build_pipeline
from vera_cli.fast.build import kernels, library
from vera_cli.models import ConvNet

ADAPTERS = {
    "vera on every layer": AdapterConfig(method="vera", rank=32),
    "vera beside a head trained whole": AdapterConfig(method="vera", rank=32, train_head=True),
    "vera on two layers, the others frozen": AdapterConfig(method="vera", rank=8, targets=["fc1", "fc3"]),
}


def adapted(adapter: AdapterConfig) -> ConvNet:
    torch.manual_seed(0)
    model = inject(ConvNet(), adapter)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a delta that is not zero
    return model


def first_batch(model: ConvNet, cifar_root, batch_size: int = 16):
    data = load_cifar10(cifar_root, download=False)
    cfg = config.load(AdaptConfig, "adapt-vera", {"train.batch_size": batch_size})
    pipeline = build_pipeline(model, data.train, data.test, cfg)
    cached, labels = next(iter(pipeline.train_batches(torch.Generator().manual_seed(0))))
    index = next(iter(batch_indices(len(data.train), batch_size, torch.Generator().manual_seed(0), labels.device)))
    return pipeline, cached, normalize(data.train.images[index]), labels


# The chain's node through each way of computing it.
NODES = {"compiled kernel": "_KernelChainBackward", "torch's operators": "_ChainBackward"}


@pytest.fixture(params=NODES, ids=NODES.keys())
def chain_node(request, monkeypatch) -> str:
    """The chain's node name, with the compiled kernels on or off for the test."""
    if request.param == "compiled kernel" and library() is None:
        pytest.skip("no C compiler here: the chain runs on torch's operators")
    monkeypatch.setenv("VERA_CLI_KERNELS", "on" if request.param == "compiled kernel" else "off")
    kernels.cache_clear()
    yield NODES[request.param]
    monkeypatch.undo()
    kernels.cache_clear()


@pytest.mark.parametrize("batch_size", [16, 13])
@pytest.mark.parametrize("adapter", ADAPTERS.values(), ids=ADAPTERS.keys())
def test_the_cached_classifier_is_one_node_with_the_plain_paths_outputs_and_gradients(adapter, batch_size, chain_node,
                                                                                       machine_threads, cifar_root):
    model = adapted(adapter)
    pipeline, cached, images, labels = first_batch(model, cifar_root, batch_size)
    trained = [p for p in model.parameters() if p.requires_grad]
    fast = pipeline.forward(cached)
    assert type(fast.grad_fn).__name__ == chain_node
    plain = model.classifier(model.features(images))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    losses = [torch.nn.functional.cross_entropy(logits, labels) for logits in (fast, plain)]
    fast_grads, plain_grads = (torch.autograd.grad(loss, trained) for loss in losses)
    assert all(g.abs().max() > 0 for g in plain_grads)  # every trained tensor has a gradient to compare
    torch.testing.assert_close(fast_grads, plain_grads, rtol=1e-4, atol=1e-6)


def test_the_chain_steps_aside_for_lora_a_hook_or_evaluation(chain_node, cifar_root):
    lora = adapted(AdapterConfig(method="lora", rank=8, targets=["fc1", "fc3"]))
    pipeline, cached, images, _ = first_batch(lora, cifar_root)
    out = pipeline.forward(cached)
    assert type(out.grad_fn).__name__ not in NODES.values()
    torch.testing.assert_close(out, lora.classifier(lora.features(images)), rtol=1e-5, atol=1e-5)

    vera = adapted(AdapterConfig(method="vera", rank=8))
    pipeline, cached, images, _ = first_batch(vera, cifar_root)
    seen = []
    handle = vera.fc3.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    assert type(pipeline.forward(cached).grad_fn).__name__ not in NODES.values() and seen == [(16, 84)]
    handle.remove()
    # A hook on the adapted layer's base as well: that layer then runs its own forward, which calls the base.
    handle = vera.fc3.base.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    assert type(pipeline.forward(cached).grad_fn).__name__ not in NODES.values() and seen == [(16, 84)] * 2
    handle.remove()
    # Features that need a gradient get it from the plain path (the chain gives them none).
    needing = cached.clone().requires_grad_()
    [grad] = torch.autograd.grad(pipeline.forward(needing).sum(), needing)
    assert grad.abs().max() > 0
    # A trained tensor changed in place between the forward and the backward is refused, as autograd refuses it.
    for layer in ("fc1", "fc4"):
        out = pipeline.forward(cached)
        with torch.no_grad():
            getattr(vera, layer).current().tensor("vera_b").add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    # A second order through the chain is refused (its first-order gradients lead back to no parameter) instead
    # of giving a wrong figure.
    trained = [p for p in vera.parameters() if p.requires_grad]
    first = torch.autograd.grad(pipeline.forward(cached).pow(2).sum(), trained, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in first), trained)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.forward(cached), vera.classifier(vera.features(images)), rtol=1e-5, atol=1e-5)
