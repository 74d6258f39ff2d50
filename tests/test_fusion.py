"""Flamingo-style xattn fusion on tiny models: identity at init, media masking, caching, batching, save/load,
training."""

import copy
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import louden
from train.train_helpers import config, write_images, write_llava
from transformers import AutoModelForCausalLM

from minillava.cli import main
from minillava.config import ModelConfig, ProjectorConfig, VisionConfig, XattnConfig
from minillava.fusion import XATTN_WEIGHTS, XattnLayer, arrange_media, decoder_layers
from minillava.generate import GenerationConfig, Generator, decode
from minillava.model import MiniLlava, positions_from_mask
from minillava.train.loop import train
from minillava.train.stages import LoraSettings, add_lora, freeze

RED = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 40), (10, 10, 200))
GREEN = Image.new("RGB", (32, 32), (10, 200, 10))
PERCEIVER = {"num_latents": 4, "depth": 1, "heads": 2, "dim_head": 8}


@pytest.fixture(scope="module")
def build_xattn(asset_dir):
    made = {}

    def build(llm: str = "llama", every: int = 1):
        if (llm, every) not in made:
            cfg = ModelConfig(
                vision=VisionConfig(source=str(asset_dir("vision", "clip"))),
                projector=ProjectorConfig(name="perceiver", options=dict(PERCEIVER)),
                llm_source=str(asset_dir("llm", llm)),
                fusion="xattn",
                xattn=XattnConfig(every=every, heads=2, dim_head=8, ff_mult=2),
            )
            torch.manual_seed(3)
            made[llm, every] = MiniLlava.build(cfg)
        model, processor = made[llm, every]
        return copy.deepcopy(model).eval(), processor

    return build


def open_gates(model: MiniLlava, value: float = 1.0) -> MiniLlava:
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)
    return model


def prompt_with_prefix(p, images):
    """Text before the first image, so some tokens precede every image."""
    text = "hello world " + " then ".join(["<image>"] * len(images)) + " what is it?"
    return p.encode([{"role": "user", "content": text}], images, add_generation_prompt=True)


@pytest.mark.parametrize("llm", ["llama", "qwen2", "opt"])
def test_zero_gates_give_the_bare_llm_logits_exactly(build_xattn, llm, tmp_path):
    model, p = build_xattn(llm)
    assert model.tokens_per_image == p.tokens_per_image == 1
    assert all(isinstance(layer, XattnLayer) for layer in decoder_layers(model.llm)[1])
    samples = [prompt_with_prefix(p, [RED, BLUE]), p.prompt("no image, just some text")]
    assert samples[0].input_ids.count(p.image_token_id) == 2  # one marker per image
    batch = p.collate(samples)
    model.save_pretrained(tmp_path / "m", p)
    bare = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "llm")  # llm/ is the plain transformers model
    assert not any("xattn" in n for n, _ in bare.named_parameters())
    mask = batch["attention_mask"]
    with torch.no_grad():
        ours = model(**batch).logits
        ref = bare(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        assert torch.equal(ours, ref)
        assert not torch.equal(open_gates(model)(**batch).logits, ref)


def test_open_gates_image_changes_logits_from_its_marker_on(build_xattn):
    model, p = build_xattn()
    open_gates(model)
    red, blue = (p.collate([prompt_with_prefix(p, [im])]) for im in (RED, BLUE))
    marker = red["input_ids"][0].tolist().index(p.image_token_id)
    with torch.no_grad():
        a, b = model(**red).logits[0], model(**blue).logits[0]
    assert torch.equal(a[:marker], b[:marker])  # tokens before the first image read no media
    assert (a[marker:] - b[marker:]).abs().amax(-1).min() > 1e-4  # every token from the marker on does


def test_a_token_reads_only_its_latest_image():
    ids = torch.tensor([[5, 5, 9, 5, 5, 9, 5, 5], [5, 9, 5, 5, 5, 5, 5, 5]])  # 9: the marker
    feats = torch.randn(3, 4, 6)  # row 0: images 0 and 1; row 1: image 2
    media, index = arrange_media(ids, feats, image_token_id=9)
    assert index.tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1], [-1, 0, 0, 0, 0, 0, 0, 0]]
    assert torch.equal(media[0], feats[:2]) and torch.equal(media[1, 0], feats[2]) and not media[1, 1].any()
    with pytest.raises(ValueError, match="3 <image> tokens in the text, 2 images"):
        arrange_media(ids, feats[:2], 9)

    from minillava.fusion import MaskedCrossAttention

    torch.manual_seed(0)
    attn = MaskedCrossAttention(dim=8, media_dim=6, heads=2, dim_head=4)
    x = torch.randn(2, 8, 8)
    out = attn(x, media, index)
    assert not out[0, :2].any() and not out[1, :1].any()  # before the first image: exactly zero
    first_changed = feats.clone()
    first_changed[0] += 1.0
    out1 = attn(x, arrange_media(ids, first_changed, 9)[0], index)
    assert torch.equal(out1[0, 5:], out[0, 5:])  # after the 2nd image: the 1st does not matter
    assert (out1[0, 2:5] - out[0, 2:5]).abs().amax(-1).min() > 1e-5
    assert torch.equal(out1[1], out[1])  # nor to the other row
    second_changed = feats.clone()
    second_changed[1] += 1.0
    out2 = attn(x, arrange_media(ids, second_changed, 9)[0], index)
    assert torch.equal(out2[0, :5], out[0, :5]) and (out2[0, 5:] - out[0, 5:]).abs().amax(-1).min() > 1e-5
    alone = attn(x[1:, :2], arrange_media(ids[1:, :2], feats[2:], 9)[0], index[1:, :2])  # no padding image
    torch.testing.assert_close(alone, out[1:, :2])


def test_rows_with_swapped_image_counts_raise(build_xattn):
    """Row 0 has two markers but one image, row 1 an image but no marker: the batch's totals match, so only the
    per-row check (collate's image_counts) keeps row 1's image out of row 0's cross-attention."""
    from minillava.processor import Encoded

    model, p = build_xattn()
    two = prompt_with_prefix(p, [RED, BLUE])
    text = p.encode([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    wrong = [
        Encoded(two.input_ids, two.labels, two.pixel_values[:1]),
        Encoded(text.input_ids, text.labels, two.pixel_values[1:]),
    ]
    with pytest.raises(ValueError, match="row 0: 2 <image> markers in the text, 1 images"):
        model(**p.collate(wrong))
    model(**p.collate([two, text]))  # the right split passes


def test_gradients_reach_xattn_and_resampler_not_the_frozen_parts(build_xattn):
    model, p = build_xattn()
    info = freeze(model, "align", log_fn=lambda s: None)
    assert info["modules"]["xattn"]["frozen"] == 0 and info["modules"]["llm"]["trainable"] == 0
    conv = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a red square"}]
    batch = p.collate([p.encode(conv, [RED])])
    model(**batch).loss.backward()  # zero gates: only the gates get a gradient, which is how training starts
    for block in model.xattn.values():
        assert block.attn_gate.grad.abs() > 0 and block.ff_gate.grad.abs() > 0
        assert not block.attn.to_q.weight.grad.any()
    model.zero_grad(set_to_none=True)
    open_gates(model, 0.5)
    model(**batch).loss.backward()
    for name, param in [*model.xattn.named_parameters(), *model.projector.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(param.grad is None for param in model.vision.parameters())
    assert all(param.grad is None for _, param in model.named_parts()["llm"])


def test_kv_cache_generation_equals_no_cache_greedy(build_xattn):
    model, p = build_xattn()
    louden(model)
    open_gates(model)
    s = prompt_with_prefix(p, [RED, BLUE])
    batch = p.collate([s], padding_side="left")
    cached = [int(t) for t, _ in decode(model, batch, GenerationConfig(max_new_tokens=8), [], p.pad_token_id)]
    ids = torch.tensor([s.input_ids])
    greedy = []
    with torch.no_grad():
        for _ in range(8):
            logits = model(ids, pixel_values=batch["pixel_values"]).logits[0, -1]
            logits[p.image_token_id] = -float("inf")
            greedy.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], 1)
    assert cached == greedy
    other = p.collate([prompt_with_prefix(p, [RED, GREEN])], padding_side="left")
    assert cached != [int(t) for t, _ in decode(model, other, GenerationConfig(max_new_tokens=8), [], p.pad_token_id)]


def test_cached_continuation_reads_the_prefill_media(build_xattn):
    model, p = build_xattn()
    open_gates(model)
    batch = p.collate([prompt_with_prefix(p, [RED])])
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    k = ids[0].tolist().index(p.image_token_id) + 2
    with torch.no_grad():
        full = model(ids, mask, pixels).logits
        out = model(ids[:, :k], mask[:, :k], pixels, use_cache=True)
        steps = []
        for t in range(k, ids.shape[1]):
            out = model(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=out.past_key_values, use_cache=True,
                        media=out.media)  # fmt: skip
            steps.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, 1), full[:, k:], atol=1e-5, rtol=1e-5)
        pre = model(ids[:, :k], mask[:, :k], pixels, use_cache=True)
        with pytest.raises(ValueError, match="needs its prefill's media state"):
            model(ids[:, k : k + 1], mask[:, : k + 1], past_key_values=pre.past_key_values, use_cache=True)


def test_batched_greedy_equals_batch_of_one(build_xattn):
    model, p = build_xattn()
    louden(model)
    open_gates(model)
    gen = Generator(model, p)
    samples = [
        p.prompt("What is in the picture? describe it in detail", [RED]),
        p.prompt("hi", [BLUE]),
        p.prompt("no image here, just text"),
        prompt_with_prefix(p, [RED, BLUE]),
    ]
    cfg = GenerationConfig(max_new_tokens=8)

    def tokens(batch_samples):
        batch = p.collate(batch_samples, padding_side="left")
        return torch.stack([t for t, _ in decode(model, batch, cfg, [], p.pad_token_id)], 1)

    batched = tokens(samples)
    for i, s in enumerate(samples):
        assert torch.equal(tokens([s])[0], batched[i]), f"row {i}"
    assert gen.generate_batch(samples, cfg) == [gen.generate_batch([s], cfg)[0] for s in samples]


def test_save_load_round_trip(build_xattn, tmp_path):
    model, p = build_xattn(every=2)
    assert list(model.xattn) == ["1"]  # before every 2nd layer: layer 1 of 2
    open_gates(model, 0.7)
    model.save_pretrained(tmp_path / "m", p)
    saved = load_file(tmp_path / "m" / XATTN_WEIGHTS)
    assert saved.keys() == model.xattn.state_dict().keys()
    loaded, lp = MiniLlava.from_pretrained(tmp_path / "m")
    assert loaded.config.fusion == "xattn" and loaded.config.xattn == model.config.xattn
    assert lp.tokens_per_image == 1
    assert loaded.xattn["1"].attn_gate.item() == pytest.approx(0.7)
    batch = p.collate([prompt_with_prefix(p, [RED, BLUE])])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_lora_leaves_xattn_blocks_fully_trainable(build_xattn):
    model, _ = build_xattn()
    settings = add_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0))
    assert len(settings.modules) == 14 and not any("xattn" in m for m in settings.modules)  # as for splice
    lines = []
    freeze(model, "instruct", lora=settings, log_fn=lines.append)
    assert all(p.requires_grad for p in model.xattn.parameters())
    assert "stage instruct: training projector + xattn blocks + LLM (LoRA adapters)" in lines


def test_training_lowers_the_loss_and_keeps_the_llm(build_xattn, asset_dir, tmp_path):
    model, p = build_xattn()
    louden(model)  # the stock init's tiny tied head caps how far a frozen LLM's loss can move
    model.save_pretrained(tmp_path / "start", p)
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)  # a text-only row too: its batches skip the cross-attention
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", model=str(tmp_path / "start"), stage="align",
                 lr=1e-2, max_steps=30, template="auto")  # fmt: skip
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("minillava.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    try:
        summary = train(cfg)
    finally:
        logger.removeHandler(handler)
    first, last = sum(summary["losses"][:5]) / 5, sum(summary["losses"][-5:]) / 5
    assert last < 0.6 * first, summary["losses"][::5]
    assert any(x.startswith("  xattn     trains") for x in lines) and any("llm       frozen" in x for x in lines)
    before = load_file(tmp_path / "start" / "llm" / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "llm" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    gates = load_file(tmp_path / "run" / "model" / XATTN_WEIGHTS)
    assert any(gates[k].abs().max() > 0 for k in gates if k.endswith("_gate"))


def test_cli_build_xattn(asset_dir, tmp_path, capsys):
    common = ["build", "--vision", str(asset_dir("vision", "clip")), "--llm", str(asset_dir("llm", "llama"))]
    opts = ["--projector-opt", "num_latents=4", "--projector-opt", "heads=2", "--projector-opt", "dim_head=8"]
    assert main([*common, "--fusion", "xattn", "--xattn-every", "2", *opts, "--out", str(tmp_path / "m")]) == 0
    assert "1 tokens per image" in capsys.readouterr().out
    model, _ = MiniLlava.from_pretrained(tmp_path / "m")
    assert model.config.projector.name == "perceiver" and list(model.xattn) == ["1"]
    assert main([*common, "--fusion", "xattn", "--projector", "mlp2x_gelu", "--out", str(tmp_path / "x")]) == 1
    assert "fusion xattn reads Perceiver latents: use projector perceiver" in capsys.readouterr().err
