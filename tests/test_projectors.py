import pytest
import torch

from minillava.projectors import PROJECTORS, build_projector


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu"])
def test_shapes_and_token_count(name):
    proj = build_projector(name, 24, 32, grid=(4, 4))
    x = torch.randn(2, 16, 24)  # (B, P, Dv)
    y = proj(x)
    assert y.shape == (2, proj.num_tokens((4, 4)), 32)
    assert proj.num_tokens((4, 4), extra_tokens=1) == 17


def test_registry_and_unknown_name():
    assert {"linear", "mlp2x_gelu"} <= set(PROJECTORS)
    with pytest.raises(ValueError, match="unknown projector 'nope'"):
        build_projector("nope", 4, 4, grid=(1, 1))


def test_mlp_matches_llava_15_structure():
    proj = build_projector("mlp2x_gelu", 24, 32, grid=(4, 4))
    x = torch.randn(1, 3, 24)
    expected = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x)))
    assert torch.allclose(proj(x), expected)


def test_avgpool_keeps_grid_geometry():
    proj = build_projector("avgpool", 4, 8, grid=(4, 4), pool=2)
    assert proj.num_tokens((4, 4)) == 4
    x = torch.zeros(1, 16, 4)
    x[0, 0:2, :] = 1.0  # top-left 2x2 block: patches (0,0), (0,1), (1,0), (1,1) -> row-major 0, 1, 4, 5
    x[0, 4:6, :] = 1.0
    pooled = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(1, 4, 4, 4), 2).flatten(2).transpose(1, 2)
    assert torch.equal(pooled[0, :, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(proj(x), proj.mlp(pooled))
    with pytest.raises(ValueError, match="patch grid 5x5 does not divide by pool size 2"):
        build_projector("avgpool", 4, 8, grid=(5, 5))
    with pytest.raises(ValueError, match="select_feature='patch'"):
        proj.num_tokens((4, 4), extra_tokens=1)
