"""Issue 10: how much two LLM engines gain from sharing one GPU under MPS (docs/mps-gain.md)."""
