"""Evaluation metrics as plain functions: answer normalisation, per-sample scores and aggregates.

- `vqa`: VQAv2 accuracy. Answers are normalised as the EvalAI / VQAv2 evaluator does (the processor that
  LLaVA, MMF and lmms-eval use): lower case, punctuation, number words to digits, articles, contractions.
  A prediction scores min(#humans that gave it / 3, 1), averaged over the 10-choose-9 subsets of the
  human answers (leave one out).
- `exact`: normalised exact match against any reference answer.
- `choice`: multiple choice; the option letter is extracted from free text (MMBench-style rules).
- `pope`: yes/no with LLaVA's rule (first sentence; "No"/"no"/"not" means no), then accuracy, precision,
  recall, F1 and the yes-ratio, with "yes" as the positive class.
- `caption`: corpus BLEU-1..4 and CIDEr-D computed as the COCO caption evaluation (pycocoevalcap) does,
  after a pure-Python approximation of its PTB tokenisation.

No dependency beyond the standard library.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

# ---- VQAv2 answer normalisation -------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The evaluator's `(?!<=\d)` was meant as a look-behind but is a look-ahead that never fires: every period
# not followed by a digit is dropped ("3.5" keeps its point, "yes." and "mr." lose theirs). Kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        # punctuation next to a space (or any text with a 1,000-style number) is deleted; glued between two
        # words it becomes a space ("t-shirt" -> "t shirt", "black/white" -> "black white")
        out = out.replace(p, "") if p + " " in text or " " + p in text or digit_comma else out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """VQAv2 / EvalAI answer normalisation ("Two dogs." -> "2 dogs", "the T-shirt" -> "t shirt", "dont" -> "don't")."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (normally 10).

    For each human answer left out, min(#matches among the others / 3, 1); the mean over those subsets.
    With a single reference answer there is nothing to leave out: the score is normalised exact match.
    """
    if not answers:
        raise ValueError("vqa accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # leaving out a matching answer leaves matches - 1 among the others; leaving out another leaves matches
    total = sum(min(1.0, (matches - (r == pred)) / 3.0) for r in refs)
    return total / len(refs)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


# ---- multiple choice ------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_WHOLE_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\s*[.:)]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|\.|:|\s*-\s)")
_KEYWORD_LETTER = re.compile(
    r"\b(?:answer|option|choice)\b\s*(?:is|would be|:)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE
)
_STRIP_FOR_TOKENS = re.compile(r"[.,:;!?()\[\]{}*#'\"`]")


def choice_prompt(question: str, choices: Sequence[str], hint: str | None = None) -> str:
    """LLaVA's MMBench prompt: [hint\\n]question\\nA. ...\\nB. ...\\nAnswer with the option's letter ..."""
    lines = ([hint] if hint else []) + [question]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + [CHOICE_INSTRUCTION])


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-text answer picks, or None when it names none (or several) of them.

    In order: the answer is a bare letter ("B", "(b)", "C."); it starts with a marked letter ("B. red",
    "(B) red", "B) red"); a keyword names one ("the answer is C", "Option: D"); exactly one option letter
    stands alone among its words (a lone "A" in a longer sentence is read as the article and ignored, as
    MMBench does); exactly one option's text appears in the answer (an option contained in another matched
    option does not count).
    """
    letters = LETTERS[: len(choices)]
    t = text.strip()
    if not t:
        return None
    m = _WHOLE_LETTER.match(t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    for pattern in (_LEADING_LETTER, _KEYWORD_LETTER):
        m = pattern.search(t)
        if m and m.group(1).upper() in letters and (pattern is not _KEYWORD_LETTER or m.group(1).isupper()):
            return m.group(1).upper()
    tokens = _STRIP_FOR_TOKENS.sub(" ", t).split()
    found = {tok for tok in tokens if len(tok) == 1 and tok in letters}
    if "A" in found and len(tokens) > 3:
        found.discard("A")
    if len(found) == 1:
        return found.pop()
    if found:
        return None  # several letters: ambiguous
    lowered = " " + " ".join(_STRIP_FOR_TOKENS.sub(" ", t.lower()).split()) + " "
    named = {}
    for letter, choice in zip(letters, choices, strict=True):
        c = " ".join(_STRIP_FOR_TOKENS.sub(" ", str(choice).lower()).split())
        if c and f" {c} " in lowered:
            named[letter] = c
    named = {k: c for k, c in named.items() if not any(c != o and c in o for o in named.values())}
    return next(iter(named)) if len(named) == 1 else None


# ---- POPE -----------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """LLaVA's POPE rule: keep the first sentence, drop commas; "No", "no" or "not" as a word means no."""
    text = text.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" is positive) and yes-ratio of parsed yes/no answers."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope needs at least one sample")
    tp = sum(p == "yes" and gt == "yes" for p, gt in zip(predictions, labels, strict=True))
    fp = sum(p == "yes" and gt == "no" for p, gt in zip(predictions, labels, strict=True))
    tn = sum(p == "no" and gt == "no" for p, gt in zip(predictions, labels, strict=True))
    fn = sum(p == "no" and gt == "yes" for p, gt in zip(predictions, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# ---- captions: BLEU and CIDEr-D -------------------------------------------------------------------

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
# Tokens the COCO evaluation's PTB tokenizer output drops (its -LRB- etc. are brackets here).
_PTB_DROP = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}", '"']
)
_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_PTB_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./]\w+)*|\.\.\.|--|[^\w\s]")


def tokenize_caption(text: str) -> str:
    """Lower case and split off punctuation and clitics like the Stanford PTB tokenizer the COCO caption
    evaluation runs ("A dog's toy, isn't it?" -> "a dog 's toy is n't it"); punctuation tokens are dropped."""
    text = str(text).lower().replace("\n", " ").replace("\t", " ")
    text = _CLITIC.sub(r"\1 '\2", _CLITIC_NT.sub(r"\1 n't", text))
    return " ".join(tok for tok in _PTB_TOKEN.findall(text) if tok not in _PTB_DROP)


def _ngrams(words: list[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as the COCO caption evaluation computes it (pycocoevalcap `Bleu`).

    Clipped n-gram counts and lengths are summed over the corpus; each hypothesis's reference length is
    the closest one (the shorter on a tie); the brevity penalty applies to the totals. Inputs are already
    tokenised, space-separated strings.
    """
    _check_pairs(hypotheses, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        words = hyp.split()
        counts = _ngrams(words, n)
        max_ref: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, c in _ngrams(ref_words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        test_len += len(words)
        ref_len += min((abs(rl - len(words)), rl) for rl in ref_lens)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D (corpus mean, per-sample scores) as pycocoevalcap's `Cider` computes it.

    TF-IDF n-gram vectors with document frequencies from the references of this corpus, the hypothesis
    clipped by each reference, cosine per n averaged over n = 1..4 and over references, a Gaussian length
    penalty (sigma 6), times 10. As in that implementation, the "length" in the penalty counts bigrams.
    """
    _check_pairs(hypotheses, references)
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_num_docs = math.log(float(len(references)))

    def vectorise(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hypotheses, ref_counts, strict=True):
        vec, norm, length = vectorise(_ngrams(hyp.split(), n))
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, length_r = vectorise(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, object]:
    """BLEU-1..4 and CIDEr-D of raw captions (tokenised here), plus per-sample CIDEr-D."""
    hyps = [tokenize_caption(h) for h in hypotheses]
    refs = [[tokenize_caption(r) for r in rs] for rs in references]
    b = bleu(hyps, refs, 4)
    cider, per_sample = cider_d(hyps, refs)
    return {"bleu_1": b[0], "bleu_2": b[1], "bleu_3": b[2], "bleu_4": b[3], "cider_d": cider, "per_sample": per_sample}


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("need at least one caption to score")
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")


# ---- intervals ------------------------------------------------------------------------------------


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96): unlike p +- z * se it stays inside [0, 1]
    and is honest near 0 % and 100 %, where a demo's scores sit."""
    if n <= 0:
        raise ValueError("an interval needs at least one sample")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
