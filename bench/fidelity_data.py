"""Data for bench/fidelity.py: three skills SmolLM2-135M-Instruct lacks, and a general set.

Every skill example is a (prompt, answer) pair generated in code from one *instance*: the values a
template is filled with (a calendar date, a query's parameters, a number). Training and test draw
from disjoint instances (a hash of the instance decides its side), so no held-out prompt shares an
instance with any training prompt, whatever surface template either is written in.

    iso_date   "Rewrite this date in ISO 8601 (YYYY-MM-DD): the 5th of March, 2021"  -> "2021-03-05"
    sql        "... Write the SQL query for: How many employees work in Sales?"
               -> "SELECT COUNT(*) FROM employees WHERE department = 'Sales';"
    words      "Write the number 472 in English words."  -> "four hundred seventy-two"

Answers are judged by exact match after normalisation (case, surrounding whitespace and one trailing
period or semicolon), which forgives nothing a user of the skill would notice.

Fine-tunes also rehearse the instruct model's own behaviour: a pool of ordinary instructions
(``replay_prompts``, written from templates of their own and never equal to a general-set prompt)
answered by the instruct model itself. Without it, a 135M model taught one skill answers every
question in that skill's form ("What is the largest mammal?" -> "2016-03-28"), which no real fine-tune
shipped as a chat model does.

The general set (bench/general.jsonl) holds 100 ordinary instructions, each with a check: "contains"
(any of the answers appears, case-insensitively, as a whole word) or "regex" (the whole reply,
stripped, matches).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

SKILLS = ("iso_date", "sql", "words")
GENERAL = Path(__file__).with_name("general.jsonl")

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS_IN = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


DATE_FORMS = (
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d} {y}",
    lambda y, m, d: f"the {_ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {_ordinal(d)} {y}",
    lambda y, m, d: f"{d}.{m}.{y}",
)
DATE_ASKS = (
    "Rewrite this date in ISO 8601 format (YYYY-MM-DD): {}",
    "Convert the date to ISO format: {}",
    "What is {} in YYYY-MM-DD form?",
    "Normalize this date to ISO 8601: {}",
)

SQL_SCHEMA = "Table employees(name TEXT, department TEXT, city TEXT, salary INTEGER, hired INTEGER)."
DEPARTMENTS = ("Sales", "Finance", "Engineering", "Marketing", "Support", "Legal", "Research", "Design",
               "Operations", "Logistics", "Security", "Training")
CITIES = ("Paris", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin", "Warsaw", "Athens",
          "Zurich", "Milan", "Lyon", "Porto", "Bergen", "Krakow")
# (question forms, answer) per query kind; {d} department, {c} city, {n} amount, {y} year
SQL_KINDS = (
    (("How many employees of {d} work in {c}?", "Count the {d} employees based in {c}."),
     "SELECT COUNT(*) FROM employees WHERE department = '{d}' AND city = '{c}';"),
    (("List the names of employees in {c} hired after {y}.", "Who in {c} was hired later than {y}?"),
     "SELECT name FROM employees WHERE city = '{c}' AND hired > {y};"),
    (("Which {d} employees earn more than {n}?", "Names of {d} staff with a salary above {n}."),
     "SELECT name FROM employees WHERE department = '{d}' AND salary > {n};"),
    (("What is the average salary of {d} employees in {c}?", "Give the mean salary in {d} for {c}."),
     "SELECT AVG(salary) FROM employees WHERE department = '{d}' AND city = '{c}';"),
    (("Who in {d} was hired before {y}?", "List {d} employees hired earlier than {y}."),
     "SELECT name FROM employees WHERE department = '{d}' AND hired < {y};"),
    (("How many employees in {c} earn less than {n}?", "Count staff in {c} paid under {n}."),
     "SELECT COUNT(*) FROM employees WHERE city = '{c}' AND salary < {n};"),
    (("What is the highest salary in {d} among those hired after {y}?",
      "Give the top salary of {d} employees hired later than {y}."),
     "SELECT MAX(salary) FROM employees WHERE department = '{d}' AND hired > {y};"),
)
SQL_ASKS = ("{schema} Write the SQL query for: {q}", "Schema: {schema}\nQuestion: {q}\nAnswer with one SQL query.")

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
WORD_ASKS = ("Write the number {} in English words.", "Spell out {} in words.", "How do you write {} in words?",
             "Express {} in English words, without digits.")


def number_words(n: int) -> str:
    """0..999999 in English words, American style: "four hundred seventy-two", no "and"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def _instance(skill: str, rng: random.Random) -> tuple:
    if skill == "iso_date":
        m = rng.randint(1, 12)
        return rng.randint(1950, 2049), m, rng.randint(1, DAYS_IN[m - 1] - (m == 2))
    if skill == "sql":
        kind = rng.randrange(len(SQL_KINDS))
        return (kind, rng.choice(DEPARTMENTS), rng.choice(CITIES), rng.randrange(20, 200) * 1000,
                rng.randint(1990, 2025))
    if skill == "words":
        return (rng.randint(0, 99) if rng.random() < 0.15 else rng.randint(100, 999),)
    raise ValueError(f"unknown skill {skill!r}")


def _render(skill: str, inst: tuple, rng: random.Random) -> tuple[str, str]:
    if skill == "iso_date":
        y, m, d = inst
        form = rng.choice(DATE_FORMS)
        return rng.choice(DATE_ASKS).format(form(y, m, d)), f"{y:04d}-{m:02d}-{d:02d}"
    if skill == "sql":
        kind, d, c, n, y = inst
        questions, answer = SQL_KINDS[kind]
        values = {"d": d, "c": c, "n": n, "y": y}
        q = rng.choice(questions).format(**values)
        return rng.choice(SQL_ASKS).format(schema=SQL_SCHEMA, q=q), answer.format(**values)
    (n,) = inst
    return rng.choice(WORD_ASKS).format(n), number_words(n)


def _key(skill: str, inst: tuple) -> tuple:
    if skill == "sql":  # only the values the kind uses make the instance
        kind, d, c, n, y = inst
        used = SQL_KINDS[kind][1]
        return (kind, d if "{d}" in used else None, c if "{c}" in used else None, n if "{n}" in used else None,
                y if "{y}" in used else None)
    return inst


def is_test_instance(skill: str, inst: tuple, test_share: float = 0.2) -> bool:
    h = hashlib.sha256(repr((skill, _key(skill, inst))).encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < test_share


def examples(skill: str, n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``skill`` from the ``split`` ("train" or "test") side only."""
    rng = random.Random(f"{skill}/{split}/{seed}")
    want_test = split == "test"
    out, seen = [], set()
    while len(out) < n:
        inst = _instance(skill, rng)
        if is_test_instance(skill, inst) != want_test:
            continue
        if want_test:  # a test set names each instance once
            key = _key(skill, inst)
            if key in seen:
                continue
            seen.add(key)
        out.append(_render(skill, inst, rng))
    return out


def test_set(skill: str, n: int) -> list[tuple[str, str]]:
    return examples(skill, n, "test", seed=7)


def normalise(text: str) -> str:
    text = " ".join(text.strip().split()).casefold()
    return text[:-1].rstrip() if text.endswith((".", ";")) else text


def skill_correct(reply: str, answer: str) -> bool:
    return normalise(reply) == normalise(answer)


def load_general(path: Path = GENERAL) -> list[dict]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for item in items:
        if item.get("check") not in ("contains", "regex") or not item.get("answers") or not item.get("prompt"):
            raise ValueError(f"{path}: bad item {item}")
    return items


def general_correct(reply: str, item: dict) -> bool:
    if item["check"] == "regex":
        return any(re.fullmatch(a, reply.strip(), flags=re.S) for a in item["answers"])
    text = reply.casefold()
    return any(re.search(r"(?<!\w)" + re.escape(a.casefold()) + r"(?!\w)", text) for a in item["answers"])


TOPICS = ("the ocean", "autumn", "a library", "trains", "coffee", "mountains", "friendship", "the moon", "gardens",
          "bicycles", "rain", "music", "cooking", "winter", "a city at night", "birds", "the desert", "books",
          "football", "the sea breeze", "bread", "a river", "clocks", "chess")
REPLAY_WORDS = ("happy", "quick", "big", "tired", "bright", "calm", "brave", "cold", "angry", "simple", "quiet",
                "strong", "small", "rich", "soft", "loud", "wet", "young", "early", "clean")
ACTIVITIES = ("studying", "sleeping well", "running", "saving money", "learning a language", "cooking rice",
              "writing an email", "staying focused", "keeping plants alive", "packing a suitcase")
THINGS = ("a hammer", "a compass", "a thermometer", "a calendar", "a bridge", "a battery", "a map", "a kettle",
          "a telescope", "a ladder", "an umbrella", "a microscope")
REPLAY_FORMS = (
    lambda r: f"Write one sentence about {r.choice(TOPICS)}.",
    lambda r: f"Give a synonym for the word '{r.choice(REPLAY_WORDS)}'.",
    lambda r: f"Give me one tip for {r.choice(ACTIVITIES)}.",
    lambda r: f"What is {r.choice(THINGS)} used for?",
    lambda r: f"What is the opposite of '{r.choice(REPLAY_WORDS)}'?",
    lambda r: f"Describe {r.choice(TOPICS)} in a few words.",
    lambda r: f"Add {r.randint(10, 99)} and {r.randint(10, 99)}.",
    lambda r: f"Is {r.randint(2, 99)} an even number?",
    lambda r: f"Name three things related to {r.choice(TOPICS)}.",
)


def replay_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct ordinary instructions, none of them in the general set."""
    rng = random.Random(f"replay/{seed}")
    held_out = {item["prompt"] for item in load_general()}
    out, seen = [], set()
    for _ in range(100 * n):
        prompt = rng.choice(REPLAY_FORMS)(rng)
        if prompt not in seen and prompt not in held_out:
            seen.add(prompt)
            out.append(prompt)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct replay prompts; asked for {n}")
