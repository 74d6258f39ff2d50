import copy
import json

import pytest
import torch

from minillava.cli import main
from minillava.config import ModelConfig, ProjectorConfig, VisionConfig, XattnConfig
from minillava.fusion import MaskedCrossAttention, arrange_media
from minillava.generate import GenerationConfig, Generator
from minillava.model import MiniLlava
from minillava.projectors import build_projector
from minillava.resampler import PerceiverAttention
from minillava.viz import eager_attention, visualize
from minillava.viz.attention import image_span, patch_weights

IMAGE = "examples/images/chelsea.jpg"
PERCEIVER = {"num_latents": 5, "depth": 2, "heads": 2, "dim_head": 8}


@pytest.fixture(scope="module")
def pixel_shuffle_model(build_tiny):
    return build_tiny(projector="pixel_shuffle")


def test_image_share_is_the_attention_mass_on_image_positions(tiny):
    model, processor = tiny
    before = model.llm.config._attn_implementation
    vis = visualize(model, processor, IMAGE, "What is this?", max_new_tokens=4)
    assert model.llm.config._attn_implementation == before == "sdpa"  # the fast path stays the default

    prompt = Generator(model, processor).encode("What is this?", [IMAGE])
    answer = Generator(model, processor).generate("What is this?", [IMAGE], GenerationConfig(max_new_tokens=4))
    assert vis.answer == answer  # the tokens are the normal greedy generation's
    n_prompt, g = len(prompt.input_ids), len(vis.tokens)
    assert vis.input_ids[:n_prompt] == prompt.input_ids
    assert vis.query_positions == list(range(n_prompt - 1, n_prompt - 1 + g))

    att = vis.attention
    assert att.mode == "splice"
    layers, heads = model.llm.config.num_hidden_layers, model.llm.config.num_attention_heads
    assert att.image_share.shape == (g, layers, heads) and att.attention_rows.shape == (layers, heads, g, n_prompt + g)
    assert ((att.image_share >= 0) & (att.image_share <= 1)).all() and att.image_share.sum() > 0
    rows = att.attention_rows
    assert torch.allclose(rows.sum(-1), torch.ones(layers, heads, g), atol=1e-5)  # softmax rows
    for k, q in enumerate(vis.query_positions):  # causal: query q sees keys up to q and no further
        assert (rows[:, :, k, q + 1 :] == 0).all() and (rows[:, :, k, q] > 0).all()

    k = g - 1  # by hand, for one token: sum the row over the positions holding image placeholders
    image_positions = [i for i, t in enumerate(vis.input_ids) if t == processor.image_token_id]
    for layer in range(layers):
        for head in range(heads):
            by_hand = sum(float(rows[layer, head, k, i]) for i in image_positions)
            assert att.image_share[k, layer, head].item() == pytest.approx(by_hand, abs=1e-5)


def test_first_token_share_equals_an_eager_pass_over_the_prompt_alone(tiny):
    """The query that predicted token 0 is the prompt's last position: later tokens cannot change its row."""
    model, processor = tiny
    vis = visualize(model, processor, IMAGE, "Describe it.", max_new_tokens=3)
    prompt = Generator(model, processor).encode("Describe it.", [IMAGE])
    start, end = image_span(prompt.input_ids, processor.image_token_id)
    with torch.no_grad(), eager_attention(model.llm):
        embeds = model.embed(torch.tensor([prompt.input_ids]), prompt.pixel_values)
        attentions = model.llm.base_model(inputs_embeds=embeds, output_attentions=True).attentions
    expected = torch.stack([a[0, :, -1, start:end].sum(-1) for a in attentions])  # (L, H)
    assert torch.allclose(vis.attention.image_share[0], expected, atol=1e-5)


def test_heatmaps_spread_each_token_over_its_block(pixel_shuffle_model):
    model, processor = pixel_shuffle_model
    vis = visualize(model, processor, IMAGE, "What is this?", max_new_tokens=2)
    start, end = vis.attention.image_span
    assert end - start == 4 and vis.heatmaps.shape[1:] == (4, 4)  # 4x4 patches, 2x2 tokens of 2x2 patches
    per_token = vis.attention.attention_rows[..., start:end].mean(dim=(0, 1))  # (G, 4): mean over layers and heads
    for k in range(len(vis.tokens)):
        for i in range(2):
            for j in range(2):
                block = vis.heatmaps[k, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                assert torch.allclose(block, per_token[k, 2 * i + j].expand(2, 2) / 4)
        assert vis.heatmaps[k].sum().item() == pytest.approx(vis.attention.image_share[k].mean().item(), abs=1e-5)


def test_eager_attention_is_restored_after_an_error(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="boom"), eager_attention(model.llm):
        assert model.llm.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.llm.config._attn_implementation == "sdpa"


def test_image_span_needs_exactly_one_run_of_image_tokens():
    assert image_span([1, 9, 9, 9, 2], 9) == (1, 4)
    with pytest.raises(ValueError, match="holds no image tokens"):
        image_span([1, 2, 3], 9)
    with pytest.raises(ValueError, match="more than one run"):
        image_span([9, 9, 1, 9, 9], 9)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, processor = tiny
    out = tmp_path_factory.mktemp("viz") / "model"
    model.save_pretrained(out, processor)
    return out


def test_cli_writes_pngs_and_well_formed_json(saved, tmp_path, capsys):
    out = tmp_path / "viz"
    argv = ["viz", "--model", str(saved), "--image", IMAGE, "--prompt", "What is this?", "--max-new-tokens", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "of attention on the image" in capsys.readouterr().out
    data = json.loads((out / "attention.json").read_text())
    assert data["mode"] == "splice" and "xattn" not in data and set(data["fields"]) >= {"splice.image_share"}
    splice = data["splice"]
    g, layers, heads = len(data["tokens"]), splice["num_layers"], splice["num_heads"]
    assert 1 <= g <= 3 and len(data["token_ids"]) == g and data["patch_grid"] == [4, 4]
    assert splice["image_span"][1] - splice["image_span"][0] == 16 and data["projector"] == "mlp2x_gelu"
    share = torch.tensor(splice["image_share"])
    assert share.shape == (g, layers, heads) and ((share >= 0) & (share <= 1)).all()
    assert torch.tensor(data["heatmaps"]).shape == (g, 4, 4)
    names = {"attention.json", "image_share.png", *(f"heatmap_{k}.png" for k in range(g))}
    assert {p.name for p in out.iterdir()} == names
    for name in names - {"attention.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main([*argv, "--out", str(out), "--max-new-tokens", "1"]) == 0  # an earlier viz is replaced whole
    assert {p.name for p in out.iterdir()} == {"attention.json", "image_share.png", "heatmap_0.png"}
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main([*argv, "--out", str(other)]) == 1
    assert "is not a viz output directory" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_cli_missing_image_is_one_line(saved, tmp_path, capsys):
    out = tmp_path / "viz"
    argv = ["viz", "--model", str(saved), "--image", "/nonexistent.png", "--prompt", "x", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "/nonexistent.png: cannot open image" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    )
    assert not out.exists()


# ---- perceiver: latents back to patches through the resampler's own attention ------------------------------
@pytest.fixture(scope="module")
def build_perceiver(asset_dir):
    def build(fusion: str = "splice"):
        cfg = ModelConfig(
            vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
            projector=ProjectorConfig(name="perceiver", options=dict(PERCEIVER)),
            llm_source=str(asset_dir("llm", "llama")),
            fusion=fusion,
            xattn=XattnConfig(every=1, heads=2, dim_head=8, ff_mult=2),  # a block before both layers, layer 0 too
        )
        torch.manual_seed(3)
        model, processor = MiniLlava.build(cfg)
        return model.eval(), processor

    return build


@pytest.fixture(scope="module")
def xattn_model(build_perceiver):
    model, processor = build_perceiver("xattn")
    with torch.no_grad():
        for i, block in enumerate(model.xattn.values()):  # open, and unequal, so each block's share shows
            block.attn_gate.fill_(0.5 + 0.3 * i)
            block.ff_gate.fill_(0.5)
    return model, processor


def last_layer_row_by_hand(proj, features: torch.Tensor, latent: int, extra: int, patches: int) -> torch.Tensor:
    """Run the resampler's layers one by one, then the last layer's softmax(q.k / sqrt(Dh)) for one latent."""
    r, heads, dim_head = proj.resampler, PERCEIVER["heads"], PERCEIVER["dim_head"]
    latents = r.latents[None]
    for attn, ff in r.layers[:-1]:
        latents = attn(features, latents) + latents
        latents = ff(latents) + latents
    attn = r.layers[-1][0]
    media, lat = attn.norm_media(features)[0], attn.norm_latents(latents)[0]  # (P', D), (L, D)
    q = attn.to_q(lat)[latent].view(heads, dim_head)  # (H, Dh)
    k = attn.to_kv(torch.cat([media, lat]))[:, : heads * dim_head].view(-1, heads, dim_head)  # (P'+L, H, Dh)
    probs = torch.einsum("hd,khd->hk", q, k).div(dim_head**0.5).softmax(-1)  # (H, P'+L)
    row = probs[:, extra : extra + patches].mean(0)  # the patch keys, mean over heads
    return row / row.sum()


@pytest.mark.parametrize("extra", [0, 1])  # 1: a kept CLS token is a key too, but sits nowhere on the grid
def test_perceiver_weights_are_its_last_layer_attention_on_the_patches(extra):
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), **PERCEIVER).eval()
    features = torch.randn(1, extra + 16, 24)
    with torch.no_grad():
        weights = proj.token_to_patch_weights((4, 4), extra, features)
        assert weights.shape == (5, 16) and (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(5))
        for latent in range(5):
            torch.testing.assert_close(weights[latent], last_layer_row_by_hand(proj, features, latent, extra, 16))
        assert not torch.allclose(weights[0], weights[1])  # the map depends on the latent...
        other = proj.token_to_patch_weights((4, 4), extra, torch.randn(1, extra + 16, 24))
        assert not torch.allclose(weights, other)  # ...and on the image
    with pytest.raises(ValueError, match=r"needs one image's features \(1, 16, Dv\), got None"):
        proj.token_to_patch_weights((4, 4))
    with pytest.raises(ValueError, match=r"got \(2, 16, 24\)"):
        proj.token_to_patch_weights((4, 4), 0, torch.randn(2, 16, 24))


def test_resampler_attention_is_what_its_forward_uses_and_only_on_request(monkeypatch):
    torch.manual_seed(0)
    proj = build_projector("perceiver", 24, 32, grid=(4, 4), **PERCEIVER)
    x = torch.randn(3, 16, 24)
    latents, maps = proj.resampler(x, return_attention=True)
    assert maps.shape == (2, 3, 2, 5, 16 + 5)  # (depth, I, H, L, P+L)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 2, 5))

    def materialised(*args):
        raise AssertionError("the normal forward materialised attention probabilities")

    monkeypatch.setattr(PerceiverAttention, "attention", materialised)
    assert torch.equal(proj.resampler(x), latents)  # the normal forward: fused kernel, same result
    attn = proj.resampler.layers[0][0]  # the probabilities reproduce the layer's fused output
    start = proj.resampler.latents.expand(3, -1, -1)
    _, _, v = attn.qkv(x, start)
    torch.testing.assert_close(attn.to_out((maps[0] @ v).transpose(1, 2).flatten(2)), attn(x, start))


def test_perceiver_splice_heatmaps_spread_latents_by_the_resampler_maps(build_perceiver):
    model, processor = build_perceiver()
    vis = visualize(model, processor, IMAGE, "What is this?", max_new_tokens=3)
    start, end = vis.attention.image_span
    assert end - start == 5 and vis.projector == "perceiver"  # one image token per latent
    with torch.no_grad():
        pixels = processor.prompt("What is this?", [IMAGE]).pixel_values
        weights = patch_weights(model, model.vision(pixels))  # (5, 16)
    per_latent = vis.attention.attention_rows[..., start:end].mean(dim=(0, 1))  # (G, 5)
    torch.testing.assert_close(vis.heatmaps.flatten(1), per_latent @ weights)
    torch.testing.assert_close(vis.heatmaps.sum((1, 2)), vis.attention.image_share.mean((1, 2)))


# ---- xattn: no image tokens; the gated cross-attention blocks read the latents -----------------------------
def test_cross_attention_probabilities_are_what_the_forward_uses():
    ids = torch.tensor([[5, 5, 9, 5, 5, 9, 5, 5], [5, 9, 5, 5, 5, 5, 5, 5]])  # 9: the marker
    media, index = arrange_media(ids, torch.randn(3, 4, 6), image_token_id=9)
    torch.manual_seed(0)
    attn = MaskedCrossAttention(dim=8, media_dim=6, heads=2, dim_head=4)
    x = torch.randn(2, 8, 8)
    probs = attn.attention(x, media, index)  # (B, H, T, M*L)
    assert probs.shape == (2, 2, 8, 8)
    assert not probs[0, :, :2].any() and not probs[1, :, :1].any()  # before the first image: reads nothing
    assert not probs[0, :, 2:5, 4:].any() and not probs[0, :, 5:, :4].any()  # only the latest image's latents
    torch.testing.assert_close(probs[0, :, 2:].sum(-1), torch.ones(2, 6))
    _, _, v = attn.qkv(x, media)
    torch.testing.assert_close(attn.to_out((probs @ v).transpose(1, 2).flatten(2)), attn(x, media, index))


def test_xattn_reports_latent_attention_gate_and_relative_norm_per_block(xattn_model):
    model, processor = xattn_model
    before = model.llm.config._attn_implementation
    vis = visualize(model, processor, IMAGE, "What is this?", max_new_tokens=3)
    assert model.llm.config._attn_implementation == before == "sdpa"
    assert all(not block._forward_pre_hooks for block in model.xattn.values())  # nothing left on the model
    assert vis.answer == Generator(model, processor).generate("What is this?", [IMAGE], GenerationConfig(3))
    att, g = vis.attention, len(vis.tokens)
    assert att.mode == "xattn" and att.layers == [0, 1]
    assert att.latent_attention.shape == (g, 2, 2, 5) and att.relative_norm.shape == (g, 2)
    torch.testing.assert_close(att.gate, torch.tensor([0.5, 0.8]).tanh())

    # by hand: each block's input at the query (layer 0: the embeddings; layer 1: what layer 0 handed on, as
    # transformers records it), then its queries against the latents' keys
    ids = torch.tensor([vis.input_ids])
    with torch.no_grad():
        latents = model.encode_images(processor.prompt("What is this?", [IMAGE]).pixel_values)  # (1, 5, D)
        embeds = model.llm.get_input_embeddings()(ids)
        media, index = arrange_media(ids, latents, processor.image_token_id)
        hidden = model.llm.base_model(inputs_embeds=embeds, output_hidden_states=True, media=media, media_index=index)
        block_inputs = [embeds, hidden.hidden_states[1]]
        for b, (block, x) in enumerate(zip(model.xattn.values(), block_inputs, strict=True)):
            x = x[0, vis.query_positions]  # (G, D)
            q = block.attn.to_q(block.attn.norm(x)).view(g, 2, 8)  # (G, H, Dh)
            k, v = block.attn.to_kv(latents[0]).view(5, 2, 2, 8).unbind(1)  # (Lat, H, Dh) each
            probs = torch.einsum("ghd,lhd->ghl", q, k).div(8**0.5).softmax(-1)  # (G, H, Lat)
            torch.testing.assert_close(att.latent_attention[:, b], probs)
            added = block.attn.to_out(torch.einsum("ghl,lhd->ghd", probs, v).flatten(1)) * block.attn_gate.tanh()
            torch.testing.assert_close(att.relative_norm[:, b], added.norm(dim=-1) / x.norm(dim=-1))
    assert (att.relative_norm > 0).all()

    with torch.no_grad():  # the heatmap: latents spread over the patches by the resampler's maps
        weights = patch_weights(model, model.vision(processor.prompt("What is this?", [IMAGE]).pixel_values))
    torch.testing.assert_close(vis.heatmaps.flatten(1), att.latent_attention.mean((1, 2)) @ weights)
    torch.testing.assert_close(vis.heatmaps.sum((1, 2)), torch.ones(g))


def test_xattn_closed_gates_add_nothing_but_attention_still_shows(xattn_model):
    model, processor = xattn_model
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.zero_()
    att = visualize(model, processor, IMAGE, "What is this?", max_new_tokens=2).attention
    assert not att.gate.any() and not att.relative_norm.any()
    torch.testing.assert_close(att.latent_attention.sum(-1), torch.ones(*att.latent_attention.shape[:3]))


def test_normal_generation_never_materialises_attention(xattn_model, monkeypatch):
    model, processor = xattn_model

    def materialised(*args):
        raise AssertionError("the fast path materialised attention probabilities")

    monkeypatch.setattr(PerceiverAttention, "attention", materialised)
    monkeypatch.setattr(MaskedCrossAttention, "attention", materialised)
    assert isinstance(Generator(model, processor).generate("What is this?", [IMAGE], GenerationConfig(3)), str)


@pytest.mark.parametrize("fusion", ["splice", "xattn"])
def test_cli_writes_perceiver_and_xattn_visualizations(build_perceiver, fusion, tmp_path, capsys):
    model, processor = build_perceiver(fusion)
    model.save_pretrained(tmp_path / "model", processor)
    out = tmp_path / "viz"
    argv = ["viz", "--model", str(tmp_path / "model"), "--image", IMAGE, "--prompt", "What is this?"]
    # float32: "auto" is bfloat16 on a CPU with bf16 units, where the heatmaps sum to 1 only to ~1e-3
    assert main([*argv, "--max-new-tokens", "2", "--dtype", "float32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "attention.json").read_text())
    g, other = len(data["tokens"]), {"splice": "xattn", "xattn": "splice"}[fusion]
    assert data["mode"] == fusion and fusion in data and other not in data and data["projector"] == "perceiver"
    assert all(not name.startswith(other) for name in data["fields"])
    heat = torch.tensor(data["heatmaps"])
    assert heat.shape == (g, 4, 4)
    if fusion == "xattn":
        assert "xattn adds" in printed and "of |residual|" in printed
        numbers = data["xattn"]
        assert numbers["layers"] == [0, 1] and numbers["num_latents"] == 5 and numbers["gate"] == [0.0, 0.0]
        assert torch.tensor(numbers["latent_attention"]).shape == (g, 2, 2, 5)
        assert torch.tensor(numbers["relative_norm"]).shape == (g, 2)
        torch.testing.assert_close(heat.sum((1, 2)), torch.ones(g), atol=1e-4, rtol=0)
    else:
        assert "of attention on the image" in printed
        assert data["splice"]["image_span"][1] - data["splice"]["image_span"][0] == 5
    summary = "xattn.png" if fusion == "xattn" else "image_share.png"
    names = {"attention.json", summary, *(f"heatmap_{k}.png" for k in range(g))}
    assert {p.name for p in out.iterdir()} == names
    for name in names - {"attention.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
