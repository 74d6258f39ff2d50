import pytest
import torch

from minillava.projectors import PROJECTORS, build_projector


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_shapes_and_token_count(name):
    proj = build_projector(name, 24, 32)
    x = torch.randn(2, 16, 24)  # (B, P, Dv)
    y = proj(x)
    assert y.shape == (2, proj.num_tokens((4, 4)), 32)
    assert proj.num_tokens((4, 4), extra_tokens=1) == 17


def test_registry_and_unknown_name():
    assert {"linear", "mlp2x_gelu"} <= set(PROJECTORS)
    with pytest.raises(ValueError, match="unknown projector 'nope'"):
        build_projector("nope", 4, 4)


def test_mlp_matches_llava_15_structure():
    proj = build_projector("mlp2x_gelu", 24, 32)
    x = torch.randn(1, 3, 24)
    expected = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x)))
    assert torch.allclose(proj(x), expected)
