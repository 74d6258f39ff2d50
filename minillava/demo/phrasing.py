"""The demo's questions in language, not templates: a compositional generator of phrasings.

Each question type has several *families* of phrasing (word order, imperative or interrogative, short or long);
within a family, synonyms (colour / color, shape / object / thing / item / figure), case and final punctuation
vary at random. Families are split three ways, by name:

- training families: what the model is trained on (and the `test`, `combo`, `shift` splits ask with);
- validation families: asked only by the validation split that recipes are chosen on;
- held-out families: asked only by the `phrasing` test split, never seen while training or choosing a recipe.

Around a family's words, a question may also be called by another name for the picture (image / picture / photo /
drawing), come as a bare fragment ("Shape?", "How many circles?": each type has a `short` family), or be wrapped
in an instruction before it ("Question: ...") or after it, saying how to answer ("... Answer in one word.").
Those wrappers are split three ways like the families, so a held-out question is new in its wrapper too. Trained
only on full questions, the model answered questions by other people in those forms with a word copied from the
question ("Give the position of the object in one word." -> "one"; benchmarks/outside_probe.py).

The answers never vary in training (one canonical word or sentence per fact: the warm start's caption spells
them); evaluation accepts the other forms a person would give (`accepted_answers`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

COLOUR_WORDS = ("colour", "color")
NOUNS = ("shape", "object", "thing", "item", "figure")  # what a single object may be called besides its shape
PLURAL_NOUNS = ("shapes", "objects", "things", "items", "figures")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
IMAGE_WORDS = ("image", "picture", "photo", "drawing")  # what a template's "image" or "picture" may be called


@dataclass(frozen=True)
class Family:
    qtype: str
    name: str
    templates: tuple[str, ...]


def _families(qtype: str, **named: tuple[str, ...]) -> list[Family]:
    return [Family(qtype, name, templates) for name, templates in named.items()]


# Slots: {obj} a single object (its shape name or a generic noun), {objs} several, {colour_word} colour / color,
# {thing} what a yes/no question asks about ("red circle", "red shape", "circle"), {a} its article.
FAMILIES: list[Family] = [
    *_families(
        "shape",
        what_shape=("What shape is in the image?", "What shape is this?", "What shape do you see?",
                    "What shape is shown in the picture?"),
        which_shape=("Which shape is in the picture?", "Which shape is drawn here?", "Which shape is this?"),
        name_shape=("Name the shape.", "Name the shape in the image.", "Tell me the shape.", "Identify the shape."),
        kind_of_shape=("What kind of shape is this?", "What type of shape is in the image?",
                       "What sort of shape is drawn?"),
        drawn_is=("The object in the image is which shape?", "The figure shown has what shape?"),
        shape_of=("What is the shape of the {noun}?", "What's the shape of the {noun} in the image?",
                  "Give the shape of the {noun}."),
        short=("Shape?", "Which shape?", "The shape?"),
    ),  # fmt: skip
    *_families(
        "colour",
        what_colour=("What {colour_word} is the {obj}?", "What {colour_word} is the {obj} in the image?"),
        which_colour=("Which {colour_word} is the {obj}?", "Which {colour_word} does the {obj} have?"),
        name_colour=("Name the {colour_word} of the {obj}.", "Tell me the {colour_word} of the {obj}.",
                     "Say what {colour_word} the {obj} is."),
        colour_of=("What is the {colour_word} of the {obj}?", "What's the {colour_word} of the {obj}?"),
        obj_is_what=("The {obj} is what {colour_word}?", "The {obj} has which {colour_word}?"),
        painted=("In what {colour_word} is the {obj} drawn?", "What {colour_word} has the {obj} been painted?",
                 "What {colour_word} was used for the {obj}?"),
        short=("{obj} {colour_word}?", "{colour_word}?", "Which {colour_word}?"),
    ),  # fmt: skip
    *_families(
        "size",
        small_or_large=("Is the {obj} small or large?", "Is the {obj} large or small?"),
        what_size=("What size is the {obj}?", "What is the size of the {obj}?"),
        how_big=("How big is the {obj}: small or large?", "How large is the {obj}, small or large?"),
        tell_size=("Tell me whether the {obj} is small or large.", "Say if the {obj} is large or small."),
        would_you=("Would you call the {obj} small or large?", "Would you say the {obj} is small or large?"),
        size_of=("Give the size of the {obj}: small or large.", "Size of the {obj}, small or large?"),
        short=("{obj} size?", "Small or large?", "Big or small?"),
    ),  # fmt: skip
    *_families(
        "position",
        where_list=("Where is the {obj}: left, right, top, bottom or center?",
                    "Where is the {obj}: left, right, top, bottom or centre?"),
        where=("Where is the {obj}?", "Where is the {obj} located?", "Where in the image is the {obj}?"),
        which_part=("In which part of the image is the {obj}?", "Which part of the picture is the {obj} in?"),
        tell_where=("Tell me where the {obj} is.", "Say where the {obj} is placed."),
        position_of=("What is the position of the {obj}?", "What's the position of the {obj} in the image?"),
        located=("The {obj} is located where?", "The {obj} sits in which part of the image?"),
        short=("Where's the {obj}?", "{obj}: where?", "Position?"),
    ),  # fmt: skip
    *_families(
        "count",
        how_many=("How many {objs} are in the image?", "How many {objs} are there?", "How many {objs} can you see?"),
        count_them=("Count the {objs}.", "Count the {objs} in the picture."),
        number_of=("What is the number of {objs}?", "What is the number of {objs} in the image?"),
        tell_count=("Tell me how many {objs} there are.", "Say how many {objs} you see."),
        how_many_shown=("How many {objs} does the image show?", "How many {objs} are drawn?"),
        count_of=("Give the count of {objs}.", "What's the count of {objs} in the picture?"),
        short=("How many {objs}?", "{objs}, how many?", "Count?"),
    ),  # fmt: skip
    *_families(
        "yes/no",
        is_there=("Is there {a} {thing} in the image?", "Is there {a} {thing}?"),
        do_you_see=("Do you see {a} {thing}?", "Can you see {a} {thing} in the picture?"),
        does_contain=("Does the image contain {a} {thing}?", "Does the picture show {a} {thing}?"),
        is_present=("Is {a} {thing} present?", "Is {a} {thing} visible in the image?"),
        answer_yes_no=("Answer yes or no: is there {a} {thing}?", "Yes or no: does the image have {a} {thing}?"),
        any=("Is any {thing} in the picture?", "Are there any {thing}s in the image?"),
        short=("{a} {thing} here?", "See {a} {thing}?"),
    ),  # fmt: skip
    *_families(
        "describe",
        describe=("Describe the image in one sentence.", "Describe the image.", "Describe the picture briefly."),
        caption=("Write a caption for this image.", "Caption this picture.", "Give a one-sentence caption."),
        description=("Give a short description of the image.", "Provide a brief description of the picture."),
        what_shows=("What does the image show? Answer in one sentence.",
                    "In one sentence, what does the picture show?"),
        summarise=("Summarize the image in a sentence.", "Summarise the picture in one sentence."),
        tell_about=("Tell me about this image in one sentence.", "Say in a sentence what is drawn."),
        short=("Caption?", "Description, please."),
    ),  # fmt: skip
    *_families(
        "fashion",
        what_kind=("What kind of clothing item is this?", "What kind of item is this?"),
        what_is_garment=("What is this garment?", "What is this piece of clothing?"),
        name_item=("Name this item of clothing.", "Name the item in the picture."),
        which_item=("Which clothing item is shown?", "Which fashion item is in the image?"),
        type_of=("What type of fashion item is this?", "What type of apparel is shown?"),
        identify=("Identify the clothing item.", "Tell me what item of clothing this is."),
        short=("Item?", "Which garment?"),
    ),  # fmt: skip
]
# One family per type for validation, one for the `phrasing` test split; the other four train.
VALIDATION_FAMILIES = {"shape": "drawn_is", "colour": "obj_is_what", "size": "would_you", "position": "located",
                       "count": "how_many_shown", "yes/no": "is_present", "describe": "summarise",
                       "fashion": "type_of"}  # fmt: skip
HELD_OUT_FAMILIES = {"shape": "shape_of", "colour": "painted", "size": "size_of", "position": "tell_where",
                     "count": "count_of", "yes/no": "answer_yes_no", "describe": "tell_about",
                     "fashion": "identify"}  # fmt: skip
PHRASINGS = ("train", "validation", "held_out")
# Instructions around a question, split like the families: (before it, after it by answer kind)
PREFIXES = {"train": ("Look at the image.", "Question:", "Please answer:"), "validation": ("Quick question:",),
            "held_out": ("Here is a picture.",)}  # fmt: skip
SUFFIXES = {
    "word": {"train": ("Answer in one word.", "One word.", "Reply with a single word."),
             "validation": ("Use a single word.",), "held_out": ("Give a one-word answer.",)},
    "number": {"train": ("Answer with a number.", "Reply with a number."), "validation": ("Give a number.",),
               "held_out": ("Respond with a number.",)},
}  # fmt: skip
ANSWER_KINDS = {"count": "number", "describe": None}  # every other type answers in one word
WRAPPED = 0.3  # of the questions, those with an instruction before or after them


def families(qtype: str, phrasing: str) -> list[Family]:
    """The families of `qtype` that a split with this phrasing set may ask with."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, not {phrasing!r}")
    chosen = [f for f in FAMILIES if f.qtype == qtype]
    if phrasing == "validation":
        return [f for f in chosen if f.name == VALIDATION_FAMILIES[qtype]]
    if phrasing == "held_out":
        return [f for f in chosen if f.name == HELD_OUT_FAMILIES[qtype]]
    return [f for f in chosen if f.name not in (VALIDATION_FAMILIES[qtype], HELD_OUT_FAMILIES[qtype])]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def surface(rng: random.Random, text: str) -> str:
    """Case and final punctuation as people type them: the words stay, their spelling on the page varies."""
    r = rng.random()
    if r < 0.25:
        text = text.lower()
    elif r < 0.3:
        text = text.upper()
    if rng.random() < 0.2:
        text = text.rstrip("?.")
    return text


def ask(rng: random.Random, qtype: str, phrasing: str, **slots: str) -> str:
    """One question of `qtype` in a random family of the phrasing set, slots filled, the picture named, maybe
    wrapped in an instruction, surface varied."""
    template = rng.choice(rng.choice(families(qtype, phrasing)).templates)
    values = {"colour_word": rng.choice(COLOUR_WORDS), "noun": rng.choice(NOUNS), **slots}
    text = template.format(**values)
    text = text[0].upper() + text[1:]  # a template may open with a slot: "{obj} size?"
    text = re.sub(r"\b(image|picture)\b", lambda _: rng.choice(IMAGE_WORDS), text)
    return surface(rng, wrap(rng, text, qtype, phrasing))


def wrap(rng: random.Random, question: str, qtype: str, phrasing: str) -> str:
    """The question, or (`WRAPPED` of the time) an instruction before it, or one after it on how to answer."""
    kind = ANSWER_KINDS.get(qtype, "word")
    if rng.random() >= WRAPPED:
        return question
    if kind is None or rng.random() < 0.5:
        prefix = rng.choice(PREFIXES[phrasing])
        return f"{prefix} {question if prefix.endswith('.') else question[0].lower() + question[1:]}"
    return f"{question} {rng.choice(SUFFIXES[kind][phrasing])}"


_SINGULAR_VERBS = re.compile(r"\b(is|does|has|IS|DOES|HAS|Is|Does|Has)\b")
_PLURAL = {"is": "are", "does": "do", "has": "have"}


def plural_verbs(question: str) -> str:
    """"What colour is the circles?" -> "What colour are the circles?" (the colour families are written for one
    object; a counting scene asks them about several)."""

    def plural(m: re.Match) -> str:
        word = _PLURAL[m.group(1).lower()]
        return word.upper() if m.group(1).isupper() else word.capitalize() if m.group(1)[0].isupper() else word

    return _SINGULAR_VERBS.sub(plural, question)


def skeleton(question: str) -> str:
    """A question with its content words masked and its surface normalised: what a phrasing *is*. Two questions
    share a skeleton when they differ only in colour, shape, synonym (the picture's name too), case or final
    punctuation."""
    from minillava.demo.synthetic import COLOURS, SHAPES

    words = question.lower().replace("?", " ").replace(".", " ").replace(",", " ").replace(":", " ").split()
    content = {**dict.fromkeys(COLOURS, "<c>"), **{s: "<s>" for s in SHAPES}, **{s + "s": "<s>" for s in SHAPES},
               **dict.fromkeys(NOUNS + PLURAL_NOUNS, "<s>"), **dict.fromkeys(COLOUR_WORDS, "<colour>"),
               **dict.fromkeys(IMAGE_WORDS, "<image>"), "centre": "center", "an": "a",
               "summarise": "summarize"}  # fmt: skip
    return " ".join(content.get(w, w) for w in words)


# ---- answers a person may give: evaluation accepts each (after VQA normalisation) ----

_ANSWER_FORMS = {
    "large": ("large", "big", "it is large", "it's large"),
    "small": ("small", "little", "tiny", "it is small", "it's small"),
    "center": ("center", "centre", "middle", "in the center", "in the centre", "in the middle", "at the center"),
    "yes": ("yes", "yes there is", "yes it does", "yes, there is"),
    "no": ("no", "no there is not", "no there isn't", "no it does not", "no, there is not"),
    "T-shirt": ("T-shirt", "t-shirt", "tshirt", "t shirt", "top", "T-shirt/top"),
}


def accepted_answers(answer: str, qtype: str) -> list[str]:
    """The canonical answer and the other forms a person would give: "left" -> "on the left", "the left";
    "circle" -> "circles", "a circle"; "three" -> "3" (number words and articles are already folded by the
    VQA normalisation that `exact` applies)."""
    forms = [answer, *_ANSWER_FORMS.get(answer, ())]
    if qtype == "position" and answer != "center":
        forms += [f"on the {answer}", f"the {answer}", f"at the {answer}", f"{answer} side", f"on the {answer} side"]
    if qtype in ("shape", "fashion"):
        forms += [answer + "s", f"it is {article(answer)} {answer}", f"a {answer}"]
    if qtype == "colour":
        forms += [f"it is {answer}", f"{answer} colour", f"{answer} color"]
    if qtype == "count":
        forms += [f"there are {answer}", f"{answer} shapes", f"{answer} objects"]
    return list(dict.fromkeys(forms))


def describes(prediction: str, facts: dict[str, str]) -> bool:
    """A free-form description is right when it names the scene's colour, shape (singular or plural) and size or
    count (a number word or digit, or for one shape an opening article; "small" / "little" / "tiny", "large" /
    "big"), and no other colour or shape; of a scene of several kinds ("objects": "red circle, blue star"), every
    colour and shape there and no other. Position and word order are free."""
    from minillava.demo.synthetic import COLOURS, SHAPES
    from minillava.eval.metrics import normalize_answer

    words = {w[:-1] if w[:-1] in SHAPES else w for w in normalize_answer(prediction).split()}
    if "objects" in facts:
        shown = [word for pair in facts["objects"].split(", ") for word in pair.split()]
        wanted = [{word} for word in shown]
    else:
        shown = [facts["colour"], facts["shape"]]
        wanted = [{facts["colour"]}, {facts["shape"]}]
        sizes = {"small": {"small", "little", "tiny"}, "large": {"large", "big"}}
        if "size" in facts:
            wanted.append(sizes[facts["size"]])
        # "a small red circle" says one as "one small red circle" does (the VQA rules drop the article)
        if "count" in facts and not (facts["count"] == "one" and re.match(r"(an?|one)\b", prediction.strip(), re.I)):
            wanted.append({normalize_answer(facts["count"])})
    wrong = (set(COLOURS) | set(SHAPES)) - set(shown)
    return all(words & w for w in wanted) and not words & wrong
