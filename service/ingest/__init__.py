"""Feedback ingestion: checks of an item against the tokenizer and chat template (`intake`,
`message_checks`) and the group-commit writer that stores it (`writer`). Knows no HTTP."""
