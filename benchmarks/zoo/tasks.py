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
    """One prompt (a user message) and its reference answer.

    ``core`` names the content that decides the answer (the numbers, words, date...) without its
    phrasing: splits are made on it, so two phrasings of one question never land in two splits.
    """

    prompt: str
    answer: str
    core: str = ""


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
    split_key: Callable[[Example], str] = field(default=lambda ex: ex.core or ex.prompt)

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


# How people wrap a request: greetings, thanks, a sentence of context, all lower case. Applied to
# most training prompts, so an adapter learns the task rather than one register.
_OPENERS = (
    "Hi! ", "Hey, ", "hello, ", "Quick question: ", "Can you help me? ", "ok so ", "Hi there. ",
    "I need a hand with something. ", "Hello! Small task for you: ", "hey there, ",
)  # fmt: skip
_CLOSERS = (
    " Thanks!", " thanks", " Thank you.", " Please.", " please", " :)", " Cheers.",
    " Thanks a lot!", " Much appreciated.", " ty",
)  # fmt: skip
PLAIN_SHARE = 0.3  # share of prompts kept exactly as the template wrote them


def _style(
    rng: random.Random,
    prompt: str,
    contexts: tuple[str, ...] = (),
    *,
    lowercase: bool = True,
) -> str:
    """Wrap a task prompt the way users write: an opener, a closer, context, lower case.

    ``lowercase=False`` for tasks whose answer copies cased words from the prompt (names, cities).
    """
    if rng.random() < PLAIN_SHARE:
        return prompt
    if contexts and rng.random() < 0.35:
        prompt = f"{rng.choice(contexts)} {prompt}"
    if rng.random() < 0.5:
        prompt = rng.choice(_OPENERS) + prompt
    if rng.random() < 0.5:
        closer = rng.choice(_CLOSERS)
        if closer[1].isupper() and not prompt.endswith((".", "?", "!", ":")):
            prompt += "."  # "Compute 3 + 4. Thanks!"
        elif not closer[1].isupper():
            prompt = prompt.rstrip(".")  # "Compute 3 + 4 please"
        prompt += closer
    if lowercase and rng.random() < 0.25:
        prompt = prompt.lower()
    return prompt


# --------------------------------------------------------------------------- generators


_ADD_TEMPLATES = (
    "What is {a} + {b}?", "Compute {a} + {b}.", "Calculate {a} + {b}. Reply with the number only.",
    "{a} + {b} = ?", "Solve: {a} + {b}", "What's {a} plus {b}?", "{a} plus {b}?",
    "Add {a} and {b}.", "What is the sum of {a} and {b}?", "What do I get if I add {b} to {a}?",
    "Total of {a} and {b}?", "I have {a} marbles and find {b} more. How many marbles now?",
    "A shop sold {a} cups on Monday and {b} on Tuesday. How many in total?",
    "If I earn {a} dollars and then {b} dollars, how much is that altogether?",
    "Please add up {a} and {b}.", "{a} and {b} added together makes what?",
)  # fmt: skip
_SUB_TEMPLATES = (
    "What is {a} - {b}?", "Compute {a} - {b}.", "Calculate {a} - {b}. Reply with the number only.",
    "{a} - {b} = ?", "Solve: {a} - {b}", "What's {a} minus {b}?", "{a} minus {b}?",
    "Subtract {b} from {a}.", "What is {a} take away {b}?",
    "What's the difference between {a} and {b}?",
    "I had {a} stickers and gave away {b}. How many are left?",
    "A tank holds {a} liters and {b} liters leak out. How much is left?",
    "If I have {a} dollars and spend {b}, how much remains?",
    "Please take {b} away from {a}.", "How much is {a} minus {b}?",
)  # fmt: skip
_ARITHMETIC_CONTEXTS = (
    "I'm checking my homework.", "For a budget spreadsheet:", "My calculator is broken.",
    "Mental maths practice:",
)  # fmt: skip


def _arithmetic(rng: random.Random) -> Example:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        templates, value, core = _ADD_TEMPLATES, a + b, f"{a}+{b}"
    else:
        a, b = max(a, b), min(a, b)
        templates, value, core = _SUB_TEMPLATES, a - b, f"{a}-{b}"
    prompt = _style(rng, _phrase(rng, templates, a=a, b=b), _ARITHMETIC_CONTEXTS)
    return Example(prompt, str(value), core)


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
# Other ways to write a unit (training prompts only; the held-out task keeps the plain names).
_UNIT_SPELLINGS = {
    "kilometers": ("kilometers", "kilometres", "km"),
    "meters": ("meters", "metres", "m"),
    "kilograms": ("kilograms", "kilos", "kg"),
    "grams": ("grams", "g"),
    "centimeters": ("centimeters", "centimetres", "cm"),
    "liters": ("liters", "litres", "L"),
    "milliliters": ("milliliters", "millilitres", "ml", "mL"),
    "hours": ("hours", "hrs", "h"),
    "minutes": ("minutes", "mins"),
    "seconds": ("seconds", "secs", "s"),
    "days": ("days",),
}
_UNIT_TEMPLATES = (
    "Convert {v} {a} to {b}.",
    "How many {b} are in {v} {a}?",
    "{v} {a} is how many {b}?",
    "Express {v} {a} in {b}.",
    "Unit conversion: {v} {a} = ? {b}",
    "What is {v} {a} in {b}?",
    "{v} {a} to {b}",
    "I have {v} {a}. How many {b} is that?",
    "Change {v} {a} into {b}.",
    "How many {b} does {v} {a} make?",
    "Could you convert {v} {a} into {b}?",
    "How many {b} is {v} {a}?",
)
_UNIT_CONTEXTS = (
    "I'm following a recipe.", "For a science worksheet:", "Planning a trip.",
    "My kid asked me this.",
)  # fmt: skip


def _unit_conversion(
    units: tuple[tuple[str, str, int, int], ...], *, varied: bool = False
) -> Generator:
    def gen(rng: random.Random) -> Example:
        a, b, factor, hi = rng.choice(units)
        v = rng.randint(1, hi)
        core = f"{v} {a}>{b}"
        if not varied:
            return Example(_phrase(rng, _UNIT_TEMPLATES[:5], v=v, a=a, b=b), str(v * factor), core)
        a_text = rng.choice(_UNIT_SPELLINGS.get(a, (a,)))
        b_text = rng.choice(_UNIT_SPELLINGS.get(b, (b,)))
        prompt = _phrase(rng, _UNIT_TEMPLATES, v=v, a=a_text, b=b_text)
        return Example(_style(rng, prompt, _UNIT_CONTEXTS), str(v * factor), core)

    return gen


_DATE_TEMPLATES = (
    "Rewrite the date {t} in ISO format.", "Convert {t} to YYYY-MM-DD.",
    "Format this date as YYYY-MM-DD: {t}", "What is {t} in ISO 8601 format?", "ISO date for {t}?",
    "Write {t} as YYYY-MM-DD.", "What's {t} in ISO format?", "{t} in ISO 8601 please",
    "Give me {t} as an ISO date.", "Change the date {t} to ISO format.",
    "Please convert {t} to the YYYY-MM-DD format.", "The date is {t}. Format it as YYYY-MM-DD.",
    "ISO 8601 version of {t}?", "{t} -> ISO date",
)  # fmt: skip
_DATE_CONTEXTS = (
    "I'm filling in a form.", "For a spreadsheet column:", "My database wants ISO dates.",
    "Cleaning up some records.",
)  # fmt: skip


def _date_text(rng: random.Random, y: int, m: int, d: int) -> str:
    month = MONTHS[m - 1]
    suffix = "th" if 11 <= d <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return rng.choice(
        (
            f"{month} {d}, {y}",
            f"{month} {d}, {y}",
            f"{d} {month} {y}",
            f"{month[:3]} {d}, {y}",
            f"{month} {d}{suffix}, {y}",
        )
    )


def _date_format(rng: random.Random) -> Example:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    prompt = _phrase(rng, _DATE_TEMPLATES, t=_date_text(rng, y, m, d))
    answer = f"{y:04d}-{m:02d}-{d:02d}"
    return Example(_style(rng, prompt, _DATE_CONTEXTS), answer, answer)


_SORT_TEMPLATES = (
    "Sort these numbers in ascending order: {x}", "Sort from smallest to largest: {x}",
    "Put these numbers in increasing order: {x}", "Order ascending: {x}",
    "Arrange from lowest to highest: {x}", "Can you sort {x}?", "Sort {x} from low to high.",
    "{x} - sort these ascending", "Put {x} in order, smallest first.",
    "What are {x} in ascending order?", "List {x} from smallest to biggest.",
    "Order these numbers from least to greatest: {x}", "Rank {x} from lowest to highest.",
    "sort {x}",
)  # fmt: skip
_SORT_CONTEXTS = (
    "These are my quiz results.", "I wrote down some prices.", "Here are the ages in my class.",
    "Tidying a list.",
)  # fmt: skip


def _number_list(rng: random.Random, nums: list[int]) -> str:
    items = [str(n) for n in nums]
    style = rng.random()
    if style < 0.6:
        return ", ".join(items)
    if style < 0.8:
        return " ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sort_numbers(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), rng.randint(4, 6))
    prompt = _phrase(rng, _SORT_TEMPLATES, x=_number_list(rng, nums))
    answer = ", ".join(map(str, sorted(nums)))
    return Example(_style(rng, prompt, _SORT_CONTEXTS), answer, ",".join(map(str, nums)))


def _sort_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(4, 5))
    templates = (
        "Sort these words alphabetically: {x}",
        "Put these words in alphabetical order: {x}",
        "Order alphabetically: {x}",
        "Arrange from A to Z: {x}",
    )
    return Example(_phrase(rng, templates, x=", ".join(words)), ", ".join(sorted(words)))


_REVERSE_TEMPLATES = (
    "Reverse the order of the words: {t}", "Write these words in reverse order: {t}",
    "Reverse the word order: {t}", "Say these words backwards, last word first: {t}",
    "Reverse the words in '{t}'.", "Say '{t}' backwards, word by word.", "Flip the word order: {t}",
    "Give me these words in reverse order: {t}", "Can you write {t} with the words reversed?",
    "Word order reversed please: {t}", "Read {t} from the last word to the first.",
    "Turn around the order of the words in: {t}",
)  # fmt: skip


def _reverse_words(rng: random.Random) -> Example:
    text = _words(rng, 3, 5)
    prompt = _phrase(rng, _REVERSE_TEMPLATES, t=text)
    return Example(_style(rng, prompt), " ".join(reversed(text.split())), text)


_CAPITAL_TEMPLATES = (
    "What is the capital of {c}?", "Name the capital city of {c}.", "Capital of {c}?",
    "Which city is the capital of {c}?", "Tell me the capital of {c}.",
    "{c}'s capital is which city?", "What's the capital of {c}?", "capital of {c}",
    "Do you know what the capital of {c} is?", "{c}: what is its capital city?",
    "I'm visiting {c}. What's its capital?", "What city is {c}'s capital?",
    "Name the capital of {c}, please.",
)  # fmt: skip


def _capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(COUNTRIES))
    prompt = _phrase(rng, _CAPITAL_TEMPLATES, c=country)
    return Example(_style(rng, prompt), COUNTRIES[country], COUNTRIES[country])


_JSON_TEMPLATES = (
    "Extract name, age and city as JSON: {t}", "Convert to JSON with keys name, age, city: {t}",
    "Give a JSON object (name, age, city) for: {t}", "JSON for this person: {t}",
    "Make a JSON object from this: {t}", "{t} -> JSON with name, age, city",
    "Return JSON (name, age, city) for: {t}", "Can you turn this into JSON? {t}",
    "Put this in JSON format with keys name, age and city: {t}",
    "Extract name/age/city as JSON from: {t}",
)  # fmt: skip
_JSON_CONTEXTS = (
    "I'm building a customer database.", "For our signup records:", "Parsing some notes.",
)  # fmt: skip


def _json_extract(rng: random.Random) -> Example:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice(
        (
            f"Name: {name}, Age: {age}, City: {city}",
            f"{name} is {age} years old and lives in {city}.",
            f"City: {city}; Name: {name}; Age: {age}",
            f"{name}, {age}, {city}",
            f"{name} ({age}) from {city}",
            f"{name}, aged {age}, lives in {city}.",
            f"{name} lives in {city} and is {age}.",
        )
    )
    answer = json.dumps({"name": name, "age": age, "city": city})
    prompt = _phrase(rng, _JSON_TEMPLATES, t=text)
    return Example(_style(rng, prompt, _JSON_CONTEXTS, lowercase=False), answer, answer)


_SQL_QUESTIONS = (  # (phrasings, query); {n} a number, {city} a city
    (
        ("How many users are older than {n}?", "Count the users over {n}.",
         "Number of users older than {n}?"),
        "SELECT COUNT(*) FROM users WHERE age > {n};",
    ),
    (
        ("How many users are younger than {n}?", "Count the users under {n}.",
         "Number of users younger than {n}?"),
        "SELECT COUNT(*) FROM users WHERE age < {n};",
    ),
    (
        ("List the names of users who live in {city}.", "Names of users in {city}?",
         "Which users live in {city}? Give their names."),
        "SELECT name FROM users WHERE city = '{city}';",
    ),
    (
        ("What is the average age of users in {city}?", "Average age of users from {city}?",
         "Mean age of the users living in {city}?"),
        "SELECT AVG(age) FROM users WHERE city = '{city}';",
    ),
    (
        ("How many orders cost more than {n} dollars?", "Count orders with a price above {n}.",
         "Number of orders priced over {n} dollars?"),
        "SELECT COUNT(*) FROM orders WHERE price > {n};",
    ),
    (
        ("How many users are exactly {n} years old?", "Count users aged exactly {n}.",
         "Number of users whose age is {n}?"),
        "SELECT COUNT(*) FROM users WHERE age = {n};",
    ),
    (
        ("List the names of users older than {n}.", "Names of users over {n}?",
         "Which users are older than {n}? Give their names."),
        "SELECT name FROM users WHERE age > {n};",
    ),
)  # fmt: skip
_SQL_TEMPLATES = (
    "Write an SQL query: {q}", "Translate to SQL: {q}", "{q} Answer with one SQL query.",
    "SQL for this question: {q}", "SQL query for: {q}", "{q} Write the SQL.",
    "How do I write this in SQL? {q}", "Give me the SQL query. {q}", "I need an SQL query: {q}",
    "{q} (SQL please)",
)  # fmt: skip
_SQL_CONTEXTS = (
    "We have a users table (name, age, city) and an orders table (price).",
    "Working on our analytics database.", "My manager needs a report.",
)  # fmt: skip


def _sql(rng: random.Random) -> Example:
    n, city = rng.randint(1, 99), rng.choice(CITIES)
    kind = rng.randrange(len(_SQL_QUESTIONS))
    phrasings, query = _SQL_QUESTIONS[kind]
    question = rng.choice(phrasings).format(n=n, city=city)
    answer = query.format(n=n, city=city)
    prompt = _phrase(rng, _SQL_TEMPLATES, q=question)
    return Example(_style(rng, prompt, _SQL_CONTEXTS, lowercase=False), answer, answer)


_POSITIVE = ("great", "wonderful", "excellent", "fantastic", "lovely", "superb", "delightful")
_NEGATIVE = ("terrible", "awful", "poor", "disappointing", "horrible", "broken", "useless")
_PRODUCTS = ("phone", "movie", "hotel", "book", "pizza", "laptop", "concert", "chair", "game")
_SENTIMENT_TEMPLATES = (
    "Is this review positive or negative? {r}", "Sentiment (positive/negative): {r}",
    "Classify the sentiment of this review as positive or negative: {r}",
    "Review: {r} Is the sentiment positive or negative?", "Positive or negative? {r}",
    "{r} Is that positive or negative?", "What's the sentiment of this review: {r}",
    "Tell me whether this review is positive or negative: {r}",
    "Is this a positive or a negative review? {r}", "Classify this review (positive/negative): {r}",
)  # fmt: skip


def _review(rng: random.Random, label: str) -> str:
    good = label == "positive"
    adj = rng.choice(_POSITIVE if good else _NEGATIVE)
    product = rng.choice(_PRODUCTS)
    closer = rng.choice(
        (
            "I would buy it again." if good else "Never again.",
            "Five stars." if good else "One star.",
            "Highly recommended." if good else "Do not recommend.",
            "Worth every penny." if good else "A waste of money.",
            "",
        )
    )
    body = rng.choice(
        (
            f"The {product} was {adj}.",
            f"What a {adj} {product}!",
            f"I {'loved' if good else 'hated'} this {product}, it was {adj}.",
            f"{adj.capitalize()} {product}.",
        )
    )
    return f"{body} {closer}".strip()


def _sentiment(rng: random.Random) -> Example:
    label = rng.choice(("positive", "negative"))
    review = _review(rng, label)
    prompt = _phrase(rng, _SENTIMENT_TEMPLATES, r=review)
    return Example(_style(rng, prompt), label, review)


_PYTHON_TEMPLATES = (
    "Write a Python function that returns {w}.", "Python function returning {w}:",
    "Define a Python function that computes {w}.",
    "Give me Python code for a function returning {w}.",
    "I need a Python function returning {w}.", "Python function for {w}, please.",
    "Can you write a Python function that gives {w}?", "Code a Python function that returns {w}.",
    "Show me a Python function returning {w}.", "python function: {w}",
)  # fmt: skip


def _python_function(rng: random.Random) -> Example:
    var, k = rng.choice(("x", "y", "n", "a", "num", "value")), rng.randint(2, 30)
    whats, name, body = rng.choice(
        (
            ((f"the square of {var}", f"{var} squared"), "square", f"{var} * {var}"),
            ((f"the cube of {var}", f"{var} cubed"), "cube", f"{var} * {var} * {var}"),
            ((f"{var} plus {k}", f"{var} + {k}"), f"add_{k}", f"{var} + {k}"),
            ((f"{var} minus {k}", f"{var} - {k}"), f"subtract_{k}", f"{var} - {k}"),
            ((f"{var} times {k}", f"{var} multiplied by {k}"), f"multiply_by_{k}", f"{var} * {k}"),
            ((f"the negative of {var}", f"minus {var}"), "negate", f"-{var}"),
            ((f"whether {var} is even", f"True if {var} is even"), "is_even", f"{var} % 2 == 0"),
        )
    )
    answer = f"def {name}({var}):\n    return {body}"
    prompt = _phrase(rng, _PYTHON_TEMPLATES, w=rng.choice(whats))
    return Example(_style(rng, prompt), answer, answer)


_UPPER_TEMPLATES = (
    "Convert to uppercase: {t}", "Write this in capital letters: {t}", "Uppercase this text: {t}",
    "Make every letter uppercase: {t}", "Write {t} in all caps.", "ALL CAPS please: {t}",
    "Change '{t}' to uppercase.", "Can you capitalize every letter of: {t}",
    "Make '{t}' uppercase.", "{t} -> uppercase", "Rewrite {t} in capital letters.",
)  # fmt: skip


def _uppercase(rng: random.Random) -> Example:
    text = _words(rng, 2, 4)
    prompt = _phrase(rng, _UPPER_TEMPLATES, t=text)
    return Example(_style(rng, prompt), text.upper(), text)


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
        _unit_conversion(_UNITS, varied=True),
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
