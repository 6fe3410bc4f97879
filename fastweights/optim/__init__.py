"""Optimisers for slow and fast weights."""
