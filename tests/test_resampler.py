import pytest
import torch
from PIL import Image

from minillava.cli import main
from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
from minillava.model import MiniLlava
from minillava.projectors import build_projector
from minillava.resampler import PerceiverAttention

RED = Image.new("RGB", (40, 30), (200, 10, 10))
SMALL = {"num_latents": 5, "depth": 2, "heads": 2, "dim_head": 8}


def test_shapes_and_token_count_do_not_depend_on_the_grid():
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), **SMALL)
    assert proj.num_tokens((4, 4)) == 5 == proj.num_tokens((4, 4), extra_tokens=1) == proj.num_tokens((7, 7))
    assert proj(torch.randn(3, 16, 24)).shape == (3, 5, 32)
    assert proj(torch.randn(2, 17, 24)).shape == (2, 5, 32)  # CLS kept: still 5 tokens
    assert len(proj.resampler.layers) == 2


def test_latents_attend_to_media_and_themselves():
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=6, heads=2, dim_head=4)
    media, latents = torch.randn(2, 5, 6), torch.randn(2, 3, 6)
    m, lat = attn.norm_media(media), attn.norm_latents(latents)
    q = attn.to_q(lat).view(2, 3, 2, 4).transpose(1, 2)  # (I, H, L, Dh)
    k, v = attn.to_kv(torch.cat([m, lat], 1)).view(2, 8, 2, 2, 4).permute(2, 0, 3, 1, 4)  # each (I, H, P+L, Dh)
    weights = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # 1/sqrt(Dh)
    assert weights.shape[-1] == 5 + 3  # keys: the 5 patches and the 3 latents
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(attn(media, latents), expected)


def test_gradients_reach_every_weight_and_the_input():
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), **SMALL)
    x = torch.randn(2, 16, 24, requires_grad=True)
    proj(x).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def block_means(x, grid, k):  # (B, E+R*C, D) -> (B, E+R*C/k^2, D), written out patch by patch
    (rows, cols), extra = grid, x.shape[1] - grid[0] * grid[1]
    blocks = [
        torch.stack([x[:, extra + (k * i + a) * cols + k * j + b] for a in range(k) for b in range(k)]).mean(0)
        for i in range(rows // k)
        for j in range(cols // k)
    ]
    return torch.cat([x[:, :extra], torch.stack(blocks, 1)], 1)


@pytest.mark.parametrize("extra", [0, 1])  # 1: a kept CLS token passes unpooled, ahead of the blocks
def test_pool_feeds_the_resampler_block_means(extra):
    torch.manual_seed(0)
    pooled = build_projector("perceiver", 24, 32, grid=(4, 6), pool=2, **SMALL)
    plain = build_projector("perceiver", 24, 32, grid=(2, 3), **SMALL)
    plain.load_state_dict(pooled.state_dict())  # the same weights; only the input differs
    x = torch.randn(2, extra + 24, 24)
    assert pooled.pool_patches(x).shape == (2, extra + 6, 24)
    torch.testing.assert_close(pooled.pool_patches(x), block_means(x, (4, 6), 2))
    torch.testing.assert_close(pooled(x), plain(block_means(x, (4, 6), 2)))
    assert pooled.num_tokens((4, 6), extra) == 5


def test_pool_refuses_grids_it_does_not_divide():
    with pytest.raises(ValueError, match="perceiver: patch grid 5x5 does not divide by pool size 2"):
        build_projector("perceiver", 24, 32, grid=(5, 5), pool=2, **SMALL)
    with pytest.raises(ValueError, match="does not divide by pool size 0"):
        build_projector("perceiver", 24, 32, grid=(4, 4), pool=0, **SMALL)


@pytest.mark.parametrize("options", [{"pool": 2}, {"layout_rank": 2}])
def test_fewer_features_than_the_grid_are_refused(options):
    """Both readings of the grid (the pooled keys, the layout map) need the whole grid; one check serves both."""
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), **options, **SMALL)
    with pytest.raises(ValueError, match="perceiver: got 9 patch features, expected a 4x4 grid"):
        proj(torch.randn(1, 9, 24))


@pytest.mark.parametrize("extra", [0, 1])
def test_pooled_latents_map_back_evenly_over_each_block(extra):
    """A pooled key's attention spreads over the 4 patches under it, a quarter each; rows still sum to 1."""
    torch.manual_seed(0)
    pooled = build_projector("perceiver", 24, 32, grid=(4, 4), pool=2, **SMALL).eval()
    plain = build_projector("perceiver", 24, 32, grid=(2, 2), **SMALL).eval()
    plain.load_state_dict(pooled.state_dict())
    features = torch.randn(1, extra + 16, 24)
    with torch.no_grad():
        weights = pooled.token_to_patch_weights((4, 4), extra, features)  # (L, 16)
        on_blocks = plain.token_to_patch_weights((2, 2), extra, block_means(features, (4, 4), 2))  # (L, 4)
    assert weights.shape == (5, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    block_of = [(p // 4 // 2) * 2 + (p % 4) // 2 for p in range(16)]  # row-major patch -> its 2x2 block
    torch.testing.assert_close(weights, on_blocks[:, block_of] / 4)


@pytest.mark.parametrize("extra", [0, 1])  # 1: a kept CLS token, which the layout reading leaves out
def test_layout_adds_a_low_rank_reading_of_the_grid_by_position(extra):
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), pool=2, layout_rank=3, **SMALL).eval()
    plain = build_projector("perceiver", 24, 32, grid=(4, 4), pool=2, **SMALL).eval()
    plain.load_state_dict(proj.state_dict(), strict=False)
    x = torch.randn(2, extra + 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), plain(x))  # the layout's output layer starts at zero
        for w in proj.layout.parameters():
            w.normal_()
        down, up = proj.layout[0].weight, proj.layout[1]  # (3, 4*24), (5*32, 3)
        blocks = block_means(x, (4, 4), 2)[:, extra:]  # (2, 4, 24)
        # position k of the pooled grid has its own slice of the down map: what sits where is read
        low = sum(blocks[:, k] @ down[:, 24 * k : 24 * (k + 1)].T for k in range(4))  # (2, 3)
        expected = plain(x) + (low @ up.weight.T + up.bias).view(2, 5, 32)
        torch.testing.assert_close(proj(x), expected)


def test_only_the_layout_reading_sees_where_patches_sit():
    """Without position embeddings the latents' softmax-weighted means do not change when patches trade
    places; the layout reading does."""
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(2, 2), layout_rank=4, **SMALL).eval()
    with torch.no_grad():
        proj.layout[1].weight.normal_()
        x = torch.randn(1, 4, 24)
        swapped = x[:, [1, 0, 2, 3]]
        latents = proj.linear(proj.resampler(proj.standardize(x)))
        torch.testing.assert_close(latents, proj.linear(proj.resampler(proj.standardize(swapped))))
        assert not torch.allclose(proj(x), proj(swapped))


def test_layout_gradients_reach_both_maps_once_the_output_map_moves():
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), layout_rank=3, **SMALL)
    proj(torch.randn(2, 16, 24)).pow(2).sum().backward()
    assert proj.layout[0].weight.grad.abs().sum() == 0  # zero output map: the first step moves only it
    assert proj.layout[1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        proj.layout[1].weight.normal_()
    proj.zero_grad()
    proj(torch.randn(2, 16, 24)).pow(2).sum().backward()
    assert proj.layout[0].weight.grad.abs().sum() > 0


def test_layout_refuses_a_negative_rank():
    with pytest.raises(ValueError, match="layout_rank must be 0 \\(off\\) or more, got -1"):
        build_projector("perceiver", 24, 32, grid=(4, 4), layout_rank=-1, **SMALL)


@pytest.mark.parametrize("pool", [1, 2])
def test_patch_weights_of_a_bfloat16_projector_are_float32(pool):
    """The block map is float32; a bfloat16 model (`--dtype auto` on a CPU with bf16 units) must not meet it raw."""
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), pool=pool, **SMALL).eval().to(torch.bfloat16)
    with torch.no_grad():
        weights = proj.token_to_patch_weights((4, 4), 0, torch.randn(1, 16, 24, dtype=torch.bfloat16))
    assert weights.dtype == torch.float32 and weights.shape == (5, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5), atol=1e-5, rtol=0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="projector 'perceiver' has no option latents; it takes: depth, dim_head"):
        build_projector("perceiver", 24, 32, grid=(4, 4), latents=4)
    with pytest.raises(ValueError, match="at least 1"):
        build_projector("perceiver", 24, 32, grid=(4, 4), depth=0)


@pytest.mark.parametrize("options", [SMALL, SMALL | {"layout_rank": 4}])
def test_model_save_load_keeps_options_and_logits(asset_dir, tmp_path, options):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
        projector=ProjectorConfig(name="perceiver", options=dict(options)),
        llm_source=str(asset_dir("llm", "llama")),
    )
    torch.manual_seed(0)
    model, p = MiniLlava.build(cfg)
    assert model.tokens_per_image == p.tokens_per_image == 5
    with torch.no_grad():  # away from the initialisation (the layout's output map starts at zero)
        for w in model.projector.parameters():
            w.add_(0.1 * torch.randn_like(w))
    model.save_pretrained(tmp_path / "m", p)
    loaded, lp = MiniLlava.from_pretrained(tmp_path / "m")
    assert loaded.config.projector.options == options and lp.tokens_per_image == 5
    batch = p.collate([p.prompt("What is this?", [RED])])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_cli_build_with_projector_options(asset_dir, tmp_path, capsys):
    common = ["build", "--vision", str(asset_dir("vision", "clip")), "--llm", str(asset_dir("llm", "llama"))]
    opts = ["--projector-opt", "num_latents=7", "--projector-opt", "heads=2", "--projector-opt", "dim_head=8"]
    assert main([*common, "--projector", "perceiver", *opts, "--out", str(tmp_path / "m")]) == 0
    assert "7 tokens per image" in capsys.readouterr().out
    assert MiniLlava.from_pretrained(tmp_path / "m")[0].config.projector.options == {
        "num_latents": 7,
        "heads": 2,
        "dim_head": 8,
    }
    assert main([*common, "--projector", "perceiver", "--projector-opt", "num_latents", "--out", str(tmp_path)]) == 1
    assert "option 'num_latents' is not KEY=VALUE" in capsys.readouterr().err
