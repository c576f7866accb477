"""The adapter lifecycle: the `registry` (publish, gate outcome, promote, roll back, preview),
the `reconciler` that keeps every vLLM replica serving it, and the `archive` download."""
