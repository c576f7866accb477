"""`loraloop inspect`'s pure half: the token / id / label table of a rendered example, a coloured
terminal view of it (like axolotl's --debug) and the JSON form. Knows nothing about the CLI, the
database or settings: the caller passes the tokenizer, the item and the RenderConfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from training.render import IGNORE_INDEX, Example, RenderConfig, RenderError, render_example

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


@dataclass(frozen=True)
class TokenRow:
    index: int
    token_id: int
    piece: str  # the token's text, as decoded on its own
    label: int  # the token id when trained, -100 when masked

    @property
    def trained(self) -> bool:
        return self.label != IGNORE_INDEX


def token_table(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[TokenRow]:
    """One row per token of `example`."""
    pieces = [tokenizer.decode([token_id], clean_up_tokenization_spaces=False) for token_id in example.input_ids]
    return [TokenRow(index, token_id, piece, label)
            for index, (token_id, piece, label) in enumerate(zip(example.input_ids, pieces, example.labels))]


def inspect_item(tokenizer: PreTrainedTokenizerBase, item: Mapping[str, Any],
                 config: RenderConfig | None = None) -> dict[str, list[int]]:
    """`{"input_ids": [...], "labels": [...]}` for a feedback item (labels -100 where masked).

    Raises RenderError when the item cannot be rendered or has no supervised token.
    """
    example = render_example(tokenizer, item, config)
    if example is None:
        raise RenderError("continuation", "empty or whitespace-only target: the item has no supervised token")
    return {"input_ids": list(example.input_ids), "labels": list(example.labels)}


def render_table(console: Console, tokenizer: PreTrainedTokenizerBase, example: Example) -> None:
    """Print the example as coloured text (trained tokens green) followed by the token table."""
    rows = token_table(tokenizer, example)
    inline = Text()
    for row in rows:
        inline.append(row.piece, style=TRAINED_STYLE if row.trained else MASKED_STYLE)
    console.print(inline)
    table = Table(title="training example", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("label", justify="right")
    for row in rows:
        style = TRAINED_STYLE if row.trained else MASKED_STYLE
        table.add_row(str(row.index), Text(repr(row.piece)[1:-1], style=style), str(row.token_id),
                      str(row.label) if row.trained else "masked", style=style)
    console.print(table)
    console.print(f"{len(rows)} tokens, {example.num_target_tokens} trained, "
                  f"{example.context_tokens_dropped} context tokens dropped by truncation"
                  + (", history rewritten by the chat template" if example.history_rewritten else ""))
