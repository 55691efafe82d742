"""Shared by bench/ and tests/: the nixboot stack as processes."""
