"""A real MLflow tracking server (SQLite store, artifacts proxied) for the whole session, on a free port."""

import pytest

from vgim_dist.tracking.server import start_server, wait_ready

from helpers import free_port


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The server's URL; its store, artifacts and log are under a session temp folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{(port := free_port())}"
    with open(root / "server.log", "w") as log:
        proc = start_server(f"sqlite:///{root}/mlflow.db", port, str(root / "artifacts"), log)
    try:
        wait_ready(proc, url, timeout=300)   # a loaded machine takes minutes
    except RuntimeError as e:
        proc.kill()
        pytest.fail(f"{e}\n{(root / 'server.log').read_text()[-3000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
