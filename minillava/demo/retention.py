"""Does the LLM still know what it knew? A text-only check before and after visual instruction tuning, and the replay
samples that keep it.

`CHECK` holds fixed prompts with known answers that the built-in SmolLM2-135M-Instruct answers right (each candidate
was asked once, greedy; the ones it missed were dropped, so it scores near 100 %: 32 of 33 within the check's 16 new
tokens, where its answer about the sky has not reached "blue" yet; the check measures what tuning takes away). A
response counts when it contains an accepted answer as whole words, after VQA normalisation. `CHECK` is the test
check, read only to report (`minillava demo`); `VALIDATION_CHECK`, other prompts chosen the same way, is what
recipes are chosen on (`minillava demo --eval-on validation`). `REPLAY` holds other prompts again, in neither
check: the demo asks the base model them before training and trains on its own answers, text-only, beside the
image questions.
"""

from __future__ import annotations

import re
from typing import Any

from minillava.eval.metrics import normalize_answer

CHECK: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is the capital of Australia?", ("canberra",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the smallest planet in our solar system?", ("mercury",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What is the chemical symbol for gold?", ("au",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("How many days are in a week?", ("7",)),
    ("What is 2 plus 2?", ("4",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What is the opposite of big?", ("small",)),
    ("What is the opposite of day?", ("night",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("Who was the first person to walk on the moon?", ("armstrong",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("In which country are the pyramids of Giza?", ("egypt",)),
    ("What is the longest river in Africa?", ("nile",)),
    ("What is the plural of mouse?", ("mice",)),
    ("What is the currency of Japan?", ("yen",)),
]

# asked of the base model once, greedy, like CHECK's candidates: these are the 44 of 84 that it answered right
VALIDATION_CHECK: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of the Netherlands?", ("amsterdam",)),
    ("What is the capital of Thailand?", ("bangkok",)),
    ("What is the capital of Peru?", ("lima",)),
    ("What is the capital of Switzerland?", ("bern",)),
    ("What is the capital of Hungary?", ("budapest",)),
    ("What is the capital of Vietnam?", ("hanoi",)),
    ("What is the capital of the Philippines?", ("manila",)),
    ("What is the capital of Chile?", ("santiago",)),
    ("What is the capital of Colombia?", ("bogota",)),
    ("What is the capital of the Czech Republic?", ("prague",)),
    ("What is the capital of Iran?", ("tehran",)),
    ("What is the capital of Iraq?", ("baghdad",)),
    ("What is the capital of New Zealand?", ("wellington",)),
    ("What is the chemical symbol for sodium?", ("na",)),
    ("What is the chemical symbol for silver?", ("ag",)),
    ("How many days are in a year?", ("365",)),
    ("How many sides does a square have?", ("4",)),
    ("What is 10 plus 10?", ("20",)),
    ("What is the opposite of left?", ("right",)),
    ("What is the opposite of happy?", ("sad",)),
    ("What is the opposite of light?", ("dark", "heavy")),
    ("What is the opposite of short?", ("tall", "long")),
    ("What is the opposite of open?", ("closed", "close")),
    ("What is the opposite of good?", ("bad", "evil")),
    ("What is the opposite of full?", ("empty",)),
    ("What is the opposite of strong?", ("weak",)),
    ("What color is grass?", ("green",)),
    ("Who wrote Pride and Prejudice?", ("austen",)),
    ("Who wrote Macbeth?", ("shakespeare",)),
    ("Who wrote the Harry Potter books?", ("rowling",)),
    ("Who developed the theory of relativity?", ("einstein",)),
    ("Who discovered the law of gravity?", ("newton",)),
    ("Who invented the telephone?", ("bell",)),
    ("What language is spoken in France?", ("french",)),
    ("What language is spoken in Spain?", ("spanish",)),
    ("What language is spoken in Italy?", ("italian",)),
    ("What language is spoken in China?", ("chinese", "mandarin")),
    ("In which country is the Eiffel Tower?", ("france",)),
    ("In which city is the Colosseum?", ("rome",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What is the currency of most of Europe?", ("euro",)),
    ("What is the currency of India?", ("rupee",)),
    ("Which ocean lies between Europe and North America?", ("atlantic",)),
    ("What planet do we live on?", ("earth",)),
]

REPLAY: list[str] = [
    "What is the capital of Portugal?", "What is the capital of Egypt?", "What is the capital of India?",
    "Name a fruit that is yellow.", "What do cows drink?", "How many hours are in a day?",
    "How many months are in a year?", "What is 3 plus 5?", "What is the opposite of fast?",
    "What color are bananas?", "Who wrote Hamlet?", "Which planet is closest to the Sun?",
    "Which animal has a trunk?", "What do caterpillars turn into?", "Why is the ocean salty?",
    "Write a sentence about a cat.", "Give me a synonym for happy.", "What is photosynthesis?",
    "Name three primary colors.", "What is the plural of child?", "Translate 'thank you' into French.",
    "Which metal is liquid at room temperature?", "What instrument has 88 keys?",
    "How many sides does a triangle have?", "What is the chemical symbol for iron?",
    "What is the fastest land animal?", "What do you call a baby dog?", "What is the largest desert?",
    "Explain what a rainbow is.", "What is gravity?", "Give me a tip for sleeping well.", "What is a verb?",
    "What is the capital of Greece?", "What is the capital of Mexico?", "What is the capital of Kenya?",
    "How many legs does a dog have?", "What is 10 minus 4?", "What is the opposite of old?",
    "What color are strawberries?", "Who discovered penicillin?", "What is the largest mammal?",
    "What is the freezing point of water in Fahrenheit?", "Name a musical instrument with strings.",
    "What do plants need to grow?", "What is the main language spoken in Germany?", "What is a noun?",
    "Write a short greeting for a friend.", "Describe the taste of lemon.",
    "What is the capital of Norway?", "What is the capital of Argentina?", "What is the capital of Turkey?",
    "What is the capital of Sweden?", "What is the capital of Poland?", "What is the capital of Ireland?",
    "Which planet has rings?", "What is the chemical symbol for salt?", "What is 5 plus 5?",
    "How many wheels does a bicycle have?", "What is the opposite of wet?", "What is the opposite of early?",
    "What color is snow?", "Who wrote the Odyssey?", "What is the largest continent?",
    "What language is spoken in Mexico?", "What is the hottest planet?", "What is the currency of the UK?",
    "What is a mammal?", "Why do leaves change color in autumn?", "What is the water cycle?", "What is a volcano?",
    "How do birds fly?", "What does a doctor do?", "What is the purpose of a map?", "Why do we need sleep?",
    "What is an island?", "What is the difference between weather and climate?", "What is a triangle?",
    "Give an example of a vegetable.", "What is electricity?", "What is the moon made of?", "What is a poem?",
    "Name an animal that lives in the ocean.", "What do bees collect from flowers?", "What is a library?",
    "How do you make tea?", "What is friction?", "What is an atom?", "What does a thermometer measure?",
    "Write one sentence about the sea.", "What is democracy?", "Name a famous scientist.", "What is a desert?",
    "What is recycling?", "What is the speed of light?", "What is a habitat?", "What does a pilot do?",
]  # fmt: skip


def correct(response: str, accepted: tuple[str, ...]) -> bool:
    """An accepted answer occurs in the response as whole words (both VQA-normalised: "Seven." -> "7")."""
    text = f" {normalize_answer(response)} "
    return any(re.search(rf"(?<!\w){re.escape(normalize_answer(a))}(?!\w)", text) for a in accepted)


def ask(model: Any, processor: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy text-only answers, in the model's chat template."""
    from minillava.generate import GenerationConfig, Generator

    generator = Generator(model, processor)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    try:
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            encoded = [generator.encode(p, None) for p in prompts[start : start + batch_size]]
            out += [t.strip() for t in generator.generate_batch(encoded, cfg)]
        return out
    finally:
        model.train(was_training)


def score(model: Any, processor: Any, check: list[tuple[str, tuple[str, ...]]] = CHECK) -> dict[str, Any]:
    """The share of `check`'s prompts answered right, and every response."""
    responses = ask(model, processor, [p for p, _ in check], max_new_tokens=16)  # the answer comes first
    rows = [{"prompt": p, "accepted": list(a), "response": r, "correct": correct(r, a)}
            for (p, a), r in zip(check, responses, strict=True)]  # fmt: skip
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows), "responses": rows}
