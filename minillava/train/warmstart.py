"""Word-space warm start: pre-align a fresh projector with the LLM's own word embeddings, before any LLM step.

The LLM reads image tokens like words. So before the (expensive) align stage, whose every step runs the LLM
forward and backward, the projector first learns, in seconds, to put each image's tokens near the input
embeddings of the words that its answers use: for every word of the training answers' vocabulary, the best
matching image token (max cosine over the N tokens) should be close when the word occurs in that image's
answers and far when it does not (a multi-label logistic loss), and token norms should look like word norms.
No LLM forward runs; only the frozen tower's features (from the feature cache) and the projector.

Measured on the demo (DINOv2-S, SmolLM2-135M, 1000 captions; held-out caption loss, right images vs shuffled):
40 LLM align steps after 300 warm-start steps: 1.77 vs 2.50; 60 align steps without it: 2.19 vs 2.34.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minillava.data.dataset import Collator, SupervisedDataset
from minillava.model import MiniLlava
from minillava.processor import IGNORE_INDEX
from minillava.train.cache import FeatureCache

SCALE, OFFSET = 10.0, 5.0  # cosine in [-1, 1] -> logit in [-15, 5]: "matched" needs a cosine above 0.5


def answer_vocabulary(token_sets: list[set[int]], max_words: int) -> list[int]:
    """The `max_words` most frequent answer tokens (by the number of images whose answers use them)."""
    counts = Counter(t for s in token_sets for t in s)
    return [t for t, _ in counts.most_common(max_words)]


def collect(
    model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
    device: torch.device, max_images: int, special_ids: set[int],
) -> tuple[torch.Tensor, list[set[int]]]:  # fmt: skip
    """Features (I, P, Dv) of the first `max_images` single-image samples, and each one's answer tokens."""
    from minillava.train.loop import frozen_features

    feats, words = [], []
    # one image per sample: with several, which answer words belong to which image is unknown
    chosen = [i for i, r in enumerate(dataset.records) if len(r.images) == 1][:max_images]
    for batch, f in frozen_features(model, dataset, collate, cache, device, chosen):  # f: (B, P, Dv)
        feats.append(f.float())
        for labels in batch["labels"]:
            words.append({int(t) for t in labels[labels != IGNORE_INDEX]} - special_ids)
    if not feats:
        raise ValueError("--word-warmup-steps: the training data holds no single-image samples to warm up on")
    return torch.cat(feats), words


def word_space_warmstart(
    model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
    device: torch.device, steps: int, lr: float, seed: int, say: Callable[[str], None],
    max_images: int = 2048, max_words: int = 4096, batch_size: int = 128,
) -> dict[str, float]:  # fmt: skip
    """Train the projector alone for `steps` steps in the LLM's word-embedding space (see the module doc)."""
    tokenizer = dataset.processor.tokenizer
    special = set(tokenizer.all_special_ids) | {dataset.processor.image_token_id}
    feats, words = collect(model, dataset, collate, cache, device, max_images, special)  # (I, P, Dv)
    vocab = answer_vocabulary(words, max_words)
    targets = torch.zeros(len(words), len(vocab), device=device)  # (I, W) 1 where the word is in the answers
    column = {t: j for j, t in enumerate(vocab)}
    for i, s in enumerate(words):
        targets[i, [column[t] for t in s if t in column]] = 1.0
    table = model.llm.get_input_embeddings().weight.detach().float()
    word_dirs = F.normalize(table[vocab].to(device), dim=-1)  # (W, D)
    word_norm = table.norm(dim=-1).mean().item()

    projector = model.projector
    params = [p for p in projector.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)  # its own stream: the training run's RNG is left untouched
    first = last = float("nan")
    for step in range(steps):
        idx = torch.randint(0, feats.shape[0], (min(batch_size, feats.shape[0]),), generator=gen).to(device)
        tokens = projector(feats[idx].to(model.projector_dtype)).float()  # (B, N, D)
        cos = torch.einsum("bnd,wd->bnw", F.normalize(tokens, dim=-1), word_dirs)  # (B, N, W)
        logits = cos.amax(1) * SCALE - OFFSET  # (B, W): each word's best image token
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        loss = loss + 0.1 * (tokens.norm(dim=-1) - word_norm).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    say(f"word-space warm start: {steps} projector steps on {feats.shape[0]} images x {len(vocab)} answer words, "
        f"loss {first:.3f} -> {last:.3f} (no LLM forward)")  # fmt: skip
    return {"images": feats.shape[0], "words": len(vocab), "first_loss": first, "final_loss": last}
