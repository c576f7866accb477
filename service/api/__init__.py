"""The HTTP surface: auth and scopes, request dependencies, the error mapping, schemas,
middleware (body limit, metrics), readiness probes and `routes/` (one module per resource).
Knows no training and no vLLM protocol."""
