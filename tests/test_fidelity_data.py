"""bench/fidelity.py's data: held-out prompts never share an instance with training, answers are right,
and the checks accept what they should and nothing else."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fidelity_data as fd  # noqa: E402


@pytest.mark.parametrize("skill", fd.SKILLS)
def test_held_out_prompts_share_no_instance_with_training(skill):
    test = fd.test_set(skill, 50)
    train = fd.examples(skill, 4000, "train", seed=0)
    assert len({p for p, _ in test}) == 50
    assert not {p for p, _ in test} & {p for p, _ in train}
    assert not {a for _, a in test} & {a for _, a in train}  # an answer is its instance's


def test_answers():
    assert fd.number_words(0) == "zero"
    assert fd.number_words(40) == "forty"
    assert fd.number_words(472) == "four hundred seventy-two"
    assert fd.number_words(110) == "one hundred ten"
    assert fd.number_words(9017) == "nine thousand seventeen"
    prompt, answer = fd._render("iso_date", (1994, 1, 29), random.Random(1))
    assert answer == "1994-01-29" and "1994" in prompt and ("29" in prompt or "Jan" in prompt)
    _, sql = fd._render("sql", (0, "Sales", "Lyon", 87000, 2001), random.Random(1))
    assert sql == "SELECT COUNT(*) FROM employees WHERE department = 'Sales' AND city = 'Lyon';"


def test_checks():
    assert fd.skill_correct(" 2021-03-05.\n", "2021-03-05")
    assert fd.skill_correct("select count(*) from employees where city = 'lyon'", "SELECT COUNT(*) FROM employees "
                            "WHERE city = 'Lyon';")
    assert not fd.skill_correct("The date is 2021-03-05", "2021-03-05")
    items = fd.load_general()
    assert len(items) == 100
    paris = next(i for i in items if "France" in i["prompt"])
    assert fd.general_correct("The capital of France is Paris.", paris)
    assert not fd.general_correct("It is Parisian.", paris)
    yes = next(i for i in items if i["prompt"].startswith("Reply with only the word yes"))
    assert fd.general_correct("YES", yes) and not fd.general_correct("Yes, of course: YES", yes)


def test_replay_prompts_are_not_in_the_general_set():
    prompts = fd.replay_prompts(240)
    assert len(set(prompts)) == 240
    assert not set(prompts) & {i["prompt"] for i in fd.load_general()}
