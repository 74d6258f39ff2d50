"""Word-space warm start: pre-align a fresh projector with the LLM's own word embeddings, before any LLM step.

The LLM reads image tokens like words. So before the (expensive) align stage, whose every step runs the LLM
forward and backward, the projector first learns, in seconds, to put each image's tokens near the input
embeddings of the words that its answers use: for every word of the training answers' vocabulary, the best
matching image token (max cosine over the N tokens) should be close when the word occurs in that image's
answers and far when it does not (a multi-label logistic loss), and token norms should look like word norms.
No LLM forward runs; only the frozen tower's features (from the feature cache) and the projector.

Two objectives (`--word-warmup-objective`):
- `words` (default, any projector): the bag-of-words loss above. Tokens tied to patches (linear, MLP, pooling)
  can name what they see, but not where it is or how many there are.
- `caption`: image token k should *be* the k-th token of the image's answers (for align data: its caption),
  a cross-entropy over the answers' vocabulary plus a pull onto the word's direction (the LLM reads the
  embedding itself, not which word is nearest); slots past the caption spell full stops. The projector learns
  to write a caption in the LLM's own input space, which the LLM then reads like a prompt. This needs a
  projector whose every token sees the whole image (`perceiver`) and enough tokens for the captions (longer
  ones are cut to the token count for this warm start only).

Measured on the demo (DINOv2-S, SmolLM2-135M, 1000 captions; held-out caption loss, right images vs shuffled):
40 LLM align steps after 300 warm-start steps: 1.77 vs 2.50; 60 align steps without it: 2.19 vs 2.34. With the
pull term (caption objective, 200 steps at lr 1e-3), held-out tokens sit at a cosine of 0.88 to their words
instead of 0.40 (docs/training.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minillava.data.dataset import Collator, SupervisedDataset
from minillava.data.formats import BadSampleError
from minillava.model import MiniLlava
from minillava.processor import IGNORE_INDEX
from minillava.train.cache import FeatureCache
from minillava.train.features import evenly_spaced, frozen_features
from minillava.train.kernels import attention_kernel, autocast_ctx

SCALE, OFFSET = 10.0, 5.0  # cosine in [-1, 1] -> logit in [-15, 5]: "matched" needs a cosine above 0.5
CAPTION_SCALE = 20.0  # a softmax temperature over cosines: 0.1 of cosine is a factor e^2 in probability
# The LLM reads the token's embedding, not which word is nearest: the cross-entropy is content once the right
# word is nearest by a margin (held-out cosine to it ~0.4), so a second term pulls the token onto the word
CAPTION_COSINE_WEIGHT = 5.0


def answer_vocabulary(token_sets: list[set[int]], max_words: int) -> list[int]:
    """The `max_words` most frequent answer tokens (by the number of images whose answers use them)."""
    counts = Counter(t for s in token_sets for t in s)
    return [t for t, _ in counts.most_common(max_words)]


def collect(
    model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
    device: torch.device, max_images: int, special_ids: set[int],
) -> tuple[torch.Tensor, list[list[int]]]:  # fmt: skip
    """Features (I, P, Dv) of `max_images` images spread over the data (as the feature statistics pick theirs),
    and each image's answer tokens in order (special tokens left out): the answers of every single-image sample
    that shows it, in data order, so one conversation per image and one question per sample give the same."""
    # one image per sample: with several, which answer words belong to which image is unknown
    samples_of: dict[str, list[int]] = {}
    for i, r in enumerate(dataset.records):
        if len(r.images) == 1:
            samples_of.setdefault(r.images[0], []).append(i)
    chosen = evenly_spaced(list(samples_of.values()), max_images)
    feats, words = [], []
    others = {g[0]: g[1:] for g in chosen}  # the image's first sample -> its other samples
    for batch, f in frozen_features(model, dataset, collate, cache, device, list(others)):  # (B, P, Dv)
        feats.append(f.float())
        for first, labels in zip(batch["indices"], batch["labels"], strict=True):
            answers = labels[labels != IGNORE_INDEX].tolist()
            for j in others[first]:
                try:
                    answers += [t for t in dataset.tokenize(dataset.records[j])[1] if t != IGNORE_INDEX]
                except BadSampleError:  # the training run reports it (or stops on it) in its own words
                    continue
            words.append([t for t in answers if t not in special_ids])
    if not feats:
        raise ValueError("--word-warmup-steps: the training data holds no single-image samples to warm up on")
    return torch.cat(feats), words


def word_space_warmstart(
    model: MiniLlava, dataset: SupervisedDataset, collate: Collator, cache: FeatureCache | None,
    device: torch.device, steps: int, lr: float, seed: int, say: Callable[[str], None], objective: str = "words",
    max_images: int = 2048, max_words: int = 4096, batch_size: int = 128, precision: str = "fp32",
) -> dict[str, float]:  # fmt: skip
    """Train the projector alone for `steps` steps in the LLM's word-embedding space (see the module doc), its
    forward under bf16 autocast when the run's `precision` is bf16 (float32 otherwise)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"word warm start: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    tokenizer = dataset.processor.tokenizer
    special = set(tokenizer.all_special_ids) | {dataset.processor.image_token_id}
    feats, answers = collect(model, dataset, collate, cache, device, max_images, special)  # (I, P, Dv)
    table = model.llm.get_input_embeddings().weight.detach().float()
    word_norm = table.norm(dim=-1).mean().item()
    if objective == "caption":
        full_stop = tokenizer.convert_tokens_to_ids(".")
        vocab = sorted({t for a in answers for t in a} | {full_stop})
        targets = caption_targets(answers, vocab, full_stop, model.tokens_per_image)
        loss_fn = caption_loss
    else:
        vocab = answer_vocabulary([set(a) for a in answers], max_words)
        targets = bag_targets(answers, vocab)
        loss_fn = bag_loss
    word_dirs = F.normalize(table[vocab].to(device), dim=-1)  # (W, D)
    targets = targets.to(device)

    projector = model.projector
    params = list(projector.parameters())  # all of them, also when the run after it keeps the projector frozen
    trains = [p.requires_grad for p in params]
    projector.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)  # its own stream: the training run's RNG is left untouched
    first = last = float("nan")
    # a resampler's attention rows are short (its latents over the pooled patches and themselves): on a CPU the
    # math kernel, whose backward in bf16 is ~10x cheaper there than the flash kernel's (~35 % of a step)
    rows = feats.shape[1] + model.tokens_per_image
    # bf16 keeps float32's range; fp16 would need the loop's gradient scaler, which these steps do not have
    autocast_precision = "bf16" if precision == "bf16" else "fp32"
    try:
        for step in range(steps):
            idx = torch.randint(0, feats.shape[0], (min(batch_size, feats.shape[0]),), generator=gen).to(device)
            with attention_kernel(device, rows):
                with autocast_ctx(autocast_precision, device):
                    tokens = projector(feats[idx].to(model.projector_dtype)).float()  # (B, N, D)
                cos = torch.einsum("bnd,wd->bnw", F.normalize(tokens, dim=-1), word_dirs)  # (B, N, W)
                loss = loss_fn(cos, targets[idx]) + 0.1 * (tokens.norm(dim=-1) - word_norm).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            first = loss.item() if step == 0 else first
            last = loss.item()
    finally:  # the run that follows decides whether the projector trains
        for p, t in zip(params, trains, strict=True):
            p.requires_grad_(t)
    say(f"word-space warm start ({objective}): {steps} projector steps on {feats.shape[0]} images x {len(vocab)} "
        f"answer words, loss {first:.3f} -> {last:.3f} (no LLM forward)")  # fmt: skip
    return {"objective": objective, "images": feats.shape[0], "words": len(vocab), "first_loss": first,
            "final_loss": last}  # fmt: skip


OBJECTIVES = ("words", "caption")


def bag_targets(answers: list[list[int]], vocab: list[int]) -> torch.Tensor:  # (I, W): 1 where the word occurs
    column = {t: j for j, t in enumerate(vocab)}
    targets = torch.zeros(len(answers), len(vocab))
    for i, a in enumerate(answers):
        targets[i, [column[t] for t in set(a) if t in column]] = 1.0
    return targets


def bag_loss(cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (B, N, W), (B, W)
    logits = cos.amax(1) * SCALE - OFFSET  # (B, W): each word's best image token
    return F.binary_cross_entropy_with_logits(logits, targets)


def caption_targets(answers: list[list[int]], vocab: list[int], filler: int, slots: int) -> torch.Tensor:
    """(I, N) the vocabulary column each image token should spell: the answer tokens in order, then `filler`."""
    column = {t: j for j, t in enumerate(vocab)}
    targets = torch.full((len(answers), slots), column[filler])
    for i, a in enumerate(answers):
        spelled = [column[t] for t in a[:slots]]
        targets[i, : len(spelled)] = torch.tensor(spelled, dtype=torch.long)
    return targets


def caption_loss(cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (B, N, W), (B, N)
    on_target = cos.gather(-1, targets.unsqueeze(-1))  # (B, N, 1)
    return F.cross_entropy(cos.flatten(0, 1) * CAPTION_SCALE, targets.flatten()) + CAPTION_COSINE_WEIGHT * (
        1 - on_target
    ).mean()
