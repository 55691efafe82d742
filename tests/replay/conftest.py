"""The replay tests get their own nats-server per module: they compare the whole event stream
and every bucket before and after a replay run, which other tests' traffic would disturb."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import NatsServer


@pytest.fixture(scope="module")
def isolated_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = NatsServer(tmp_path_factory.mktemp("nats-replay"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
