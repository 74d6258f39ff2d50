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


def test_options_are_checked():
    with pytest.raises(ValueError, match="projector 'perceiver' has no option latents; it takes: depth, dim_head"):
        build_projector("perceiver", 24, 32, grid=(4, 4), latents=4)
    with pytest.raises(ValueError, match="at least 1"):
        build_projector("perceiver", 24, 32, grid=(4, 4), depth=0)


def test_model_save_load_keeps_options_and_logits(asset_dir, tmp_path):
    cfg = ModelConfig(
        vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
        projector=ProjectorConfig(name="perceiver", options=dict(SMALL)),
        llm_source=str(asset_dir("llm", "llama")),
    )
    torch.manual_seed(0)
    model, p = MiniLlava.build(cfg)
    assert model.tokens_per_image == p.tokens_per_image == 5
    model.save_pretrained(tmp_path / "m", p)
    loaded, lp = MiniLlava.from_pretrained(tmp_path / "m")
    assert loaded.config.projector.options == SMALL and lp.tokens_per_image == 5
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
