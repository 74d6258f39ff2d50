"""Metric functions against hand-computed cases (and pycocoevalcap, where it is installed)."""

from __future__ import annotations

import math
import random

import pytest

from minillava.eval.metrics import (
    bleu,
    caption_scores,
    choice_prompt,
    cider_d,
    exact_match,
    extract_choice,
    normalize_answer,
    pope_answer,
    pope_scores,
    tokenize_caption,
    vqa_accuracy,
)

# ---- VQAv2 normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),  # number word, trailing period, case
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("the dog", "dog"),  # articles dropped
        ("An apple a day", "apple day"),
        ("dont", "don't"),  # contractions restored
        ("isnt", "isn't"),
        ("Im", "im"),  # lower-cased before the table is consulted, so "Im" never matches its entry
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),
        ("a.m.", "am"),  # every other period goes
        ("1,000", "1000"),  # commas are removed outright
        ("red, white", "red white"),
        ("T-Shirt", "t shirt"),  # punctuation glued between words becomes a space
        ("black/white", "black white"),
        ("left - right", "left right"),  # next to a space it is deleted
        ("yes!", "yes"),
        ("What?", "what"),
        ("man's hat", "man 's hat"),  # possessive split off, as the evaluator does
        ("(red)", "red"),
        ("  Blue \n sky\t", "blue sky"),
        ("@home", "home"),
        ("50%", "50%"),  # not in the punctuation list
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent_on_normalised_answers():
    for text in ["2", "dog", "don't", "t shirt", "3.5", "man 's hat", "yes"]:
        assert normalize_answer(normalize_answer(text)) == normalize_answer(text)


# ---- VQAv2 accuracy -------------------------------------------------------------------------------


def test_vqa_accuracy_hand_computed():
    answers = ["2"] * 3 + ["3"] * 7
    # 3 humans said "2": leaving one of them out leaves 2 matches (2/3); leaving out a "3" leaves 3 (1.0)
    assert vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)  # 0.9
    assert vqa_accuracy("3", answers) == 1.0
    assert vqa_accuracy("4", answers) == 0.0
    one = ["cat"] + ["dog"] * 9  # 1 match: 0 when it is left out, else 1/3 -> 9 * (1/3) / 10
    assert vqa_accuracy("Cat.", one) == pytest.approx(0.3)
    two = ["cat"] * 2 + ["dog"] * 8  # 2 matches: 1/3 twice, 2/3 eight times
    assert vqa_accuracy("a cat", two) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("the cat", ["cat"] * 10) == 1.0


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two", ["two"] * 10) == 1.0  # both become "2"
    assert vqa_accuracy("T-shirt.", ["t shirt"] * 4 + ["shirt"] * 6) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_single_reference_is_exact_match():
    assert vqa_accuracy("The Dog.", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match("Two dogs.", ["2 dogs"]) == 1.0
    assert exact_match("two", ["three", "2"]) == 1.0
    assert exact_match("two dogs", ["2"]) == 0.0


# ---- multiple choice ------------------------------------------------------------------------------


def test_choice_prompt_follows_llava_mmbench():
    assert choice_prompt("What is it?", ["cat", "dog"], hint="A pet.") == (
        "A pet.\nWhat is it?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    )
    assert choice_prompt("Q", ["x", "y", "z"]).splitlines() == [
        "Q",
        "A. x",
        "B. y",
        "C. z",
        "Answer with the option's letter from the given choices directly.",
    ]


CHOICES = ["cat", "dog", "bird", "dark red"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(C)", "C"),
        ("C.", "C"),
        (" D ", "D"),
        ("B. dog", "B"),
        ("(B) dog", "B"),
        ("C) bird", "C"),
        ("The answer is C.", "C"),
        ("Answer: D", "D"),
        ("I would pick option B because it barks", "B"),
        ("It is B", "B"),
        ("A", "A"),
        ("A cat is sitting on the mat", "A"),  # lone "A" is an article in a sentence: the option text decides
        ("A small bird on a branch", "C"),
        ("It is a dog", "B"),  # option text
        ("dark red", "D"),  # "red" alone is not an option; "dark red" is
        ("B or C", None),  # two letters: ambiguous
        ("a cat and a dog", None),  # two option texts
        ("E", None),  # not one of four options
        ("", None),
        ("I don't know", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, CHOICES) == expected


def test_extract_choice_prefers_the_longer_of_nested_options():
    assert extract_choice("It looks dark red to me", ["red", "dark red"]) == "B"
    assert extract_choice("It looks red to me", ["red", "dark red"]) == "A"


# ---- POPE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("It is not there", "no"),
        ("Yes. But not a big one.", "yes"),  # only the first sentence counts
        ("no.", "no"),
        ("Nope", "yes"),  # LLaVA's rule: anything without "No"/"no"/"not" is yes
        ("NO", "yes"),  # (and it is case-sensitive)
        ("", "yes"),
    ],
)
def test_pope_answer_follows_llava(text, expected):
    assert pope_answer(text) == expected


def test_pope_scores_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]  # TP 2 (0, 4), FP 1 (1), TN 1 (2), FN 1 (3)
    s = pope_scores(preds, labels)
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (2, 1, 1, 1)
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(0.6)
    none_yes = pope_scores(["no", "no"], ["yes", "no"])  # no positive predictions: precision 0, not a crash
    assert (none_yes["precision"], none_yes["recall"], none_yes["f1"], none_yes["yes_ratio"]) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        pope_scores(["yes"], [])


# ---- captions -------------------------------------------------------------------------------------


def test_tokenize_caption_like_ptb():
    assert tokenize_caption("A dog's toy, isn't it?") == "a dog 's toy is n't it"
    assert tokenize_caption('Two people (a man) said "hi" -- at 3.5 km.') == "two people a man said hi at 3.5 km"
    assert tokenize_caption("A well-known cat!\n") == "a well-known cat"


def test_bleu_hand_computed():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # unigrams 5/6 (sat misses); bigrams 3/5 (the cat, on the, the mat); trigrams 1/4 (on the mat); 4-grams 0/3
    b = bleu([hyp], [[ref]])
    assert b[0] == pytest.approx(5 / 6)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b[2] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b[3] < 1e-3  # no 4-gram matches: only the smoothing constant keeps it above zero


def test_bleu_brevity_penalty_and_closest_reference():
    assert bleu(["the cat"], [["the cat sat on the mat"]])[0] == pytest.approx(math.exp(1 - 6 / 2))
    # hypothesis of 4 words, references of 3 and 5: the closer-and-shorter (3) is used, so no penalty
    assert bleu(["a b c d"], [["a b c", "a b c d e"]])[0] == pytest.approx(1.0)
    # corpus level: counts and lengths are summed over samples before the ratios
    assert bleu(["a b", "c"], [["a b"], ["d"]])[0] == pytest.approx(2 / 3)


def test_cider_d_hand_computed():
    # Two images, so idf = log(2) - log(df) = log(2) for every n-gram seen in one image's references.
    # Image 1 equals its reference: unigram and bigram cosines are 1, no 3/4-grams -> mean(1,1,0,0) * 10 = 5.
    # Image 2 shares nothing with its reference -> 0.
    mean, each = cider_d(["a b", "c d"], [["a b"], ["e f"]])
    assert each == pytest.approx([5.0, 0.0])
    assert mean == pytest.approx(2.5)
    # the Gaussian length penalty (sigma 6) on the bigram-count difference: exp(-1 / 72) for one extra word
    _, each = cider_d(["a b", "c d"], [["a b a"], ["e f"]])
    assert each[0] < 5.0
    # a one-image corpus: every reference n-gram has idf log(1) - log(1) = 0, so CIDEr-D is 0 by construction
    assert cider_d(["a b"], [["a b"]])[0] == 0.0


def test_caption_scores_tokenise_first():
    s = caption_scores(["A cat, on the mat.", "Dogs!"], [["a cat on the mat"], ["dogs"]])
    assert s["bleu_1"] == pytest.approx(1.0)
    assert set(s) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "per_sample"}
    with pytest.raises(ValueError):
        caption_scores(["a"], [[]])


def test_bleu_and_cider_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(1)
    vocab = ["a", "the", "cat", "dog", "sits", "on", "mat", "red", "blue", "man", "woman", "with", "ball", "in"]
    for _ in range(40):
        n = rng.randint(1, 8)
        hyps = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10))) for _ in range(n)]
        refs = [
            [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
            for _ in range(n)
        ]
        gts, res = {i: refs[i] for i in range(n)}, {i: [hyps[i]] for i in range(n)}
        ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        ref_cider, ref_each = Cider().compute_score(gts, res)
        assert bleu(hyps, refs) == pytest.approx(ref_bleu, abs=1e-12)
        mean, each = cider_d(hyps, refs)
        assert mean == pytest.approx(float(ref_cider), abs=1e-12)
        assert each == pytest.approx([float(x) for x in ref_each], abs=1e-12)


def test_wilson_interval():
    from minillava.eval.metrics import wilson_interval

    low, high = wilson_interval(475, 500)
    assert 0.925 < low < 0.93 and 0.965 < high < 0.97  # 95 %: about +-2 points around 95 %
    assert wilson_interval(500, 500)[1] > 0.9999 and 0.99 < wilson_interval(500, 500)[0] < 1.0
    assert wilson_interval(0, 10)[0] == 0.0
    wide, narrow = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
