"""Training step time: minillava vs transformers' LlavaForConditionalGeneration, same run, same device.

Bench shapes (../shared/BENCHMARK.md): CLIP ViT-B/16 (224 px, 196 patch tokens, layer -2, CLS dropped),
SmolLM2-135M-shaped Llama, mlp2x_gelu projector, batch 4 x (196 image + 64 text tokens), labels on the last
32 text tokens. Stage 1: projector trains. Stage 2: projector + LLM. Random weights, no downloads.
On a GPU (--device cuda) both run there, timed with CUDA synchronisation; the peer also in bf16 (weights
cast, and autocast), ours in its default precision (auto: bf16 where bf16 matmuls beat fp32).

    python benchmarks/bench_train.py                          # bench shapes, best of 3 after a warm-up
    python benchmarks/bench_train.py --device cuda --out train-cuda.json
    python benchmarks/bench_train.py --shapes quick           # small shapes, 1 repetition: a smoke test

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
from common import best_of, machine, matmul_peak, peak_memory, write_json  # noqa: E402

from minillava.config import ModelConfig, VisionConfig
from minillava.model import MiniLlava
from minillava.projectors import build_projector
from minillava.runtime import compile_decoder_layers, fast_bfloat16
from minillava.train.config import TrainConfig
from minillava.train.loop import TrainStep, autocast_ctx, make_optimizer
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


def peer_step_time(s: dict, stage: int, mode: str, reps: int, device: torch.device, compiled: bool = False,
                   lora: bool = False) -> float:  # fmt: skip
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
    ap.add_argument("--lora", action="store_true", help="also time stage 2 with LoRA (r 8, alpha 16, dropout 0.05, "
                    "every LLM linear layer): ours against peft on the peer")
    ap.add_argument("--compile", action="store_true", help="also time ours and the peer (bf16 weights, or fp32 "
                    "where ours runs fp32) with torch.compile'd decoder layers (`minillava train --compile`)")
    args = ap.parse_args()
    device = torch.device(args.device)
    fast = fast_bfloat16(device)
    precision = ("bf16" if fast else "fp32") if args.precision == "auto" else args.precision
    peer_modes = ("fp32", "bf16_weights", "autocast") if precision == "bf16" else ("fp32",)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.shapes == "quick" else 3)
    s = SHAPES[args.shapes]
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
                r[f"peer_{mode}_stage2_lora_step_s"] / r["ours_stage2_lora_step_s"])
    if args.compile:  # the same comparison with both sides compiled, against the peer's fastest mode
        peer_mode = peer_modes[1] if len(peer_modes) > 1 else peer_modes[0]
        for st in (1, 2):
            r[f"ours_compiled_stage{st}_step_s"], _ = ours(s, st, reps, device, precision=precision,
                                                           compiled=True)  # fmt: skip
            r[f"peer_{peer_mode}_compiled_stage{st}_step_s"] = peer_step_time(s, st, peer_mode, reps, device, True)
            r[f"speedup_compiled_stage{st}_vs_peer_{peer_mode}_compiled"] = (
                r[f"peer_{peer_mode}_compiled_stage{st}_step_s"] / r[f"ours_compiled_stage{st}_step_s"])
            r[f"speedup_compiled_stage{st}_vs_peer_{peer_mode}"] = (
                r[f"peer_{peer_mode}_stage{st}_step_s"] / r[f"ours_compiled_stage{st}_step_s"])
            r[f"speedup_compiled_stage{st}_vs_peer_fp32"] = r[f"peer_fp32_stage{st}_step_s"] / r[
                f"ours_compiled_stage{st}_step_s"]
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
