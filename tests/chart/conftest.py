"""Fixtures of the chart tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from tests.chart.fake_kubernetes import NAMESPACE, FakeKubernetes


@pytest.fixture(scope="module")
def fake_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubernetes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = tmp_path_factory.mktemp("kube") / "config"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}
                ],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "namespace": NAMESPACE}}],
                "current-context": "fake",
                "users": [],
            }
        )
    )
    config.chmod(0o600)
    yield config
    server.shutdown()
    server.server_close()
