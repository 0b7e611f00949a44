"""Proposers of train.py changes: anthropic (LLM), command (any CLI), search (offline)."""
