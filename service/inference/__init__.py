"""The OpenAI gateway: `routes` (a thin router), `proxy` (alias resolution, forwarding to a
replica, streaming, answer assembly)."""
