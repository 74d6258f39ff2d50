import json

import pytest
import torch

from minillava.cli import main
from minillava.generate import GenerationConfig, Generator
from minillava.viz import eager_attention, visualize
from minillava.viz.attention import image_span

IMAGE = "examples/images/chelsea.jpg"


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

    layers, heads = model.llm.config.num_hidden_layers, model.llm.config.num_attention_heads
    assert vis.image_share.shape == (g, layers, heads) and vis.attention_rows.shape == (layers, heads, g, n_prompt + g)
    assert ((vis.image_share >= 0) & (vis.image_share <= 1)).all() and vis.image_share.sum() > 0
    rows = vis.attention_rows
    assert torch.allclose(rows.sum(-1), torch.ones(layers, heads, g), atol=1e-5)  # softmax rows
    for k, q in enumerate(vis.query_positions):  # causal: query q sees keys up to q and no further
        assert (rows[:, :, k, q + 1 :] == 0).all() and (rows[:, :, k, q] > 0).all()

    k = g - 1  # by hand, for one token: sum the row over the positions holding image placeholders
    image_positions = [i for i, t in enumerate(vis.input_ids) if t == processor.image_token_id]
    for layer in range(layers):
        for head in range(heads):
            by_hand = sum(float(rows[layer, head, k, i]) for i in image_positions)
            assert vis.image_share[k, layer, head].item() == pytest.approx(by_hand, abs=1e-5)


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
    assert torch.allclose(vis.image_share[0], expected, atol=1e-5)


def test_heatmaps_spread_each_token_over_its_block(pixel_shuffle_model):
    model, processor = pixel_shuffle_model
    vis = visualize(model, processor, IMAGE, "What is this?", max_new_tokens=2)
    start, end = vis.image_span
    assert end - start == 4 and vis.heatmaps.shape[1:] == (4, 4)  # 4x4 patches, 2x2 tokens of 2x2 patches
    per_token = vis.attention_rows[..., start:end].mean(dim=(0, 1))  # (G, 4): mean over layers and heads
    for k in range(len(vis.tokens)):
        for i in range(2):
            for j in range(2):
                block = vis.heatmaps[k, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                assert torch.allclose(block, per_token[k, 2 * i + j].expand(2, 2) / 4)
        assert vis.heatmaps[k].sum().item() == pytest.approx(vis.image_share[k].mean().item(), abs=1e-5)


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
    g, layers, heads = len(data["tokens"]), data["num_layers"], data["num_heads"]
    assert 1 <= g <= 3 and len(data["token_ids"]) == g and data["patch_grid"] == [4, 4]
    assert data["image_span"][1] - data["image_span"][0] == 16 and data["projector"] == "mlp2x_gelu"
    share = torch.tensor(data["image_share"])
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
