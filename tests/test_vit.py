"""The small Vision Transformer: shapes, named projections, size, learning, determinism."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synthetic import synthetic_batch
from vera_cli.errors import VeraError
from vera_cli.models import ModelConfig, ViT, ViTConfig, build_model, count_parameters

TINY = ViTConfig(patch_size=8, dim=16, depth=2, heads=2, mlp_ratio=2)


def tiny_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return build_model(ModelConfig("vit", TINY))


def images(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(batch[b"data"], dtype=torch.float32).view(-1, 3, 32, 32)
    return (x / 255 - 0.5) / 0.25, torch.as_tensor(batch[b"labels"])


def test_cifar_images_in_logits_out_and_each_image_is_classified_on_its_own():
    model = tiny_vit().eval()
    x = torch.randn(5, 3, 32, 32)
    assert model.features(x).shape == (5, 16)
    logits = model(x)
    assert logits.shape == (5, 10)
    # Attention mixes the tokens of one image, never two images: a view or transpose that mixed the batch
    # into the tokens or heads would give an image other logits beside other images than alone.
    for i in range(5):
        torch.testing.assert_close(model(x[i:i + 1]), logits[i:i + 1], rtol=1e-5, atol=1e-6)
    # The position embedding tells the patches apart: the same patches in another order are another image.
    swapped = torch.cat([x[:, :, 8:], x[:, :, :8]], dim=2)  # the top row of 8 x 8 patches moved to the bottom
    assert not torch.allclose(model.features(swapped), model.features(x), atol=1e-4)


def test_the_tokens_run_through_the_blocks_token_major():
    # The patch convolution's output is channel-major; carried as a transposed view it would make every
    # residual sum channel-major too and every layer norm copy its input first (the step's speed, not its values).
    model = tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.tokens(x)
    assert tokens.is_contiguous()
    block_out = model.blocks[0](tokens)
    assert block_out.is_contiguous()
    # The same values as the transposed view gave.
    expected = model.embed.proj(x).flatten(2).transpose(1, 2) + model.embed.position
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_attention_has_separate_query_key_value_out_and_the_head_is_the_last_linear():
    model = tiny_vit()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for block in range(2):
        for proj in ("query", "key", "value", "out"):
            assert linears[f"blocks.{block}.attn.{proj}"].weight.shape == (16, 16)
        assert linears[f"blocks.{block}.mlp.fc1"].weight.shape == (32, 16)
        assert linears[f"blocks.{block}.mlp.fc2"].weight.shape == (16, 32)
    assert list(linears)[-1] == "head" and linears["head"].weight.shape == (10, 16)
    assert len(linears) == 2 * 6 + 1


@pytest.mark.parametrize("cfg", [TINY, ViTConfig()])
def test_parameter_count_follows_the_formula(cfg):
    d, h, p, n = cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.patch_size, (32 // cfg.patch_size) ** 2
    embed = 3 * p * p * d + d + n * d
    block = 2 * 2 * d + 4 * (d * d + d) + (d * h + h) + (h * d + d)
    expected = embed + cfg.depth * block + 2 * d + (d * 10 + 10)
    assert count_parameters(build_model(ModelConfig("vit", cfg))) == expected
    if cfg == ViTConfig():
        assert expected == 545_930


def test_learns_the_synthetic_classes_in_a_few_epochs():
    model = tiny_vit()
    x, y = images(synthetic_batch(250, 0))
    test_x, test_y = images(synthetic_batch(100, 99))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        for index in torch.randperm(len(x)).split(25):
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model.eval()(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy >= 0.7  # chance is 0.1


def test_the_same_seed_builds_the_same_weights_and_another_seed_does_not():
    same = tiny_vit(0).state_dict(), tiny_vit(0).state_dict()
    other = tiny_vit(1).state_dict()
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    assert not torch.equal(same[0]["blocks.0.attn.query.weight"], other["blocks.0.attn.query.weight"])


def test_a_bare_name_builds_the_default_settings():
    assert count_parameters(build_model("vit")) == count_parameters(build_model(ModelConfig("vit")))
    assert count_parameters(build_model(ModelConfig())) == 76_286


@pytest.mark.parametrize("settings, message", [
    (dict(patch_size=5), "model.vit.patch_size must divide the image size 32, got 5"),
    (dict(dim=100, heads=8), r"model.vit.dim \(100\) must be a positive multiple of model.vit.heads \(8\)"),
    (dict(depth=0), "model.vit.depth must be at least 1"),
    (dict(dropout=1.0), r"model.vit.dropout must be in \[0, 1\)"),
])
def test_impossible_settings_are_refused_with_the_key_to_fix(settings, message):
    with pytest.raises(VeraError, match=message):
        ModelConfig("vit", ViTConfig(**settings))
