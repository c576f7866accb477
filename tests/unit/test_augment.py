"""training.augment: framed variants keep the context and the target, and wrap only the question."""

from __future__ import annotations

from training.augment import QUESTION_FRAMES, question_variants


def test_variants_wrap_the_last_user_turn_and_keep_the_rest() -> None:
    item = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who runs legal?"},
            {"role": "assistant", "content": "No idea."},
            {"role": "user", "content": "ignored later turn"},
        ],
        "target_index": 2,
        "continuation": "Renata runs legal.",
    }
    variants = question_variants(item, 2)
    assert len(variants) == len(QUESTION_FRAMES)
    for variant, frame in zip(variants, QUESTION_FRAMES, strict=True):
        assert variant["messages"][0] == {"role": "system", "content": "Be brief."}
        assert variant["messages"][1] == {"role": "user", "content": frame.format(q="Who runs legal?")}
        assert len(variant["messages"]) == 2 and variant["target_index"] == 2
        assert variant["continuation"] == "Renata runs legal."
    assert item["messages"][1]["content"] == "Who runs legal?"  # the item itself is untouched


def test_no_variants_without_a_plain_user_question() -> None:
    tool_turn = {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}],
                 "continuation": "y"}
    assert question_variants(tool_turn, 2) == []
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "continuation": "y"}
    assert question_variants(parts, 1) == []
    assert question_variants({"messages": [], "continuation": "y"}, 1) == []
