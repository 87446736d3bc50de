"""Task data for the shipped adapter zoo: small, deterministic, offline generators.

Each :class:`Task` makes train / validation / test splits of short ``Example(prompt, answer)``
pairs. A prompt is a user message (the model sees it through its chat template); an answer is a
few tokens to one line (two for ``python_function``), so training and evaluation stay fast.

Splits never overlap: an example goes to a split by a stable hash of its *split key* (the prompt,
or the country for ``capital``), so the same prompt can never appear in two splits, whatever the
seed or size. Each task uses at least four instruction phrasings, so an adapter learns the task
rather than one template.

``capital``: every country is in exactly one split (test countries are unseen in training). The
list holds well-known countries whose capitals a small instruct model plausibly knows, so the
adapter mostly learns the answer format ("just the city") on top of the base model's knowledge;
its test score is bounded by that knowledge.

Held-out tasks (``held_out=True``) have no adapter of their own; each names the in-library tasks
it is related to (``related``), to measure how routing and merging transfer to unseen tasks.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One prompt (a user message) and its reference answer."""

    prompt: str
    answer: str


def _bucket(key: str) -> Split:
    """Assign a split key to a split by a stable hash: 70% train, 15% validation, 15% test."""
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else "validation" if h < 85 else "test"


def _first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _norm(text: str, *, lower: bool = True) -> str:
    """First line, inner whitespace collapsed, a trailing period dropped, lowercased if asked."""
    line = re.sub(r"\s+", " ", _first_line(text)).rstrip(".").strip()
    return line.lower() if lower else line


def exact_match(prediction: str, answer: str) -> float:
    """Case-insensitive exact match of the first line."""
    return float(_norm(prediction) == _norm(answer))


def exact_match_cased(prediction: str, answer: str) -> float:
    """Case-sensitive exact match of the first line."""
    return float(_norm(prediction, lower=False) == _norm(answer, lower=False))


def list_match(prediction: str, answer: str) -> float:
    """Exact match of comma-separated lists, ignoring spaces around commas."""

    def items(text: str) -> list[str]:
        return [t.strip() for t in _norm(text).split(",")]

    return float(items(prediction) == items(answer))


def json_match(prediction: str, answer: str) -> float:
    """Equality of the parsed JSON objects (the first ``{...}`` of the prediction)."""
    match = re.search(r"\{.*?\}", prediction, flags=re.DOTALL)
    if match is None:
        return 0.0
    try:
        return float(json.loads(match.group(0)) == json.loads(answer))
    except json.JSONDecodeError:
        return 0.0


def code_match(prediction: str, answer: str) -> float:
    """Exact match of the first ``len(answer lines)`` lines, ignoring trailing spaces and fences."""
    want = [line.rstrip() for line in answer.strip().splitlines()]
    got = [line.rstrip() for line in prediction.strip().splitlines() if not line.startswith("```")]
    return float(got[: len(want)] == want)


Generator = Callable[[random.Random], Example]
Scorer = Callable[[str, str], float]


@dataclass(frozen=True)
class Task:
    """A task: a name, a description, an example generator and a scorer."""

    name: str
    description: str
    generate: Generator  # draws one example from the task's whole space
    score: Scorer  # (prediction, answer) -> score in [0, 1]
    held_out: bool = False  # True: no adapter of its own, used to test transfer
    related: tuple[str, ...] = ()  # for held-out tasks: the in-library tasks it resembles
    split_key: Callable[[Example], str] = field(default=lambda ex: ex.prompt)

    def make_split(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """Return ``n`` distinct examples of ``split``, deterministic for a given ``seed``.

        Raises:
            ValueError: ``split`` is unknown, or the task's space holds fewer than ``n`` examples
                for that split.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        seen: set[str] = set()
        out: list[Example] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise ValueError(
                    f"task {self.name!r}: only {len(out)} distinct {split} examples, asked {n}"
                )
            ex = self.generate(rng)
            if ex.prompt in seen or _bucket(self.split_key(ex)) != split:
                continue
            seen.add(ex.prompt)
            out.append(ex)
        return out


def assert_disjoint(task: Task, sizes: dict[Split, int], seed: int = 0) -> None:
    """Generate the splits of ``task`` and check that no prompt appears in two of them."""
    prompts = {s: {ex.prompt for ex in task.make_split(s, n, seed)} for s, n in sizes.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = prompts[a] & prompts[b]
            assert not shared, f"{task.name}: {a} and {b} share {sorted(shared)[:3]}"


# --------------------------------------------------------------------------- word lists

WORDS = (
    "apple river stone cloud garden window silver orange forest candle bridge yellow ocean "
    "pencil market rabbit winter summer mountain coffee little quiet bright morning evening "
    "doctor letter purple guitar island camera pocket shadow thunder violet basket dragon "
    "engine farmer golden harbor jacket kitten ladder meadow needle paper planet rocket "
    "saddle tiger tunnel valley wagon bottle button circle desert finger hammer honey "
    "lemon mirror nest onion parrot pillow puzzle ribbon salad spoon street sugar table "
    "tomato train velvet water whale zebra blue green happy simple strong gentle"
).split()

NAMES = (
    "Ann Ben Carla David Emma Felix Greta Hugo Ines Jonas Kara Leo Maya Nils Olga Paul "
    "Rosa Sam Tina Umar Vera Will Yara Zoe Omar Lena Ivan Mila"
).split()

CITIES = (
    "Oslo Paris Berlin Madrid Rome Vienna Lisbon Dublin Prague Warsaw Athens Zurich Boston "
    "Denver Austin Seattle Toronto Chicago Sydney Tokyo Cairo Lima Quito Nairobi"
).split()

MONTHS = (
    "January February March April May June July August September October November December"
).split()

# fmt: off
COUNTRIES = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "United Kingdom": "London", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Hungary": "Budapest", "Czech Republic": "Prague",
    "Netherlands": "Amsterdam", "Belgium": "Brussels", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "South Africa": "Pretoria", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "South Korea": "Seoul",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Pakistan": "Islamabad", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Israel": "Jerusalem", "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Bangladesh": "Dhaka",
    "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "United States": "Washington, D.C.", "Mexico": "Mexico City", "Cuba": "Havana",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
    "Switzerland": "Bern", "Iceland": "Reykjavik", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Lebanon": "Beirut", "Syria": "Damascus",
    "Jordan": "Amman", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Qatar": "Doha",
}
# fmt: on


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _phrase(rng: random.Random, templates: tuple[str, ...], **values: object) -> str:
    return rng.choice(templates).format(**values)


# --------------------------------------------------------------------------- generators


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        expr, value = f"{a} + {b}", a + b
    else:
        a, b = max(a, b), min(a, b)
        expr, value = f"{a} - {b}", a - b
    templates = (
        "What is {e}?",
        "Compute {e}.",
        "Calculate {e}. Reply with the number only.",
        "{e} = ?",
        "Solve: {e}",
    )
    return Example(_phrase(rng, templates, e=expr), str(value))


_UNITS = (  # (from, to, factor, max value)
    ("kilometers", "meters", 1000, 99),
    ("kilograms", "grams", 1000, 99),
    ("meters", "centimeters", 100, 99),
    ("liters", "milliliters", 1000, 99),
    ("hours", "minutes", 60, 12),
    ("minutes", "seconds", 60, 12),
    ("days", "hours", 24, 10),
)
_UNITS_HELD_OUT = (
    ("tonnes", "kilograms", 1000, 99),
    ("centimeters", "millimeters", 10, 99),
    ("weeks", "days", 7, 12),
    ("kilobytes", "bytes", 1000, 99),
)
_UNIT_TEMPLATES = (
    "Convert {v} {a} to {b}.",
    "How many {b} are in {v} {a}?",
    "{v} {a} is how many {b}?",
    "Express {v} {a} in {b}.",
    "Unit conversion: {v} {a} = ? {b}",
)


def _unit_conversion(units: tuple[tuple[str, str, int, int], ...]) -> Generator:
    def gen(rng: random.Random) -> Example:
        a, b, factor, hi = rng.choice(units)
        v = rng.randint(1, hi)
        return Example(_phrase(rng, _UNIT_TEMPLATES, v=v, a=a, b=b), str(v * factor))

    return gen


def _date_format(rng: random.Random) -> Example:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    text = f"{MONTHS[m - 1]} {d}, {y}"
    templates = (
        "Rewrite the date {t} in ISO format.",
        "Convert {t} to YYYY-MM-DD.",
        "Format this date as YYYY-MM-DD: {t}",
        "What is {t} in ISO 8601 format?",
        "ISO date for {t}?",
    )
    return Example(_phrase(rng, templates, t=text), f"{y:04d}-{m:02d}-{d:02d}")


def _sort_numbers(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), rng.randint(4, 6))
    templates = (
        "Sort these numbers in ascending order: {x}",
        "Sort from smallest to largest: {x}",
        "Put these numbers in increasing order: {x}",
        "Order ascending: {x}",
        "Arrange from lowest to highest: {x}",
    )
    return Example(
        _phrase(rng, templates, x=", ".join(map(str, nums))), ", ".join(map(str, sorted(nums)))
    )


def _sort_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(4, 5))
    templates = (
        "Sort these words alphabetically: {x}",
        "Put these words in alphabetical order: {x}",
        "Order alphabetically: {x}",
        "Arrange from A to Z: {x}",
    )
    return Example(_phrase(rng, templates, x=", ".join(words)), ", ".join(sorted(words)))


def _reverse_words(rng: random.Random) -> Example:
    text = _words(rng, 3, 5)
    templates = (
        "Reverse the order of the words: {t}",
        "Write these words in reverse order: {t}",
        "Reverse the word order: {t}",
        "Say these words backwards, last word first: {t}",
    )
    return Example(_phrase(rng, templates, t=text), " ".join(reversed(text.split())))


def _capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(COUNTRIES))
    templates = (
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Capital of {c}?",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "{c}'s capital is which city?",
    )
    return Example(_phrase(rng, templates, c=country), COUNTRIES[country])


def _json_extract(rng: random.Random) -> Example:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice(
        (
            f"Name: {name}, Age: {age}, City: {city}",
            f"{name} is {age} years old and lives in {city}.",
            f"City: {city}; Name: {name}; Age: {age}",
        )
    )
    templates = (
        "Extract name, age and city as JSON: {t}",
        "Convert to JSON with keys name, age, city: {t}",
        "Give a JSON object (name, age, city) for: {t}",
        "JSON for this person: {t}",
    )
    answer = json.dumps({"name": name, "age": age, "city": city})
    return Example(_phrase(rng, templates, t=text), answer)


def _sql(rng: random.Random) -> Example:
    n, city = rng.randint(1, 99), rng.choice(CITIES)
    question, query = rng.choice(
        (
            (f"How many users are older than {n}?", f"SELECT COUNT(*) FROM users WHERE age > {n};"),
            (
                f"How many users are younger than {n}?",
                f"SELECT COUNT(*) FROM users WHERE age < {n};",
            ),
            (
                f"List the names of users who live in {city}.",
                f"SELECT name FROM users WHERE city = '{city}';",
            ),
            (
                f"What is the average age of users in {city}?",
                f"SELECT AVG(age) FROM users WHERE city = '{city}';",
            ),
            (
                f"How many orders cost more than {n} dollars?",
                f"SELECT COUNT(*) FROM orders WHERE price > {n};",
            ),
            (
                f"How many users are exactly {n} years old?",
                f"SELECT COUNT(*) FROM users WHERE age = {n};",
            ),
            (
                f"List the names of users older than {n}.",
                f"SELECT name FROM users WHERE age > {n};",
            ),
        )
    )
    templates = (
        "Write an SQL query: {q}",
        "Translate to SQL: {q}",
        "{q} Answer with one SQL query.",
        "SQL for this question: {q}",
    )
    return Example(_phrase(rng, templates, q=question), query)


_POSITIVE = ("great", "wonderful", "excellent", "fantastic", "lovely", "superb", "delightful")
_NEGATIVE = ("terrible", "awful", "poor", "disappointing", "horrible", "broken", "useless")
_PRODUCTS = ("phone", "movie", "hotel", "book", "pizza", "laptop", "concert", "chair", "game")


def _sentiment(rng: random.Random) -> Example:
    label = rng.choice(("positive", "negative"))
    adj = rng.choice(_POSITIVE if label == "positive" else _NEGATIVE)
    closer = rng.choice(
        (
            "I would buy it again." if label == "positive" else "Never again.",
            "Five stars." if label == "positive" else "One star.",
            "Highly recommended." if label == "positive" else "Do not recommend.",
            "",
        )
    )
    review = f"The {rng.choice(_PRODUCTS)} was {adj}. {closer}".strip()
    templates = (
        "Is this review positive or negative? {r}",
        "Sentiment (positive/negative): {r}",
        "Classify the sentiment of this review as positive or negative: {r}",
        "Review: {r} Is the sentiment positive or negative?",
    )
    return Example(_phrase(rng, templates, r=review), label)


def _python_function(rng: random.Random) -> Example:
    var, k = rng.choice(("x", "y", "n", "a", "num", "value")), rng.randint(2, 30)
    what, name, body = rng.choice(
        (
            (f"the square of {var}", "square", f"{var} * {var}"),
            (f"the cube of {var}", "cube", f"{var} * {var} * {var}"),
            (f"{var} plus {k}", f"add_{k}", f"{var} + {k}"),
            (f"{var} minus {k}", f"subtract_{k}", f"{var} - {k}"),
            (f"{var} times {k}", f"multiply_by_{k}", f"{var} * {k}"),
            (f"the negative of {var}", "negate", f"-{var}"),
            (f"whether {var} is even", "is_even", f"{var} % 2 == 0"),
        )
    )
    templates = (
        "Write a Python function that returns {w}.",
        "Python function returning {w}:",
        "Define a Python function that computes {w}.",
        "Give me Python code for a function returning {w}.",
    )
    return Example(_phrase(rng, templates, w=what), f"def {name}({var}):\n    return {body}")


def _uppercase(rng: random.Random) -> Example:
    text = _words(rng, 2, 4)
    templates = (
        "Convert to uppercase: {t}",
        "Write this in capital letters: {t}",
        "Uppercase this text: {t}",
        "Make every letter uppercase: {t}",
    )
    return Example(_phrase(rng, templates, t=text), text.upper())


def _lowercase(rng: random.Random) -> Example:
    text = _words(rng, 2, 4).upper()
    templates = (
        "Convert to lowercase: {t}",
        "Write this in small letters: {t}",
        "Lowercase this text: {t}",
        "Make every letter lowercase: {t}",
    )
    return Example(_phrase(rng, templates, t=text), text.lower())


# --------------------------------------------------------------------------- registry

_TASKS = (
    Task(
        "arithmetic",
        "Add or subtract two 2-3 digit integers; answer the number.",
        _arithmetic,
        exact_match,
    ),
    Task(
        "unit_conversion",
        "Convert km/kg/L/m/hours/minutes/days to smaller units; answer the number.",
        _unit_conversion(_UNITS),
        exact_match,
    ),
    Task(
        "date_format",
        "Rewrite 'March 5, 2021' style dates as ISO 'YYYY-MM-DD'.",
        _date_format,
        exact_match,
    ),
    Task(
        "sort_numbers",
        "Sort 4-6 integers ascending; answer a comma-separated list.",
        _sort_numbers,
        list_match,
    ),
    Task("reverse_words", "Reverse the order of 3-5 words.", _reverse_words, exact_match),
    Task(
        "capital",
        "Name the capital city of a well-known country (countries disjoint across splits).",
        _capital,
        exact_match,
        split_key=lambda ex: ex.answer,
    ),
    Task(
        "json_extract",
        "Extract name, age and city from a short text as a JSON object.",
        _json_extract,
        json_match,
    ),
    Task(
        "sql",
        "Translate a templated question about users/orders tables into one SQL query.",
        _sql,
        exact_match,
    ),
    Task(
        "sentiment",
        "Label a short templated product review 'positive' or 'negative'.",
        _sentiment,
        exact_match,
    ),
    Task(
        "python_function",
        "Write a two-line Python function for a simple arithmetic expression.",
        _python_function,
        code_match,
    ),
    Task("uppercase", "Rewrite 2-4 words in upper case.", _uppercase, exact_match_cased),
    # Held-out: no adapter of their own.
    Task(
        "sort_words",
        "HELD-OUT. Sort 4-5 words alphabetically (related: sort_numbers).",
        _sort_words,
        list_match,
        held_out=True,
        related=("sort_numbers",),
    ),
    Task(
        "unit_conversion_extra",
        "HELD-OUT. Convert tonnes, cm, weeks, kilobytes to smaller units "
        "(related: unit_conversion).",
        _unit_conversion(_UNITS_HELD_OUT),
        exact_match,
        held_out=True,
        related=("unit_conversion",),
    ),
    Task(
        "lowercase",
        "HELD-OUT. Rewrite 2-4 upper-case words in lower case (related: uppercase).",
        _lowercase,
        exact_match_cased,
        held_out=True,
        related=("uppercase",),
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASKS}
LIBRARY_TASKS: tuple[str, ...] = tuple(t.name for t in _TASKS if not t.held_out)
HELD_OUT_TASKS: tuple[str, ...] = tuple(t.name for t in _TASKS if t.held_out)
