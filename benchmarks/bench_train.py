"""Training step time: minillava vs transformers' LlavaForConditionalGeneration, same run, same device.

Bench shapes (../shared/BENCHMARK.md): CLIP ViT-B/16 (224 px, 196 patch tokens, layer -2, CLS dropped),
SmolLM2-135M-shaped Llama, mlp2x_gelu projector, batch 4 x (196 image + 64 text tokens), labels on the last
32 text tokens. Stage 1: projector trains. Stage 2: projector + LLM. Random weights, no downloads.
On a GPU (--device cuda) both run there, timed with CUDA synchronisation; the peer also in bf16 (weights
cast, and autocast), ours in its default precision (auto: bf16 where bf16 matmuls beat fp32).

    python benchmarks/bench_train.py                          # bench shapes, best of 3 after a warm-up
    python benchmarks/bench_train.py --device cuda --out train-cuda.json
    python benchmarks/bench_train.py --shapes quick           # small shapes, 1 repetition: a smoke test
    python benchmarks/bench_train.py --lengths llava665k      # stage 2 over variable lengths, packed vs padded
    python benchmarks/bench_train.py --shapes quick --lengths llava665k   # its smoke test (< 1 minute)

--lengths llava665k (issue 26): instead of one fixed batch, stage 2 (projector + LLM, full fine-tune, frozen
tower) over one seeded set of samples (--samples, default 12; quick 32) whose lengths follow an approximation of
LLaVA-1.5's stage-2 mix, llava_v1_5_mix665k. The approximation is ours, parameterised from what is published
about the mix, not measured on the file (LLAVA665K below lists every parameter):
  - components and their weights: the LLaVA-1.5 paper's data table (Liu et al., "Improved Baselines with Visual
    Instruction Tuning", 2023): LLaVA-Instruct 158K (conversation 58K, detail 23K, complex reasoning 77K),
    ShareGPT 40K (text-only: 6.0 % of the samples), VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA 66K,
    TextCaps 22K, RefCOCO 48K, Visual Genome 86K: 665K;
  - one image per image sample at the start of the first user turn, with the shape's tower token count (196 at
    the bench and quick shapes; LLaVA-1.5's CLIP-L/14-336 gives 576), plus vicuna_v1's system prompt (34 tokens)
    and role tags (7 tokens a turn);
  - turns: 1 + Poisson(mean - 1), capped; one turn for the GPT-4 detail / reasoning answers, A-OKVQA and
    TextCaps; the VQA-style sets merge the questions on one image into one conversation, as LLaVA-1.5 does, so
    their mean turns follow the source sets' questions per image (VQAv2 ~5.4 -> 5, OCR-VQA ~5, GQA ~13 -> 10 and
    Visual Genome / RefCOCO regions 8 / 4: our assumptions); ShareGPT 3 turns, up to 12;
  - question and answer lengths in tokens: lognormal around a mean (short-answer sets: 1-6 answer tokens with
    LLaVA-1.5's "Answer the question using a single word or phrase." prompt in the question; GPT-4 answers
    55-120; ShareGPT 60-token questions and 220-token answers, wide spread); each answer ends in a supervised
    "</s>"; labels on the answers only;
  - samples cut at --max-length (default 1024; LLaVA-1.5 trains at 2048); the sampling seed is --seed (0).
At 576 image tokens and 2048 this gives a mean of ~808 tokens per sample (266 of text), median 780, p90 1010.
Each variant goes over the same samples once, in micro-batches of the shape's batch (4; quick 2), --accum (1) per
optimizer step:
  (a) ours packed: micro-batches of the shape's batch in rows of at most --max-tokens-per-batch tokens, filled by
      tokens (minillava's TokenBudgetSampler, next_fit_rows + pack_batch, as `minillava train --packing` does:
      as many samples a micro-batch as fit, block-diagonal causal mask, positions per sample; fewer steps),
  (b) ours padded to each micro-batch's longest, (c) the peer padded, both in the same random order as (a),
  (d) the peer with length-grouped batches (minillava.data.sampler.global_batches, LLaVA's
      group_by_modality_length: modalities apart, each global batch sorted by length before it is cut into
      micro-batches; with --accum 1 on one process that is modality grouping only, as LLaVA's sampler gives there;
      with more micro-batches per step it groups lengths more than LLaVA's, which balances them across ranks).
Float32 on both sides (whatever precision auto would pick for ours: on CPUs where it picks bf16, timing the bf16
pair as well does not fit the time budget); --precision bf16 adds ours packed in bf16 autocast (its frozen tower
stored in bf16) against the peer with bf16 weights, the existing benchmark's equal-precision pair.
Steps of the variants interleave (alternating order) so that a busy machine slows them alike.
Before timing, one micro-batch packed and padded (float32) must give the same loss and the same final hidden states
at every sample's tokens (rel 1e-4), or the run stops.
Printed per variant: supervised (label != -100) and real tokens/s, padding waste (padding's share of the token
positions computed), steps, seconds, MFU; the ratios ours packed / peer padded and / peer grouped.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, machine, matmul_peak, peak_memory, sync, write_json  # noqa: E402

from minillava.config import ModelConfig, VisionConfig
from minillava.data.packing import next_fit_rows, pack_batch
from minillava.data.sampler import TokenBudgetSampler, global_batches
from minillava.model import MiniLlava
from minillava.projectors import build_projector
from minillava.runtime import compile_decoder_layers, fast_bfloat16
from minillava.train.config import TrainConfig
from minillava.train.kernels import attention_kernel, autocast_ctx
from minillava.train.loop import TrainStep, make_optimizer
from minillava.train.stages import LoraSettings, add_lora, freeze, param_groups
from minillava.vision import HFVisionTower

IGNORE = -100
SHAPES = {
    "quick": dict(v_image=224, v_patch=16, v_hidden=128, v_layers=2, v_heads=4, v_mlp=256, l_hidden=96, l_layers=2,
                  l_heads=3, l_kv=1, l_mlp=256, vocab=4096, batch=2, text=32, sup=16),
    "bench": dict(v_image=224, v_patch=16, v_hidden=768, v_layers=12, v_heads=12, v_mlp=3072, l_hidden=576,
                  l_layers=30, l_heads=9, l_kv=3, l_mlp=1536, vocab=49152, batch=4, text=64, sup=32),
    # LLaVA-1.5's CLIP ViT-L/14-336 (576 patch tokens) + a SmolLM2-1.7B-shaped Llama: a GPU-sized step
    "large": dict(v_image=336, v_patch=14, v_hidden=1024, v_layers=24, v_heads=16, v_mlp=4096, l_hidden=2048,
                  l_layers=24, l_heads=32, l_kv=32, l_mlp=8192, vocab=49152, batch=8, text=128, sup=64),
}  # fmt: skip


def image_tokens(s: dict) -> int:
    return (s["v_image"] // s["v_patch"]) ** 2


def configs(s: dict) -> tuple[CLIPVisionConfig, LlamaConfig]:
    vc = CLIPVisionConfig(hidden_size=s["v_hidden"], num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                          intermediate_size=s["v_mlp"], image_size=s["v_image"], patch_size=s["v_patch"])  # fmt: skip
    lc = LlamaConfig(hidden_size=s["l_hidden"], num_hidden_layers=s["l_layers"], num_attention_heads=s["l_heads"],
                     num_key_value_heads=s["l_kv"], intermediate_size=s["l_mlp"], vocab_size=s["vocab"],
                     tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip
    return vc, lc


def batch(s: dict, image_id: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, s["vocab"] - 2, (s["batch"], s["text"]), generator=g)
    ids = torch.cat([torch.full((s["batch"], image_tokens(s)), image_id), text], dim=1)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -s["sup"] :] = ids[:, -s["sup"] :]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
         "pixel_values": torch.randn(s["batch"], 3, s["v_image"], s["v_image"], generator=g)}  # fmt: skip
    return {k: v.to(device) for k, v in b.items()}


def fresh_compiler() -> None:
    """Each compiled variant starts from an empty dynamo cache, and running out of recompiles is an error:
    the recompile limit counts per code object over the process, and past it dynamo silently runs eager."""
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # torch >= 2.6


# ---- the peer ----------------------------------------------------------------------------------
LORA = dict(r=8, alpha=16, dropout=0.05)  # minillava's defaults (LLaVA's dropout), on every LLM linear layer


def build_peer(s: dict, stage: int, mode: str, device: torch.device, lora: bool = False
               ) -> LlavaForConditionalGeneration:  # fmt: skip
    vc, lc = configs(s)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vc, text_config=lc, image_token_index=s["vocab"] - 1, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip
    with device:  # initialised where it runs (a GPU-sized model is slow to initialise on the CPU)
        model = LlavaForConditionalGeneration(cfg)
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == 2 and lora:  # peft's own injection, as a transformers user would do it
        from peft import LoraConfig, inject_adapter_in_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        cfg_lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules=targets)  # fmt: skip
        model.model.language_model = inject_adapter_in_model(cfg_lora, model.model.language_model)
    elif stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    model.train()
    return model


def peer_step_time(s: dict, stage: int, mode: str, reps: int, device: torch.device, compiled: bool = False,
                   lora: bool = False) -> float:  # fmt: skip
    model = build_peer(s, stage, mode, device, lora)
    kw = {}
    if compiled:
        fresh_compiler()
        compile_decoder_layers(model.model.language_model)
        kw["use_cache"] = False  # a training-time KV cache gives every layer its own guards: 24 recompiles
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b = batch(s, s["vocab"] - 1, device)
    if mode == "bf16_weights":
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=mode == "autocast"):
            loss = model(**b, **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return best_of(step, reps, device)


# ---- ours --------------------------------------------------------------------------------------
def build_ours(s: dict, stage: int, precision: str, device: torch.device, lora: bool = False) -> MiniLlava:
    """Our defaults for a stage: frozen parts stored in bf16 in bf16 runs (fewer bytes per step)."""
    vc, lc = configs(s)
    torch.manual_seed(0)
    with device:
        vision = HFVisionTower(VisionConfig(source="bench", select_layer=-2), CLIPVisionModel(vc))
        llm = LlamaForCausalLM(lc)
        side = vc.image_size // vc.patch_size
        projector = build_projector("mlp2x_gelu", vc.hidden_size, lc.hidden_size, grid=(side, side))
    mc = ModelConfig(vision=VisionConfig(source="bench"), llm_source="bench", image_token_id=s["vocab"] - 1)
    model = MiniLlava(mc, vision, projector, llm)
    settings = add_lora(model, LoraSettings(**LORA)) if lora else None
    freeze(model, "align" if stage == 1 else "instruct", lora=settings, log_fn=lambda _: None)
    if precision == "bf16":
        model.vision.to(torch.bfloat16)
        if stage == 1:
            model.llm.to(torch.bfloat16)
    return model


def ours(s: dict, stage: int, reps: int, device: torch.device, cached: bool = False,
         precision: str = "bf16", compiled: bool = False, lora: bool = False) -> tuple[float, MiniLlava]:  # fmt: skip
    model = build_ours(s, stage, precision, device, lora)
    if compiled:
        fresh_compiler()
        compile_decoder_layers(model.llm)
    cfg = TrainConfig(vision="v", llm="l", data=["x"], stage="align" if stage == 1 else "instruct")
    opt = make_optimizer(param_groups(model, 1e-5, 1e-5, 0.0, 0.0), cfg, device)
    step_module = TrainStep(model, tune_vision=False)
    b = batch(s, s["vocab"] - 1, device)
    with torch.no_grad():
        cache = model.vision(b["pixel_values"]) if cached else None

    def step():
        with torch.no_grad():
            feats = cache if cached else model.vision(b["pixel_values"])
        with attention_kernel(device, b["input_ids"].shape[1]):  # as `train` runs a step: forward and backward
            with autocast_ctx(precision, device):
                loss = step_module(b["input_ids"], b["attention_mask"], b["labels"], feats, None, None)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return best_of(step, reps, device), model


def step_flops(s: dict, stage: int, head_positions: int, vision_layers: int) -> dict[str, float]:
    """Model FLOPs of one training step, by part, from the shapes alone (2 per multiply-add; biases and norms
    left out). Linear layers: forward 2 N per token; stage 2 also trains the LLM (6 N: forward, input and
    weight gradients), stage 1 only sends gradients through it to the projector (4 N). The head: the tied
    embedding at `head_positions` per sample. The frozen tower: forward only, `vision_layers` of its layers.
    Ours and the peer differ only in those two arguments, so their ratio is the speedup owed to arithmetic."""
    b, k = s["batch"], (6 if stage == 2 else 4)
    patches, seq = image_tokens(s), image_tokens(s) + s["text"]
    h, kv_width = s["l_hidden"], s["l_hidden"] // s["l_heads"] * s["l_kv"]
    llm_layer = 2 * h * h + 2 * h * kv_width + 3 * h * s["l_mlp"]  # q, o; k, v; gate, up, down
    vh = s["v_hidden"]
    vision_layer = 4 * vh * vh + 2 * vh * s["v_mlp"]
    return {
        "llm": k * s["l_layers"] * llm_layer * b * seq,
        "llm_attention": 3 * 4 * s["l_layers"] * b * seq**2 * h,  # QK^T and AV, forward + 2x backward
        "head": k * s["vocab"] * h * b * head_positions,
        "projector": (4 * s["v_hidden"] * h + 6 * h * h) * b * patches,  # mlp2x_gelu; no gradient to the tower
        "vision": 2 * b * (3 * s["v_patch"] ** 2 * vh * patches  # patch embedding
                           + vision_layers * (vision_layer * (patches + 1) + 2 * (patches + 1) ** 2 * vh)),
    }  # fmt: skip


def flops_ours(s: dict, stage: int) -> dict[str, float]:
    """The head at supervised positions only; the tower stops at its feature layer (-2: all but the last)."""
    return step_flops(s, stage, s["sup"], s["v_layers"] - 1)


def flops_peer(s: dict, stage: int) -> dict[str, float]:
    """transformers' Llava: logits at every position, every vision layer (it picks layer -2 afterwards)."""
    return step_flops(s, stage, image_tokens(s) + s["text"], s["v_layers"])


# ---- variable lengths: --lengths llava665k -----------------------------------------------------
# A sample-length distribution shaped like LLaVA-1.5's stage-2 mix (llava_v1_5_mix665k.json), parameterised by us
# (see the module docstring and docs/benchmarks.md). Components and sizes: the LLaVA-1.5 paper's data mixture
# (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning", table 7: 665K in all, ShareGPT's 40K
# text-only). Turns, question and answer lengths (Llama tokens) are our estimates: one turn for the GPT-4
# detail / reasoning answers, A-OKVQA and TextCaps; the short-answer sets with the questions of one image merged
# into one conversation (as LLaVA-1.5 does), their turn means from the source sets' questions per image (VQAv2
# ~5.4, OCR-VQA ~5, GQA ~13, of which we assume 10); the short-answer prompt ("Answer the question using a single
# word or phrase.", ~11 tokens) in the question; answer lengths lognormal around the mean.
MixPart = tuple[str, int, bool, float, int, float, float, float, float]
LLAVA665K: tuple[MixPart, ...] = (
    # name, thousands, image, mean turns, max turns, question tokens (mean, sigma), answer tokens (mean, sigma)
    ("llava_instruct_conversation", 58, True, 3.0, 8, 14, 0.5, 55, 0.6),
    ("llava_instruct_detail", 23, True, 1.0, 1, 12, 0.3, 120, 0.35),
    ("llava_instruct_reasoning", 77, True, 1.0, 1, 18, 0.4, 115, 0.4),
    ("sharegpt", 40, False, 3.0, 12, 60, 1.0, 220, 0.8),
    ("vqav2", 83, True, 5.0, 12, 21, 0.2, 2, 0.3),
    ("gqa", 72, True, 10.0, 20, 25, 0.25, 2, 0.3),
    ("okvqa", 9, True, 1.0, 1, 22, 0.2, 3, 0.4),
    ("ocr_vqa", 80, True, 5.0, 10, 21, 0.2, 6, 0.5),
    ("a_okvqa", 66, True, 1.0, 1, 41, 0.2, 1, 0.0),
    ("textcaps", 22, True, 1.0, 1, 12, 0.1, 15, 0.4),
    ("refcoco", 48, True, 4.0, 10, 25, 0.3, 15, 0.5),
    ("vg", 86, True, 8.0, 16, 25, 0.3, 10, 0.5),
)  # fmt: skip
SYSTEM_TOKENS = 34  # BOS + vicuna_v1's system prompt, LLaVA-1.5's stage-2 template
USER_TOKENS, ASSISTANT_TOKENS = 3, 4  # " USER:", " ASSISTANT:"; each answer ends with a supervised "</s>"


@dataclass
class Sample:
    ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE outside the answers
    pixels: torch.Tensor | None  # (3, H, W), or None: text-only
    part: str

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE).sum())


def llava665k_samples(s: dict, n: int, max_length: int, seed: int) -> list[Sample]:
    """`n` samples drawn from LLAVA665K (numpy seed `seed`); image samples hold image_tokens(s) <image> slots after
    the first " USER:", as LLaVA puts "<image>\\n" first in the first human turn. Longer than `max_length`: cut
    there (only ShareGPT's long conversations reach it; no cut runs through an image)."""
    rng = np.random.default_rng(seed)
    weights = np.array([p[1] for p in LLAVA665K], dtype=float)
    picks = rng.choice(len(LLAVA665K), size=n, p=weights / weights.sum())
    g = torch.Generator().manual_seed(seed)
    image_id, vocab = s["vocab"] - 1, s["vocab"] - 2

    def draw(mean: float, sigma: float) -> int:  # lognormal with this mean, at least 1 token
        return max(1, round(float(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma)))) if sigma else round(mean)

    out = []
    for k in picks:
        name, _, has_image, turns_mean, turns_max, q_mean, q_sigma, a_mean, a_sigma = LLAVA665K[k]
        turns = min(turns_max, 1 + int(rng.poisson(turns_mean - 1)))
        spans: list[tuple[int, bool]] = [(SYSTEM_TOKENS, False)]  # (tokens, supervised)
        for t in range(turns):
            image = image_tokens(s) + 1 if has_image and t == 0 else 0  # the slots and "\\n"
            spans += [(USER_TOKENS + image + draw(q_mean, q_sigma) + ASSISTANT_TOKENS, False),
                      (draw(a_mean, a_sigma) + 1, True)]  # fmt: skip
        labels = torch.cat([torch.full((m,), 0 if sup else IGNORE) for m, sup in spans])[:max_length]
        ids = torch.randint(0, vocab, labels.shape, generator=g)
        if has_image:
            ids[SYSTEM_TOKENS + USER_TOKENS : SYSTEM_TOKENS + USER_TOKENS + image_tokens(s)] = image_id
        labels = torch.where(labels == IGNORE, labels, ids)
        if not (labels != IGNORE).any():  # the first question alone fills max_length: keep one answer token
            labels[-1] = ids[-1]
        pixels = torch.randn(3, s["v_image"], s["v_image"], generator=g) if has_image else None
        out.append(Sample(ids, labels, pixels, name))
    return out


def collate(samples: list[Sample], order: list[int]) -> dict:
    """Right-padded (n, W) batch of samples[order], W the longest; pixels of its image samples in reading order."""
    width = max(len(samples[i].ids) for i in order)
    ids = torch.zeros(len(order), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(order):
        n = len(samples[i].ids)
        ids[r, :n], labels[r, :n], mask[r, :n] = samples[i].ids, samples[i].labels, 1
    pixels = [samples[i].pixels for i in order if samples[i].pixels is not None]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "image_counts": torch.tensor([int(samples[i].pixels is not None) for i in order]),
            "pixel_values": torch.stack(pixels) if pixels else None}  # fmt: skip


def packed(samples: list[Sample], order: list[int], budget: int) -> dict:
    """What `minillava train --packing --max-tokens-per-batch budget` feeds for one micro-batch (data.Collator):
    next_fit_rows' rows (the sampler's), the samples collated in row order, then pack_batch."""
    plan = next_fit_rows([len(samples[i].ids) for i in order], budget)
    in_rows = [order[i] for row in plan for i in row]  # row order: images stay in reading order
    ends = list(itertools.accumulate(len(row) for row in plan))
    rows = [list(range(end - len(row), end)) for row, end in zip(plan, ends, strict=True)]
    return pack_batch(collate(samples, in_rows), rows, pad_id=0)


def sample_set_flops(s: dict, samples: list[Sample]) -> dict[str, float]:
    """Model FLOPs of one pass over the samples, the same for every variant (the useful work): per sample, the
    LLM's linear layers at its real tokens and causal-free attention over its own length (step_flops' convention:
    QK^T and AV as full squares), the head at its supervised positions, the projector and the frozen tower (to its
    feature layer, forward only) once per image; no padding, no attention across packed samples."""
    lengths = [len(x.ids) for x in samples]
    images = sum(x.pixels is not None for x in samples)
    return computed_flops(s, sum(lengths), sum(n * n for n in lengths), sum(x.supervised for x in samples),
                          images, s["v_layers"] - 1)  # fmt: skip


def computed_flops(s: dict, positions: int, square: int, head: int, images: int, vision_layers: int
                   ) -> dict[str, float]:  # fmt: skip
    """Stage-2 FLOPs (2 per multiply-add) from token counts: `positions` the LLM computes, the sum of its rows'
    squared widths (attention), `head` positions with logits, `images` through the projector and
    `vision_layers` of the frozen tower. Trained parts 6 N per token (forward, input and weight gradients); the
    projector's first layer sends no gradient to the frozen tower (4 N); the tower forward only (2 N)."""
    h, kv_width, vh = s["l_hidden"], s["l_hidden"] // s["l_heads"] * s["l_kv"], s["v_hidden"]
    patches = image_tokens(s)
    llm_layer = 2 * h * h + 2 * h * kv_width + 3 * h * s["l_mlp"]
    vision_layer = 4 * vh * vh + 2 * vh * s["v_mlp"]
    return {
        "llm": 6 * s["l_layers"] * llm_layer * positions,
        "llm_attention": 3 * 4 * s["l_layers"] * square * h,
        "head": 6 * s["vocab"] * h * head,
        "projector": (4 * vh * h + 6 * h * h) * images * patches,
        "vision": 2 * images * (3 * s["v_patch"] ** 2 * vh * patches
                                + vision_layers * (vision_layer * (patches + 1) + 2 * (patches + 1) ** 2 * vh)),
    }  # fmt: skip


@dataclass
class Variant:
    """One way to train over the sample set: its micro-batches (grouped per optimizer step) and how a step runs."""

    name: str
    steps: list[list[dict]]  # per optimizer step, its micro-batches (already collated: loading is not timed)
    run: Callable[[list[dict]], None]
    peer: bool
    seconds: list[float] = field(default_factory=list)

    def positions(self) -> tuple[int, int]:  # token positions computed, sum of rows x width^2
        batches = [b for step in self.steps for b in step]
        return (sum(b["input_ids"].numel() for b in batches),
                sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in batches))  # fmt: skip


def supervised_in(b: dict) -> int:
    return int((b["labels"][:, 1:] != IGNORE).sum())  # what the loss averages over (the shift: position t -> t+1)


def ours_runner(model: MiniLlava, vision: torch.nn.Module, opt: torch.optim.Optimizer, precision: str,
                device: torch.device) -> Callable[[list[dict]], None]:  # fmt: skip
    """One optimizer step of ours over micro-batches, as the training loop does it: frozen tower under no_grad,
    each micro-batch's mean loss weighted by its share of the step's supervised tokens."""
    step_module = TrainStep(model, tune_vision=False)

    def run(micro: list[dict]) -> None:
        total = sum(supervised_in(b) for b in micro)
        for b in micro:
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            with torch.no_grad():
                feats = None if b["pixel_values"] is None else vision(b["pixel_values"])
            with attention_kernel(device, b["input_ids"].shape[1]):  # as `train` runs a step
                with autocast_ctx(precision, device):
                    loss = step_module(b["input_ids"], b["attention_mask"], b["labels"], feats, None, None,
                                       b["image_counts"], b.get("segment_ids"))  # fmt: skip
                (loss * (supervised_in(b) / total)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def peer_runner(model: LlavaForConditionalGeneration, mode: str, device: torch.device
                ) -> Callable[[list[dict]], None]:  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    dtype = torch.bfloat16 if mode == "bf16_weights" else torch.float32

    def run(micro: list[dict]) -> None:
        total = sum(supervised_in(b) for b in micro)
        for b in micro:
            kw = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            if b["pixel_values"] is not None:
                kw["pixel_values"] = b["pixel_values"].to(device, dtype)
            with torch.autocast(device.type, torch.bfloat16, enabled=mode == "autocast"):
                loss = model(**kw).loss
            (loss * (supervised_in(b) / total)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def check_packed_equals_padded(model: MiniLlava, samples: list[Sample], order: list[int], budget: int,
                               device: torch.device) -> dict:  # fmt: skip
    """One micro-batch packed and padded, float32, no gradients: the losses must agree (rel 1e-4), and so must every
    sample's final hidden states at its own tokens (relative norm of the difference <= 1e-4), else no timing.
    The loss alone is a weak witness at random weights (near-uniform logits: letting packed samples attend to
    each other moved it by 8e-5 relative at the quick shapes, while it moved their hidden states by 0.34)."""
    step_module = TrainStep(model, tune_vision=False)
    in_rows = [order[i] for row in next_fit_rows([len(samples[i].ids) for i in order], budget) for i in row]
    losses, states = [], []
    for b, sample_order in ((packed(samples, order, budget), in_rows), (collate(samples, order), order)):
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        got: list[torch.Tensor] = []
        hook = model.llm.base_model.norm.register_forward_hook(lambda _m, _a, out, got=got: got.append(out))
        try:
            with torch.no_grad():
                feats = None if b["pixel_values"] is None else model.vision(b["pixel_values"].float()).float()
                losses.append(float(step_module(b["input_ids"], b["attention_mask"], b["labels"], feats, None, None,
                                                b["image_counts"], b.get("segment_ids"))))  # fmt: skip
        finally:
            hook.remove()
        # each sample's rows of hidden states: its segment in a packed row, its real prefix in a padded one
        if "segment_ids" in b:
            spans = [(r, b["segment_ids"][r] == k) for r, row in enumerate(b["rows"]) for k in range(1, len(row) + 1)]
        else:
            spans = [(r, b["attention_mask"][r].bool()) for r in range(len(order))]
        states.append({i: got[0][r][where] for i, (r, where) in zip(sample_order, spans, strict=True)})
    rel = abs(losses[0] - losses[1]) / abs(losses[1])
    hidden = max(float((states[0][i] - states[1][i]).norm() / states[1][i].norm()) for i in order)
    if not (rel <= 1e-4 and hidden <= 1e-4):
        raise SystemExit(f"packed and padded differ on a micro-batch (samples {order}): loss {losses[0]:.6f} packed, "
                         f"{losses[1]:.6f} padded (rel {rel:.1e}), hidden states rel {hidden:.1e}; the limit is 1e-4: "
                         "not timing a wrong computation")  # fmt: skip
    return {"check_samples": order, "check_rows": next_fit_rows([len(samples[i].ids) for i in order], budget),
            "check_loss_packed": losses[0], "check_loss_padded": losses[1], "check_loss_rel_diff": rel,
            "check_hidden_rel_diff": hidden}  # fmt: skip


def lengths_bench(args: argparse.Namespace, s: dict, device: torch.device, precision: str) -> dict:
    """Stage 2 over one set of LLaVA-665k-shaped samples: ours packed / padded, the peer padded in random order and
    length-grouped, float32 on both sides (and with --precision bf16 ours packed in bf16 autocast against the peer's
    bf16 weights), their steps interleaved so that a busy machine slows every variant alike."""
    quick = args.shapes == "quick"
    n = args.samples or (32 if quick else 12)
    max_length = args.max_length or 1024
    budget = args.max_tokens_per_batch or max_length
    micro, accum = s["batch"], args.accum
    samples = llava665k_samples(s, n, max_length, args.seed)
    lengths = [len(x.ids) for x in samples]
    signed = [m if x.pixels is not None else -m for m, x in zip(lengths, samples, strict=True)]  # LLaVA's convention
    random_order = global_batches(signed, micro * accum, args.seed, 0, group=False)
    grouped = global_batches(signed, micro * accum, args.seed, 0, group=True)  # group_by_modality_length

    def micro_batches(step: list[int]) -> list[list[int]]:
        return [step[i : i + micro] for i in range(0, len(step), micro)]

    padded_steps = [[collate(samples, m) for m in micro_batches(c)] for c in random_order]
    # ours packed: `micro` rows of `budget` tokens a micro-batch, as many samples as fit (`train --packing`)
    filled = TokenBudgetSampler(lengths, micro, budget, accum, seed=args.seed).epoch_batches(0)
    packed_steps = [[packed(samples, m, budget) for m in filled[i : i + accum]] for i in range(0, len(filled), accum)]
    grouped_steps = [[collate(samples, m) for m in micro_batches(c)] for c in grouped]
    # warm-up: one step on the shortest sample in each layout (first-touch allocations, AdamW states)
    warm = [min(range(n), key=lambda i: lengths[i])]
    t_start = time.perf_counter()

    r: dict = {"lengths": "llava665k", "samples": n, "seed": args.seed, "max_length": max_length,
               "max_tokens_per_batch": budget, "micro_batch": micro, "grad_accum": accum,
               "image_tokens_per_image": image_tokens(s), "text_only_samples": sum(x.pixels is None for x in samples),
               "sample_tokens_mean": round(float(np.mean(lengths)), 1),
               "sample_tokens_median": float(np.median(lengths)),
               "sample_tokens_p90": float(np.percentile(lengths, 90)), "sample_tokens_max": max(lengths),
               "supervised_tokens_mean": round(float(np.mean([x.supervised for x in samples])), 1),
               "parts": dict(collections.Counter(x.part for x in samples))}  # fmt: skip

    model = build_ours(s, 2, "fp32", device)
    # the check: the first micro-batch (in step order) that packing changes, i.e. that puts two samples in one row
    firsts = [m for c in random_order for m in micro_batches(c)]
    shared = [m for m in firsts if any(len(row) > 1 for row in next_fit_rows([lengths[i] for i in m], budget))]
    r |= check_packed_equals_padded(model, samples, (shared or firsts)[0], budget, device)
    cfg = TrainConfig(vision="v", llm="l", data=["x"], stage="instruct")
    opt = make_optimizer(param_groups(model, 1e-5, 1e-5, 0.0, 0.0), cfg, device)
    ours_fp32 = ours_runner(model, model.vision, opt, "fp32", device)
    peer = build_peer(s, 2, "fp32", device)
    variants = [
        Variant("ours_packed_fp32", packed_steps, ours_fp32, False),
        Variant("ours_padded_fp32", padded_steps, ours_fp32, False),
        Variant("peer_padded_fp32", padded_steps, peer_runner(peer, "fp32", device), True),
        Variant("peer_grouped_fp32", grouped_steps, peer_runner(peer, "fp32", device), True),
    ]
    if precision == "bf16":  # ours' default here: bf16 autocast, the frozen tower stored in bf16 (a copy)
        vision16 = copy.deepcopy(model.vision).to(torch.bfloat16)
        peer16 = build_peer(s, 2, "bf16_weights", device)
        variants += [
            Variant("ours_packed_bf16", packed_steps, ours_runner(model, vision16, opt, "bf16", device), False),
            Variant("peer_padded_bf16_weights", padded_steps, peer_runner(peer16, "bf16_weights", device), True),
            Variant("peer_grouped_bf16_weights", grouped_steps, peer_runner(peer16, "bf16_weights", device), True),
        ]
    log(
        f"built the models; packed = padded: loss rel {r['check_loss_rel_diff']:.1e}, hidden states rel "
        f"{r['check_hidden_rel_diff']:.1e}",
        t_start,
    )
    for v in variants:
        v.run([packed(samples, warm, budget)] if "packed" in v.name else [collate(samples, warm)])
    log("warmed up", t_start)
    for k in range(max(len(v.steps) for v in variants)):
        for v in variants[:: 1 if k % 2 == 0 else -1]:  # alternate the order: none always runs first
            if k >= len(v.steps):
                continue
            sync(device)
            t0 = time.perf_counter()
            v.run(v.steps[k])
            sync(device)
            v.seconds.append(time.perf_counter() - t0)
            log(f"step {k + 1}/{len(v.steps)} {v.name}: {v.seconds[-1]:.2f} s", t_start)

    useful = sample_set_flops(s, samples)
    peak = {p: matmul_peak(torch.bfloat16 if p == "bf16" else torch.float32, device, 1024 if quick else None)
            for p in ({"fp32", precision})}  # fmt: skip
    real, supervised = sum(lengths), sum(x.supervised for x in samples)
    r["model_gflop"] = sum(useful.values()) / 1e9
    r["model_gflop_by_part"] = {k: v / 1e9 for k, v in useful.items()}
    r["flops_counted"] = (
        "model FLOPs of one pass over the samples, the same for every variant (mfu): 2 per multiply-add; LLM "
        "linear layers 6 N per real token (forward + input and weight gradients), attention QK^T and AV over each "
        "sample's own length squared x3, the tied head 6 V h at supervised positions, the projector 4 N (first "
        "layer, no gradient to the frozen tower) + 6 N (second) per image token, the frozen vision tower forward "
        "only (2 N) through its feature layer (all but the last) per image; no padding, no cross-sample attention. "
        "<variant>_computed_gflop: what the variant ran: every padded or packed position, full row-width attention "
        "squares, the peer's head at every position and all its tower layers"
    )
    for p, value in peak.items():
        r[f"{p}_matmul_peak_gflops"] = value / 1e9
    for v in variants:
        secs = sum(v.seconds)
        positions, square = v.positions()
        imgs = sum(0 if b["pixel_values"] is None else len(b["pixel_values"]) for st in v.steps for b in st)
        heads = positions if v.peer else supervised
        done = computed_flops(s, positions, square, heads, imgs, s["v_layers"] if v.peer else s["v_layers"] - 1)
        r[v.name] = {
            "seconds": secs, "steps": len(v.seconds), "step_s": [round(x, 3) for x in v.seconds],
            "forwards": sum(len(st) for st in v.steps),
            "rows": sum(b["input_ids"].shape[0] for st in v.steps for b in st),
            "supervised_tok_per_s": supervised / secs, "real_tok_per_s": real / secs,
            "positions": positions, "padding_waste": 1 - real / positions,
            "computed_gflop": sum(done.values()) / 1e9,
            "mfu_computed": sum(done.values()) / secs / peak[precision_of(v.name)],
            "mfu": sum(useful.values()) / secs / peak[precision_of(v.name)],
        }  # fmt: skip
    for p, mode in (("fp32", "fp32"), ("bf16", "bf16_weights")):
        ours_v = r.get(f"ours_packed_{p}")
        if ours_v is None:
            continue
        for peer_v in ("padded", "grouped"):
            rate = r[f"peer_{peer_v}_{mode}"]["supervised_tok_per_s"]
            r[f"ratio_ours_packed_vs_peer_{peer_v}_{p}"] = ours_v["supervised_tok_per_s"] / rate
    r["ratio_ours_packed_vs_ours_padded_fp32"] = (r["ours_packed_fp32"]["supervised_tok_per_s"]
                                                  / r["ours_padded_fp32"]["supervised_tok_per_s"])  # fmt: skip
    if precision == "bf16":
        r["ratio_ours_packed_bf16_vs_peer_padded_fp32"] = (r["ours_packed_bf16"]["supervised_tok_per_s"]
                                                           / r["peer_padded_fp32"]["supervised_tok_per_s"])  # fmt: skip
    return r


def precision_of(variant: str) -> str:
    return "bf16" if variant.endswith(("_bf16", "_bf16_weights")) else "fp32"


def log(message: str, since: float) -> None:
    print(f"[{time.perf_counter() - since:7.1f} s] {message}", file=sys.stderr, flush=True)


def rounded(x: object) -> object:
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return float(f"{x:.5g}") if isinstance(x, float) else x  # 5 significant digits: keeps a 1e-7 difference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=list(SHAPES), default="bench", help="quick: small shapes, a smoke test")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: peer and ours both run there")
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="ours: auto = bf16 where bf16 matmuls beat fp32 (minillava.runtime.fast_bfloat16), else fp32",
    )
    ap.add_argument(
        "--lora",
        action="store_true",
        help="also time stage 2 with LoRA (r 8, alpha 16, dropout 0.05, "
        "every LLM linear layer): ours against peft on the peer",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time ours and the peer (bf16 weights, or fp32 "
        "where ours runs fp32) with torch.compile'd decoder layers (`minillava train --compile`)",
    )
    g = ap.add_argument_group("--lengths llava665k: stage 2 over variable-length samples, packed and padded")
    g.add_argument("--lengths", choices=["fixed", "llava665k"], default="fixed",
                   help="fixed: the bench batch (every sample the same length); llava665k: a seeded sample set whose "
                   "lengths follow an approximation of LLaVA-1.5's 665K instruction mix")  # fmt: skip
    g.add_argument("--samples", type=int, default=None, help="samples in the set (default 12; quick 32)")
    g.add_argument("--accum", type=int, default=1, help="micro-batches (of the shape's batch) per optimizer step")
    g.add_argument("--max-length", type=int, default=None, help="samples cut at this many tokens (default 1024)")
    g.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="ours packed: tokens per packed row (default: --max-length)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_main = time.perf_counter()
    device = torch.device(args.device)
    fast = fast_bfloat16(device)
    precision = ("bf16" if fast else "fp32") if args.precision == "auto" else args.precision
    peer_modes = ("fp32", "bf16_weights", "autocast") if precision == "bf16" else ("fp32",)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.shapes == "quick" else 3)
    s = SHAPES[args.shapes]
    if args.lengths == "llava665k":  # float32 on both sides unless --precision bf16 asks for the bf16 pair too
        precision = "bf16" if args.precision == "bf16" else "fp32"
        r = {"bench": "train_lengths", **machine(device), "shapes": args.shapes, "ours_precision": precision}
        r |= lengths_bench(args, s, device, precision)
        r["setup_and_total_s"] = round(time.perf_counter() - t_main, 1)
        write_json(rounded(r | peak_memory(device)), args.out)
        return
    r: dict = {"bench": "train", **machine(device), "shapes": args.shapes, "reps": reps, "ours_precision": precision}
    r["ours_stage1_step_s"], _ = ours(s, 1, reps, device, precision=precision)
    r["ours_stage1_cached_step_s"], _ = ours(s, 1, reps, device, cached=True, precision=precision)
    r["ours_stage2_step_s"], _ = ours(s, 2, reps, device, precision=precision)
    for mode in peer_modes:
        r[f"peer_{mode}_stage1_step_s"] = peer_step_time(s, 1, mode, reps, device)
        r[f"peer_{mode}_stage2_step_s"] = peer_step_time(s, 2, mode, reps, device)
    for mode in peer_modes:
        for st in (1, 2):
            r[f"speedup_stage{st}_vs_peer_{mode}"] = r[f"peer_{mode}_stage{st}_step_s"] / r[f"ours_stage{st}_step_s"]
    if args.lora:
        r["ours_stage2_lora_step_s"], _ = ours(s, 2, reps, device, precision=precision, lora=True)
        for mode in peer_modes:
            r[f"peer_{mode}_stage2_lora_step_s"] = peer_step_time(s, 2, mode, reps, device, lora=True)
            r[f"speedup_stage2_lora_vs_peer_{mode}"] = (
                r[f"peer_{mode}_stage2_lora_step_s"] / r["ours_stage2_lora_step_s"]
            )
    if args.compile:  # the same comparison with both sides compiled, against the peer's fastest mode
        peer_mode = peer_modes[1] if len(peer_modes) > 1 else peer_modes[0]
        for st in (1, 2):
            r[f"ours_compiled_stage{st}_step_s"], _ = ours(s, st, reps, device, precision=precision,
                                                           compiled=True)  # fmt: skip
            r[f"peer_{peer_mode}_compiled_stage{st}_step_s"] = peer_step_time(s, st, peer_mode, reps, device, True)
            r[f"speedup_compiled_stage{st}_vs_peer_{peer_mode}_compiled"] = (
                r[f"peer_{peer_mode}_compiled_stage{st}_step_s"] / r[f"ours_compiled_stage{st}_step_s"]
            )
            r[f"speedup_compiled_stage{st}_vs_peer_{peer_mode}"] = (
                r[f"peer_{peer_mode}_stage{st}_step_s"] / r[f"ours_compiled_stage{st}_step_s"]
            )
            r[f"speedup_compiled_stage{st}_vs_peer_fp32"] = (
                r[f"peer_fp32_stage{st}_step_s"] / r[f"ours_compiled_stage{st}_step_s"]
            )
    r["stage1_speedup_warm_cache"] = r["ours_stage1_step_s"] / r["ours_stage1_cached_step_s"]
    # What arithmetic alone allows: at equal FLOP/s a speedup equals the FLOP ratio, and a warm cache can
    # save no more than the tower's share of a step.
    ours_f = {st: flops_ours(s, st) for st in (1, 2)}
    totals = {st: (sum(ours_f[st].values()), sum(flops_peer(s, st).values())) for st in (1, 2)}
    for st, (ours_total, peer_total) in totals.items():
        r[f"stage{st}_model_gflop"] = ours_total / 1e9
        r[f"peer_stage{st}_model_gflop"] = peer_total / 1e9
        r[f"flop_ratio_stage{st}"] = peer_total / ours_total
    r["stage1_warm_cache_flop_bound"] = totals[1][0] / (totals[1][0] - ours_f[1]["vision"])
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, device, 1024 if args.shapes == "quick"
                       else None)  # fmt: skip
    flops, peer_flops = totals[2]
    r[f"{precision}_matmul_peak_gflops"] = peak / 1e9
    r["mfu_stage2"] = flops / r["ours_stage2_step_s"] / peak  # against the peak of the precision we run in
    for mode in peer_modes:  # the same work in the peer's time, and the FLOPs the peer actually computes
        r[f"mfu_stage2_peer_{mode}"] = flops / r[f"peer_{mode}_stage2_step_s"] / peak
        r[f"mfu_stage2_peer_{mode}_own_flops"] = peer_flops / r[f"peer_{mode}_stage2_step_s"] / peak
    if args.compile:
        r["mfu_stage2_compiled"] = flops / r["ours_compiled_stage2_step_s"] / peak
    r |= peak_memory(device)
    write_json({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, args.out)


if __name__ == "__main__":
    main()
