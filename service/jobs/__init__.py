"""Background work on the job queue: the `worker`, the `train` and `distill` handlers, the nightly
`scheduler` and `retention`. Knows no HTTP."""
