"""The observe tests get their own nats-server per module (the shared one in tests/conftest.py is
left alone): they purge the event stream and the boots bucket between tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import NatsServer


@pytest.fixture(scope="module")
def isolated_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = NatsServer(tmp_path_factory.mktemp("nats-observe"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
