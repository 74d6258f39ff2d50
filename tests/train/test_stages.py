"""Overfitting in each stage, what trains, LoRA merge, NaN stop, bad samples."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import CAPTIONS, add_ghost, config, write_images, write_llava

from minillava.data.formats import BadSampleError
from minillava.model import MiniLlava
from minillava.train import checkpoint as ckpt
from minillava.train.loop import train
from minillava.train.stages import (
    LoraDropout,
    LoraSettings,
    add_lora,
    freeze,
    keep_adapter_inputs,
    load_adapter,
    merge_lora,
    save_adapter,
)


def _batch_loss(model, processor, data, images, template=None):
    from minillava.data.dataset import Collator, SupervisedDataset

    if template:
        processor = processor.with_template(template)
    ds = SupervisedDataset(data, processor, images)
    batch = Collator(processor)([ds[i] for i in range(len(ds))])
    feats = model.vision(batch["pixel_values"])
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                    image_features=model.projector(feats), return_logits=False)  # fmt: skip
    return float(out.loss)


def test_instruct_overfits_and_exports(pretrained):
    summary, run, data, images = pretrained
    assert summary["final_loss"] < 0.05, summary["losses"][-5:]
    assert summary["skipped"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records][0] == "start" and records[-1]["event"] == "end"
    assert sum(r["event"] == "step" for r in records) == 50
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "grad_norm"} <= set(records[1])
    assert (run / "loss_curve.png").stat().st_size > 1000
    model, processor = MiniLlava.from_pretrained(run / "model")  # self-contained directory
    assert processor.template_name == "auto"  # the training template (plain for align) is not exported
    assert _batch_loss(model, processor, data, images) < 0.1


def test_align_trains_projector_only(pretrained, tmp_path, asset_dir):
    _, run, data, images = pretrained
    model, processor = MiniLlava.from_pretrained(run / "model")
    torch.manual_seed(5)
    for m in model.projector.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()  # a fresh projector on an LLM that knows the captions
    model.save_pretrained(tmp_path / "start", processor)
    # template "auto": the tiny LLM learned the captions in chat format (a real LLM needs no such help)
    cfg = config(tmp_path, asset_dir, data, images, model=str(tmp_path / "start"), stage="align", lr=1e-2,
                 max_steps=60, template="auto")  # fmt: skip
    lines = []
    summary = train_logged(cfg, lines)
    assert summary["losses"][0] > 10 * summary["final_loss"] and summary["final_loss"] < 0.05, summary["losses"][::10]
    assert any("projector trains" in x for x in lines) and any("llm       frozen" in x for x in lines)
    before = load_file(tmp_path / "start" / "llm" / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "llm" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def train_logged(cfg, lines):
    import logging

    class Grab(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("minillava.train")
    handler, level = Grab(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return train(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_lora_overfits_new_mapping_and_exports_merged(pretrained, tmp_path, asset_dir):
    _, run, _, _ = pretrained
    names = write_images(tmp_path / "images")
    shifted = dict(zip(CAPTIONS, list(CAPTIONS.values())[1:] + list(CAPTIONS.values())[:1], strict=True))
    q = "<image>\nWhat is in the picture?"
    rows = [{"id": c, "image": names[c], "conversations": [{"from": "human", "value": q},
             {"from": "gpt", "value": shifted[c]}]} for c in names]  # fmt: skip
    data = tmp_path / "shifted.json"
    data.write_text(json.dumps(rows))
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", model=str(run / "model"), stage="instruct",
                 lora=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=1e-2, projector_lr=1e-2,
                 batch_size=4, max_steps=60)  # fmt: skip
    lines = []
    summary = train_logged(cfg, lines)
    assert summary["losses"][0] > 1.0 and summary["final_loss"] < 0.05, summary["losses"][::10]
    assert any("LoRA r=8" in x and "14 LLM linear layers" in x for x in lines)
    model, processor = MiniLlava.from_pretrained(tmp_path / "run" / "model")  # merged: loads directly
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert _batch_loss(model, processor, data, tmp_path / "images") < 0.1


def test_lora_targets_llm_only_and_merge_matches(tiny, tmp_path):
    model, processor = tiny
    model = copy.deepcopy(model)
    settings = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert all(m.startswith("model.layers.") for m in settings.modules)  # no lm_head, no vision
    assert not any("lora" in n for n, _ in model.vision.named_parameters())
    freeze(model, "instruct", lora=settings, log_fn=lambda s: None)
    torch.manual_seed(0)
    for n, p in model.llm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    enc = processor.encode([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    ids = torch.tensor([enc.input_ids])
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        save_adapter(model, settings, tmp_path / "adapter")
        merged_count = merge_lora(model)
        merged = model(ids).logits
    assert merged_count == 14
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # the adapter round trip through `merge-lora`'s path gives the same model
    base, _ = tiny
    base = copy.deepcopy(base)
    load_adapter(base, tmp_path / "adapter")
    merge_lora(base)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(ids).logits, merged, atol=1e-5, rtol=1e-5)


def test_lora_layers_get_the_fast_cpu_dropout(tiny):
    model = copy.deepcopy(tiny[0])
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.05))
    dropouts = [d for m in model.llm.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert len(dropouts) == 14 and all(type(d) is LoraDropout and d.p == 0.05 for d in dropouts)
    model = copy.deepcopy(tiny[0])
    add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))  # peft's Identity stays
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.llm.modules())


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lora_dropout_keeps_each_element_independently_at_rate_1_minus_p(p):
    drop = LoraDropout(p).train()
    torch.manual_seed(0)
    out = drop(torch.ones(1001, 999))  # an odd size: the last 64-bit draw is only partly used
    kept = out != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 0.002  # n = 1e6: the binomial's std is < 5e-4
    assert torch.allclose(out[kept], torch.tensor(1 / (1 - round(p * 65536) / 65536)))
    assert abs(out.double().mean().item() - 1) < 0.003  # unbiased
    # the four 16-bit lanes of each 64-bit draw are independent: neighbours are both dropped at rate p^2
    flat = (~kept).flatten()
    both = (flat[:-1] & flat[1:]).double().mean().item()
    assert abs(both - p * p) < 0.002


def test_lora_dropout_follows_the_seed_and_masks_the_gradient():
    drop = LoraDropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    a.sum().backward()
    torch.testing.assert_close(x.grad, (a != 0).float() / (1 - round(0.3 * 65536) / 65536))
    assert torch.equal(drop.eval()(x), x) and torch.equal(LoraDropout(0.0).train()(x), x)


def test_freeze_counts_and_tune_vision(tiny):
    model, _ = tiny
    model = copy.deepcopy(model)
    info = freeze(model, "align", log_fn=lambda s: None)
    assert info["modules"]["llm"]["trainable"] == 0 and info["modules"]["vision"]["trainable"] == 0
    assert info["trainable"] == sum(p.numel() for p in model.projector.parameters())
    info = freeze(model, "instruct", tune_vision=True, log_fn=lambda s: None)
    assert info["modules"]["llm"]["frozen"] == 0
    # the tiny CLIP tower has 3 layers and select_layer -2: its last layer and post-layernorm stay frozen
    vm = model.vision.model
    unused = {id(p) for m in (vm.encoder.layers[2], vm.post_layernorm) for p in m.parameters()}
    for p in model.vision.parameters():
        assert p.requires_grad == (id(p) not in unused)
    assert info["modules"]["vision"]["frozen"] == sum(p.numel() for p in model.vision.parameters() if id(p) in unused)
    with pytest.raises(ValueError, match="instruct"):
        freeze(model, "align", lora=LoraSettings())


def test_qlora_on_cpu_is_a_clear_error(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", stage="instruct", qlora=True, device="cpu")
    with pytest.raises(ValueError, match="--qlora needs a CUDA GPU"):
        train(cfg)


def test_nan_loss_stops_naming_the_step(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", stage="instruct", lr=1e30, max_grad_norm=None,
                 max_steps=20, save_every=1, keep_last=1)  # fmt: skip
    # step 1's update (lr 1e30) already blew the weights up: its checkpoint is finite but never good, so it is named
    # as no good checkpoint and set aside, not offered to --resume
    message = r"loss is (nan|inf) at step 2; stopping\. no checkpoint was saved before it diverged \(1 saved after"
    with pytest.raises(FloatingPointError, match=message):
        train(cfg)
    assert not ckpt.list_checkpoints(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "diverged-step-00000001").is_dir()


def test_bad_sample_error_names_file_id_reason_or_skips(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "d.json", names)
    add_ghost(data)
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", stage="align", max_steps=2, batch_size=6)
    with pytest.raises(BadSampleError, match=r"d\.json:\[5\] \(id ghost\): image .*missing\.png not found"):
        train(cfg)
    cfg.on_bad_sample, cfg.overwrite = "skip", True  # the failed run above left its records in OUT
    summary = train(cfg)
    assert summary["skipped"] == 2 and {s["id"] for s in summary["skipped_samples"]} == {"ghost"}  # 2 epochs
    end = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["skipped"] == 2 and end["skipped_samples"][0]["reason"].endswith("not found")


def test_unmerged_export_then_merge_lora_cli(pretrained, tmp_path, asset_dir):
    from minillava.train.cli import main

    _, run, data, images = pretrained
    common = dict(model=str(run / "model"), stage="instruct", lora=True, lora_dropout=0.0, lr=1e-2, max_steps=2)
    train(config(tmp_path / "m", asset_dir, data, images, **common))
    train(config(tmp_path / "u", asset_dir, data, images, merge_lora=False, **common))
    assert (tmp_path / "u" / "run" / "model" / "lora_adapter" / "adapter.safetensors").is_file()
    assert main(["merge-lora", "--model", str(tmp_path / "u" / "run" / "model"), "--out", str(tmp_path / "o")]) == 0
    a, processor = MiniLlava.from_pretrained(tmp_path / "m" / "run" / "model")
    b, _ = MiniLlava.from_pretrained(tmp_path / "o")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = torch.tensor([processor.encode(msgs).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=1e-5)


def test_standardize_features_fits_stats_spread_over_the_data_once(pretrained, tmp_path, asset_dir):
    _, run, data, images = pretrained
    model, processor = MiniLlava.from_pretrained(run / "model")
    model.projector.set_feature_stats(torch.zeros(model.vision.hidden_size), torch.ones(model.vision.hidden_size))
    model.save_pretrained(tmp_path / "start", processor)
    cfg = config(tmp_path, asset_dir, data, images, model=str(tmp_path / "start"), stage="align", max_steps=2,
                 standardize_features=True, feature_stats_images=2, lr=0.0, projector_lr=0.0)  # fmt: skip
    lines = []
    train_logged(cfg, lines)
    pixels = processor.preprocess_images([images / n for n in ("red.png", "green.png")])
    with torch.no_grad():  # 2 of the data's 4 images, spread evenly: the 1st and the 3rd, not the first two
        feats = model.vision(pixels).reshape(-1, model.vision.hidden_size).double()
    fitted, _ = MiniLlava.from_pretrained(tmp_path / "run" / "model")
    assert torch.allclose(fitted.projector.feature_mean.double(), feats.mean(0), atol=1e-5)
    assert torch.allclose(fitted.projector.feature_std.double(), feats.std(0, unbiased=False), atol=1e-4)
    assert any("standardised" in x and "2 image crops" in x for x in lines)
    # a later stage keeps the fitted statistics instead of refitting them
    cfg2 = config(tmp_path, asset_dir, data, images, model=str(tmp_path / "run" / "model"), stage="align",
                  max_steps=1, standardize_features=True, out=str(tmp_path / "run2"))  # fmt: skip
    lines2 = []
    train_logged(cfg2, lines2)
    again, _ = MiniLlava.from_pretrained(tmp_path / "run2" / "model")
    assert torch.equal(again.projector.feature_mean, fitted.projector.feature_mean)
    assert not any("standardised" in x for x in lines2)


def test_word_warmup_moves_image_tokens_towards_their_answer_words(pretrained, tmp_path, asset_dir):
    from minillava.data.dataset import Collator, SupervisedDataset
    from minillava.train.warmstart import word_space_warmstart

    _, run, data, images = pretrained
    model, processor = MiniLlava.from_pretrained(run / "model")
    torch.manual_seed(0)
    for m in model.projector.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    dataset = SupervisedDataset([str(data)], processor, str(images))
    collate = Collator(processor)

    def margin():  # mean cosine to each image's own answer words minus to the other images' words
        from minillava.train.warmstart import collect

        special = set(processor.tokenizer.all_special_ids) | {processor.image_token_id}
        feats, words = collect(model, dataset, collate, None, torch.device("cpu"), 8, special)
        table = torch.nn.functional.normalize(model.llm.get_input_embeddings().weight.detach(), dim=-1)
        with torch.no_grad():
            tokens = torch.nn.functional.normalize(model.projector(feats), dim=-1)  # (I, N, D)
        out = []
        for i, own in enumerate(words):
            own = set(own)
            others = set().union(*(set(w) for j, w in enumerate(words) if j != i)) - own
            best = (tokens[i] @ table.T).amax(0)  # (V,) best token per word
            out.append(best[sorted(own)].mean() - best[sorted(others)].mean())
        return float(torch.stack(out).mean())

    before = margin()
    lines = []
    stats = word_space_warmstart(model, dataset, collate, None, torch.device("cpu"), 150, 3e-3, 0, lines.append)
    after = margin()
    assert stats["final_loss"] < stats["first_loss"] and stats["images"] == 4  # the 4 single-image samples
    assert after > before + 0.1, (before, after)
    assert "no LLM forward" in lines[0]


def test_warmup_reads_each_images_answers_from_all_its_samples(pretrained, tmp_path):
    """One conversation per image, or one question per sample (the demo's data): the same images, features and
    answer words, in the same order."""
    from minillava.data.dataset import Collator, SupervisedDataset
    from minillava.train.warmstart import collect

    _, run, _, images = pretrained
    model, processor = MiniLlava.from_pretrained(run / "model")
    qa = [("What colour?", "red"), ("What shape?", "a square"), ("Where?", "on the left")]
    conversations, questions = [], []
    for i, name in enumerate(("red.png", "green.png", "blue.png")):
        turns = [{"from": f, "value": v} for q, a in qa for f, v in (("human", q), ("gpt", f"{a} {i}"))]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        conversations.append({"id": f"c{i}", "image": name, "conversations": turns})
        questions += [{"id": f"q{i}-{k}", "image": name, "conversations": [dict(turns[2 * k]), turns[2 * k + 1]]}
                      for k in range(len(qa))]  # fmt: skip
        for q in questions[-len(qa) :]:
            q["conversations"][0]["value"] = "<image>\n" + q["conversations"][0]["value"].removeprefix("<image>\n")
    special = set(processor.tokenizer.all_special_ids) | {processor.image_token_id}
    got = []
    for rows in (conversations, questions):
        path = tmp_path / f"{rows[0]['id']}.json"
        path.write_text(json.dumps(rows))
        dataset = SupervisedDataset([str(path)], processor, str(images))
        got.append(collect(model, dataset, Collator(processor), None, torch.device("cpu"), 8, special))
    (f1, w1), (f2, w2) = got
    assert f2.shape[0] == 3 and torch.equal(f1, f2)
    assert w1 == w2 and len(w1[0]) > 4  # every answer of the image, not just its first sample's
    assert w1[0] != w1[1]


def test_evenly_spaced_gives_every_part_of_the_data_its_share():
    from minillava.train.features import evenly_spaced

    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert evenly_spaced([4, 5], 3) == [4, 5]
    assert evenly_spaced(list(range(1000)), 256)[-1] > 990


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_caption_warmup_makes_image_tokens_spell_the_caption(pretrained, precision):
    """Under a bf16 run the projector's matmuls run in bf16 and it still learns; fp16 runs stay float32 (these steps
    have no gradient scaler)."""
    from minillava.data.dataset import Collator, SupervisedDataset
    from minillava.projectors import build_projector
    from minillava.train.warmstart import caption_targets, collect, word_space_warmstart

    _, run, data, images = pretrained
    model, processor = MiniLlava.from_pretrained(run / "model")
    torch.manual_seed(0)
    vision_dim, llm_dim = model.projector.feature_mean.shape[0], model.llm.get_input_embeddings().weight.shape[1]
    model.projector = build_projector("perceiver", vision_dim, llm_dim, model.vision.patch_grid, num_latents=12,
                                      depth=1, heads=2, dim_head=16)  # fmt: skip
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    dataset = SupervisedDataset([str(data)], processor, str(images))
    collate = Collator(processor)
    special = set(processor.tokenizer.all_special_ids) | {processor.image_token_id}
    feats, answers = collect(model, dataset, collate, None, torch.device("cpu"), 8, special)
    full_stop = processor.tokenizer.convert_tokens_to_ids(".")
    vocab = sorted({t for a in answers for t in a} | {full_stop})
    targets = caption_targets(answers, vocab, full_stop, 12)  # (4, 12) columns of vocab
    assert [vocab[j] for j in targets[2, : len(answers[2])]] == answers[2][:12]  # in order, then full stops
    table = torch.nn.functional.normalize(model.llm.get_input_embeddings().weight.detach()[vocab], dim=-1)

    def spelled():  # each image token's nearest caption word, as vocabulary columns (I, N)
        with torch.no_grad():
            return (torch.nn.functional.normalize(model.projector(feats), dim=-1) @ table.T).argmax(-1)

    assert (spelled() == targets).float().mean() < 0.5
    lines, seen = [], set()
    hook = model.projector.linear.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    stats = word_space_warmstart(model, dataset, collate, None, torch.device("cpu"), 200, 3e-3, 0, lines.append,
                                 objective="caption", precision=precision)  # fmt: skip
    hook.remove()
    assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert stats["objective"] == "caption" and "(caption)" in lines[0]
    assert torch.equal(spelled(), targets), (spelled(), targets)
    with pytest.raises(ValueError, match="unknown objective"):
        word_space_warmstart(model, dataset, collate, None, torch.device("cpu"), 1, 1e-3, 0, print, objective="bag")


def test_word_warmup_runs_in_the_trainer(pretrained, tmp_path, asset_dir):
    _, run, data, images = pretrained
    cfg = config(tmp_path, asset_dir, data, images, model=str(run / "model"), stage="align", max_steps=1,
                 word_warmup_steps=5, standardize_features=True)  # fmt: skip
    lines = []
    summary = train_logged(cfg, lines)
    assert summary["word_warmup"]["images"] == 4
    assert any("word-space warm start (words): 5 projector steps" in x for x in lines)
    fewer = config(tmp_path, asset_dir, data, images, model=str(run / "model"), stage="align", max_steps=1,
                   word_warmup_steps=5, word_warmup_images=2, out=str(tmp_path / "fewer"))  # fmt: skip
    assert train_logged(fewer, [])["word_warmup"]["images"] == 2
    with pytest.raises(ValueError, match="word_warmup_images must be at least 1"):
        config(tmp_path, asset_dir, data, images, word_warmup_images=0)


def test_lora_on_the_last_layers_stops_backward_there(tiny):
    """With the projector frozen and LoRA on the upper layers only, the layers below see no backward pass."""
    model, processor = tiny
    model = copy.deepcopy(model)
    layers = model.llm.config.num_hidden_layers
    lora = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, last_layers=1))
    assert lora.modules and all(m.startswith(f"model.layers.{layers - 1}.") for m in lora.modules)
    lines = []
    info = freeze(model, "instruct", lora=lora, freeze_projector=True, log_fn=lines.append)
    assert info["modules"]["projector"]["trainable"] == 0 and info["modules"]["llm"]["trainable"] > 0
    assert "training LLM (LoRA adapters)" in lines[0] and "(last 1 decoder layers)" in "\n".join(lines)
    in_graph = {}  # layer -> whether its output is part of the autograd graph (else no backward runs through it)

    def record(i):
        return lambda _m, _in, out: in_graph.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad)

    for i, layer in enumerate(model.llm.model.layers):
        layer.register_forward_hook(record(i))
    enc = processor.encode([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    ids = torch.tensor([enc.input_ids])
    model(ids, labels=torch.tensor([enc.labels]), return_logits=False).loss.backward()
    assert in_graph == {i: i == layers - 1 for i in range(layers)}
    with pytest.raises(ValueError, match="align stage"):
        freeze(model, "align", freeze_projector=True)


def test_lora_layers_and_freeze_projector_are_checked(tmp_path, asset_dir):
    with pytest.raises(ValueError, match="--lora-layers N needs --lora"):
        config(tmp_path, asset_dir, tmp_path / "d.json", tmp_path, stage="instruct", lora_layers=2)
    with pytest.raises(ValueError, match="--freeze-projector"):
        config(tmp_path, asset_dir, tmp_path / "d.json", tmp_path, stage="align", freeze_projector=True)


def test_word_warmup_trains_a_projector_the_run_keeps_frozen(pretrained, tmp_path, asset_dir):
    _, run, data, images = pretrained
    cfg = config(tmp_path, asset_dir, data, images, model=str(run / "model"), stage="instruct", lora=True,
                 lora_layers=1, freeze_projector=True, max_steps=2, word_warmup_steps=5)  # fmt: skip
    before, _ = MiniLlava.from_pretrained(run / "model")
    summary = train(cfg)
    assert summary["word_warmup"]["final_loss"] < summary["word_warmup"]["first_loss"]
    after, _ = MiniLlava.from_pretrained(tmp_path / "run" / "model")
    pairs = zip(before.projector.parameters(), after.projector.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # the warm start moved it, the run did not undo that


@pytest.mark.parametrize(("lora", "checkpointing"), [(False, False), (True, False), (True, True)],
                         ids=["full", "lora", "lora-grad-checkpointing"])  # fmt: skip
def test_compiled_decoder_layers_train_like_eager_ones(tmp_path, asset_dir, lora, checkpointing):
    """--compile: the LLM's decoder layers run as compiled graphs, and the run's losses are the eager run's."""
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "data.json", names)
    runs = {}
    for compiled in (False, True):
        lines: list[str] = []
        cfg = config(tmp_path / str(compiled), asset_dir, data, tmp_path / "images", stage="instruct", lr=1e-2,
                     max_steps=4, lora=lora, compile=compiled, grad_checkpointing=checkpointing)  # fmt: skip
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runs[compiled] = train_logged(cfg, lines)["losses"], lines
    (eager, _), (compiled, lines) = runs[False], runs[True]
    assert any(line.startswith("compiling 2 LLM decoder layers") for line in lines), lines
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo did compile, in this run
    # the first forward matches to float32 rounding; inductor orders reductions its own way, and Adam's
    # normalised updates carry that rounding into later steps (tiny LoRA: 2e-4 relative by step 2)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled == pytest.approx(eager, rel=2e-3), (compiled, eager)
    assert compiled[-1] < compiled[0]


def test_compile_is_refused_where_it_is_untested(tmp_path, asset_dir):
    names = write_images(tmp_path / "images")
    data = write_llava(tmp_path / "data.json", names)
    cfg = config(tmp_path, asset_dir, data, tmp_path / "images", stage="instruct", max_steps=1, compile=True,
                 strategy="deepspeed-zero2")  # fmt: skip
    with pytest.raises(ValueError, match="--compile is tested with one process or DDP.*deepspeed-zero2"):
        train(cfg)


@pytest.mark.parametrize("keep", [False, True])
def test_keep_adapter_inputs_lets_a_bf16_input_reach_the_adapter_under_autocast(keep):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(8, 8)))
    seen: list[torch.dtype] = []
    model[0].lora_A["default"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
        if keep:
            keep_adapter_inputs(model)
        after = model(x)
    # peft's own cast goes up to the adapter's float32; kept, the input stays bf16 and the matmuls are the same
    assert seen == [torch.float32, torch.bfloat16 if keep else torch.float32]
    assert torch.equal(before, after)
