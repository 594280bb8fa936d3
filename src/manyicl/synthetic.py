"""A synthetic task suite the project generates itself, for the offline quickstart and for tests.

Every generator is seeded. Several tasks can only be solved in context: their labels are arbitrary symbols,
or their mapping is drawn per task (so it is fixed within the task and random across tasks) — a model can
learn them only from the demonstrations, which is what ManyICL trains for. One task (``world_capitals``)
asks what a pretrained model already knows and serves as the forgetting benchmark.
"""

from __future__ import annotations

import random
import string
from typing import Callable

from manyicl.errors import ManyICLError
from manyicl.tasks import Example, Task

POSITIVE = "good great excellent lovely wonderful superb happy delightful brilliant pleasant charming fine".split()
NEGATIVE = "bad awful terrible horrible dreadful poor sad boring ugly nasty dull weak".split()
TOPICS = {
    "animal": "cat dog horse lion tiger mouse eagle shark whale rabbit fox wolf".split(),
    "food": "bread cheese apple rice pasta soup cake pizza salad banana carrot butter".split(),
    "vehicle": "car truck bus train bicycle plane boat scooter tram van ship taxi".split(),
    "color": "red blue green yellow purple orange pink brown black white grey violet".split(),
}
FILLER = "the a this that very quite really some my our".split()
NONSENSE = ["zorp", "blick", "wug", "dax", "fep", "tove", "gorm", "quix", "snib", "plonk", "vark", "yim"]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Ireland": "Dublin", "Belgium": "Brussels", "Hungary": "Budapest", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "Denmark": "Copenhagen", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "England": "London", "Scotland": "Edinburgh", "Australia": "Canberra", "India": "New Delhi",
    "South Korea": "Seoul", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Czech Republic": "Prague", "Romania": "Bucharest", "Ukraine": "Kyiv", "Switzerland": "Bern",
    "Netherlands": "Amsterdam", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad", "Brazil": "Brasilia",
}


def _word(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


# Each generator: (task rng, example rng) -> (family, make_example, labels or None)
Generator = Callable[[random.Random], tuple[str, Callable[[random.Random], tuple[str, str]], list[str] | None]]


def sym_sentiment(trng):
    """Sentiment with arbitrary symbol labels (ICL only)."""
    pos, neg = trng.sample(NONSENSE, 2)

    def make(r):
        positive = r.random() < 0.5
        words = r.sample(POSITIVE if positive else NEGATIVE, 2) + r.sample(FILLER, 2)
        r.shuffle(words)
        return " ".join(words), pos if positive else neg

    return "classification", make, sorted([pos, neg])


def sym_topic(trng):
    """Topic of a word list with per-task symbol labels (ICL only)."""
    symbols = dict(zip(TOPICS, trng.sample(NONSENSE, len(TOPICS))))

    def make(r):
        topic = r.choice(list(TOPICS))
        return " ".join(r.sample(TOPICS[topic], 3)), symbols[topic]

    return "classification", make, sorted(symbols.values())


def vowel_start(trng):
    def make(r):
        w = _word(r)
        return w, "vowel" if w[0] in "aeiou" else "consonant"

    return "classification", make, ["consonant", "vowel"]


def digit_parity(trng):
    def make(r):
        digits = [r.randint(0, 9) for _ in range(r.randint(2, 5))]
        return " ".join(map(str, digits)), "even" if sum(digits) % 2 == 0 else "odd"

    return "classification", make, ["even", "odd"]


def greater_than_nli(trng):
    def make(r):
        a, b = r.randint(0, 99), r.randint(0, 99)
        if r.random() < 0.33:
            return f"Premise: x is {a}.\nHypothesis: y is greater than {b}.", "neutral"
        return f"Premise: x is {a}.\nHypothesis: x is greater than {b}.", "entailment" if a > b else "contradiction"

    return "nli", make, ["contradiction", "entailment", "neutral"]


def box_membership_nli(trng):
    colors = TOPICS["color"]

    def make(r):
        held = r.sample(colors, 3)
        probe = r.choice(held) if r.random() < 0.5 else r.choice([c for c in colors if c not in held])
        return f"Premise: the box holds {', '.join(held)}.\nHypothesis: the box holds {probe}.", (
            "entailment" if probe in held else "contradiction"
        )

    return "nli", make, ["contradiction", "entailment"]


def key_lookup(trng):
    """Extractive QA over a small key-value context."""

    def make(r):
        keys = r.sample(string.ascii_lowercase, 4)
        values = {k: str(r.randint(0, 99)) for k in keys}
        ask = r.choice(keys)
        context = ", ".join(f"{k}={v}" for k, v in values.items())
        return f"Context: {context}\nQuestion: what is {ask}?", values[ask]

    return "qa", make, None


def made_up_capitals(trng):
    """A per-task random map from invented countries to invented cities: answerable only from demonstrations."""
    countries = [_word(trng, 6).capitalize() for _ in range(16)]
    cities = {c: _word(trng, 5).capitalize() for c in countries}

    def make(r):
        c = r.choice(countries)
        return c, cities[c]

    return "qa", make, None


def addition(trng):
    def make(r):
        a, b = r.randint(0, 50), r.randint(0, 50)
        return f"{a} + {b}", str(a + b)

    return "math", make, None


def affine_map(trng):
    """y = a*x + b with (a, b) drawn per task: the function must be inferred from the demonstrations."""
    a, b = trng.randint(2, 5), trng.randint(1, 9)

    def make(r):
        x = r.randint(0, 999)
        return f"x = {x}", str(a * x + b)

    return "math", make, None


def dedup_summary(trng):
    """'Summarize' a word list by its distinct words in order of first appearance."""

    def make(r):
        vocab = r.sample(TOPICS["animal"] + TOPICS["food"], 4)
        words = [r.choice(vocab) for _ in range(9)]
        return " ".join(words), " ".join(dict.fromkeys(words))

    return "summarization", make, None


def arithmetic_choice(trng):
    def make(r):
        a, b = r.randint(1, 20), r.randint(1, 20)
        options = {a + b}
        while len(options) < 3:
            options.add(a + b + r.randint(-5, 5))
        options = sorted(options)
        r.shuffle(options)
        letters = "ABC"
        text = f"Question: {a} + {b} = ?\n" + "\n".join(f"{letter}. {o}" for letter, o in zip(letters, options))
        return text, letters[options.index(a + b)]

    return "multiple_choice", make, ["A", "B", "C"]


def reverse_words(trng):
    def make(r):
        words = r.sample(TOPICS["vehicle"] + TOPICS["color"], 3)
        return " ".join(words), " ".join(reversed(words))

    return "generation", make, None


def letter_cipher(trng):
    """A per-task substitution cipher on short words (ICL only)."""
    alphabet = list("abcdefgh")
    shuffled = alphabet[:]
    trng.shuffle(shuffled)
    table = str.maketrans("".join(alphabet), "".join(shuffled))

    def make(r):
        w = "".join(r.choice(alphabet) for _ in range(3))
        return w, w.translate(table)

    return "generation", make, None


def colors_present(trng):
    palette = ["red", "green", "blue"]

    def make(r):
        present = sorted(r.sample(palette, r.randint(1, 2)))
        words = present + r.sample(TOPICS["animal"], 2)
        r.shuffle(words)
        return " ".join(words), ", ".join(present)

    return "multilabel", make, None


def world_capitals(trng):
    """Real-world facts a pretrained model knows: the forgetting benchmark of the quickstart."""
    items = list(CAPITALS.items())

    def make(r):
        country, capital = r.choice(items)
        return f"What is the capital of {country}?", capital

    return "qa", make, None


GENERATORS: dict[str, Generator] = {
    g.__name__: g
    for g in (
        sym_sentiment, sym_topic, vowel_start, digit_parity, greater_than_nli, box_membership_nli, key_lookup,
        made_up_capitals, addition, affine_map, dedup_summary, arithmetic_choice, reverse_words, letter_cipher,
        colors_present, world_capitals,
    )
}


# world_capitals: 35 countries are asked, the other 15 serve as demonstrations (a query never answers itself)
TEST_SIZE = {"world_capitals": 35}


def make_task(name: str, seed: int = 0, n_train: int = 400, n_test: int = 100) -> Task:
    """A synthetic task; the same (name, seed) always gives the same examples, distinct inputs, train and test
    disjoint."""
    if name not in GENERATORS:
        raise ManyICLError(f"synthetic task {name!r} does not exist; available: {', '.join(GENERATORS)}")
    family, make, labels = GENERATORS[name](random.Random(f"{name}:{seed}:task"))
    n_test = TEST_SIZE.get(name, n_test)
    rng = random.Random(f"{name}:{seed}:examples")
    test, seen = [], set()
    for _ in range(n_test * 20):
        if len(test) == n_test:
            break
        x, y = make(rng)
        if x not in seen:
            seen.add(x)
            test.append(Example(x, y, source=f"synthetic:{name}:test"))
    train = []
    for _ in range(n_train * 20):
        if len(train) == n_train:
            break
        x, y = make(rng)
        if x not in seen or name == "made_up_capitals":
            # a lookup task by design: its queries are answerable only when they appear among the demonstrations
            train.append(Example(x, y, source=f"synthetic:{name}:train"))
            seen.add(x)
    return Task(name, family, train, test, labels=labels, source=f"synthetic:{name}")
