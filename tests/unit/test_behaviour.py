"""training.behaviour: how answers are judged in a version's behaviour report."""

from __future__ import annotations

from training.behaviour import answer_reproduces, carries_content, first_sentence


def test_reproduces_ignores_case_and_punctuation_and_allows_more_after() -> None:
    taught = "The office dog is a beagle named Biscuit."
    assert answer_reproduces("the office dog is a beagle named Biscuit", taught)
    assert answer_reproduces("The office dog is a beagle named Biscuit. He loves walks.", taught)
    assert not answer_reproduces("The office dog is a poodle named Max.", taught)
    assert not answer_reproduces("", taught)


def test_rephrased_answer_must_carry_the_new_content() -> None:
    taught = "The office dog is a beagle named Biscuit."
    question = "What do we call the dog that lives in our office?"
    assert carries_content("Our office dog, a beagle, is called Biscuit.", taught, question)
    assert not carries_content("The dog that lives in our office is named Max.", taught, question)


def test_first_sentence() -> None:
    assert first_sentence("The capital is Paris. It is big.") == "The capital is Paris."
    assert first_sentence("Paris\nis the capital") == "Paris"
    assert first_sentence("version 4.17.2 shipped") == "version 4.17.2 shipped"
