import pytest
import torch

from vlmtrain.errors import ConfigError
from vlmtrain.model.connectors import CONNECTORS, build_connector

VISION_DIM, LLM_DIM, GRID = 24, 32, 8  # 8×8 patch grid

# name → (args, expected image tokens for an 8×8 grid)
CASES = {
    "linear": ({}, 64),
    "mlp2x_gelu": ({}, 64),
    "pixel_shuffle": ({"scale_factor": 2}, 16),
    "ldp": ({}, 16),
    "perceiver_resampler": ({"num_latents": 12, "depth": 2, "num_heads": 4}, 12),
    "qformer": ({"num_queries": 10, "depth": 2, "num_heads": 4, "hidden_size": 32}, 10),
    "cross_attn_resampler": ({"num_queries": 9, "num_heads": 4}, 9),
}


def test_every_registered_connector_has_a_case():
    assert set(CONNECTORS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shape_token_count_and_gradients(name):
    torch.manual_seed(0)
    args, tokens = CASES[name]
    c = build_connector(name, VISION_DIM, LLM_DIM, GRID * GRID, GRID, args)
    assert c.num_tokens == tokens
    x = torch.randn(3, GRID * GRID, VISION_DIM, requires_grad=True)
    y = c(x)
    assert y.shape == (3, tokens, LLM_DIM)
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in c.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    assert x.grad.abs().sum() > 0
    # Samples are independent: the output for sample 0 does not depend on sample 1.
    with torch.no_grad():
        alone = c(x[:1])
    torch.testing.assert_close(alone, y[:1].detach(), atol=1e-5, rtol=1e-5)


def test_pixel_shuffle_groups_neighbouring_patches():
    c = build_connector("pixel_shuffle", 1, 4, 16, 4, {"scale_factor": 2})
    with torch.no_grad():
        c.proj.weight.copy_(torch.eye(4))
    x = torch.arange(16.0).reshape(1, 16, 1)  # patch ids on a 4×4 grid, row-major
    y = c(x)
    # first output token = the top-left 2×2 block: patches 0, 1, 4, 5
    assert y[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_bad_connector_args_name_the_field():
    with pytest.raises(ConfigError, match=r"connector.args: pixel_shuffle: scale_factor 3 must divide"):
        build_connector("pixel_shuffle", 8, 8, 64, 8, {"scale_factor": 3})
    with pytest.raises(ConfigError, match=r"needs a square patch grid"):
        build_connector("ldp", 8, 8, 65, None, {})
