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


def test_pixel_shuffle_shapes_and_token_count():
    proj = build_projector("pixel_shuffle", 24, 32, grid=(4, 6), factor=2)
    assert proj.num_tokens((4, 6)) == 6
    assert proj(torch.randn(2, 24, 24)).shape == (2, 6, 32)
    assert proj.proj.in_features == 24 * 4


def test_pixel_shuffle_geometry_is_row_major_blocks():
    r, rows, cols = 2, 4, 6
    proj = build_projector("pixel_shuffle", 3, 8, grid=(rows, cols), factor=r)
    x = torch.randn(1, rows * cols, 3)
    shuffled = proj.shuffle(x).reshape(rows // r, cols // r, r, r, 3)  # (i, j, a, b, Dv)
    for i in range(rows // r):
        for j in range(cols // r):
            for a in range(r):
                for b in range(r):
                    assert torch.equal(shuffled[i, j, a, b], x[0, (r * i + a) * cols + r * j + b])
    assert torch.allclose(proj(x), proj.proj(proj.shuffle(x)))


def test_pixel_shuffle_refuses_bad_grids_and_cls_tokens():
    with pytest.raises(ValueError, match="pixel_shuffle: patch grid 5x5 does not divide by factor 2"):
        build_projector("pixel_shuffle", 4, 8, grid=(5, 5))
    proj = build_projector("pixel_shuffle", 4, 8, grid=(4, 4))
    with pytest.raises(ValueError, match="select_feature='patch'"):
        proj.num_tokens((4, 4), extra_tokens=1)
    with pytest.raises(ValueError, match="got 17 patch features, expected a 4x4 grid"):
        proj(torch.randn(1, 17, 4))


def dependency(proj, grid, extra_tokens=0):  # (N, P): output token n changes with input token p
    x = torch.randn(1, extra_tokens + grid[0] * grid[1], 4)
    jac = torch.autograd.functional.jacobian(lambda t: proj(t).sum(-1), x)  # (1, N, 1, P, Dv)
    return jac[0, :, 0].abs().sum(-1) > 0


@pytest.mark.parametrize(
    "name, options, grid, extra",
    [
        ("linear", {}, (3, 4), 0),
        ("linear", {}, (2, 2), 1),  # a kept CLS token maps to no patch
        ("mlp2x_gelu", {}, (3, 4), 0),
        ("avgpool", {"pool": 2}, (4, 6), 0),
        ("pixel_shuffle", {"factor": 2}, (4, 6), 0),
        ("pixel_shuffle", {"factor": 3}, (6, 3), 0),
    ],
)
def test_token_to_patch_weights_match_what_each_token_depends_on(name, options, grid, extra):
    """Each image token's weights sum to 1 over exactly the patches its output depends on (by gradients)."""
    torch.manual_seed(0)
    proj = build_projector(name, 4, 8, grid=grid, **options)
    weights = proj.token_to_patch_weights(grid, extra)
    assert weights.shape == (proj.num_tokens(grid, extra), grid[0] * grid[1])
    assert torch.allclose(weights[extra:].sum(1), torch.ones(len(weights) - extra))
    assert torch.equal(weights[:extra], torch.zeros(extra, grid[0] * grid[1]))
    depends = dependency(proj, grid, extra)  # (N, extra + P)
    assert torch.equal(weights > 0, depends[:, extra:])


def test_pixel_shuffle_builds_saves_and_reloads_from_the_cli(asset_dir, tmp_path, capsys):
    from minillava import load
    from minillava.cli import main

    out = tmp_path / "ps"
    argv = ["build", "--vision", str(asset_dir("vision", "clip")), "--llm", str(asset_dir("llm", "llama"))]
    assert main([*argv, "--projector", "pixel_shuffle", "--out", str(out)]) == 0
    assert "4 tokens per image" in capsys.readouterr().out  # 32 px / 8 px patches = 4x4 grid -> 2x2
    model, processor = load(str(out), device="cpu")
    assert model.projector.name == "pixel_shuffle" and processor.tokens_per_image == 4
    torch.nn.init.normal_(model.projector.proj.weight)  # a trained projector, not the fresh one just saved
    model.save_pretrained(tmp_path / "again", processor)
    again, _ = load(str(tmp_path / "again"), device="cpu")
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.encode_images(pixels), again.encode_images(pixels))
    assert main([*argv, "--projector", "pixel_shuffle", "--select-feature", "cls_patch", "--out", str(out)]) == 1
    assert "pixel_shuffle regroups the patch grid only" in capsys.readouterr().err
