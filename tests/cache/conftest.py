"""Fixtures for the cache tests (defined in cache_helpers, a uniquely named module so several
areas' conftests never clash)."""

from tests.cache.cache_helpers import cache_server, nats_url, nix_keys, nixfx

__all__ = ["cache_server", "nats_url", "nix_keys", "nixfx"]
