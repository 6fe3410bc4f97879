"""Evaluation: perplexity, loss by position, retrieval."""
