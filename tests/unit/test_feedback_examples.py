"""training.feedback_examples.conversations_not_taught: a conversation the feedback corrects is no drift probe."""

from __future__ import annotations

from training.feedback_examples import conversations_not_taught

QUESTION = [{"role": "user", "content": "Where is the DR site?"}]


def test_the_corrected_conversation_is_left_out_and_others_stay() -> None:
    corrected = [*QUESTION, {"role": "assistant", "content": "In a private facility."}]
    other = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    items = [(1, {"messages": QUESTION, "continuation": "In Trondheim."})]
    assert conversations_not_taught([corrected, other], items) == [other]


def test_an_item_replacing_an_assistant_turn_matches_its_prompt() -> None:
    corrected = [*QUESTION, {"role": "assistant", "content": "Somewhere."}]
    items = [(1, {"messages": corrected, "target_index": 1, "continuation": "In Trondheim."})]
    assert conversations_not_taught([corrected], items) == []
    longer = [{"role": "system", "content": "Be brief."}, *corrected]
    assert conversations_not_taught([longer], items) == [longer]
