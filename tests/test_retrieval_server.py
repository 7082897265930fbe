"""chromadb server mode: a real `chroma run` started by the test, reached through `HttpClient`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from geochat.cli import main
from geochat.errors import GeoChatError
from geochat.retrieval import IndexStore, Retriever, StoreLocation, index_docs
from geochat.retrieval.text import TextEmbedder
from tests.processes import stop
from tests.test_retrieval import write_docs

CHROMA = Path(sys.executable).parent / "chroma"
STARTUP_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder()


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreLocation]:
    exe = CHROMA if CHROMA.exists() else shutil.which("chroma")
    if exe is None:
        pytest.skip("the `chroma` command is not installed")
    port = _free_port()
    log = (tmp_path_factory.mktemp("chroma-log") / "server.log").open("w")
    proc = subprocess.Popen([str(exe), "run", "--path", str(tmp_path_factory.mktemp("chroma-data")),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    location = StoreLocation(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # wait for the heartbeat
            try:
                IndexStore.open(location)
                break
            except GeoChatError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        yield location
    finally:
        stop(proc, timeout=10)
        log.close()


def test_index_and_search_through_a_chroma_server(
    chroma_server: StoreLocation, tmp_path: Path, embedder: TextEmbedder, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = write_docs(tmp_path / "docs")
    store = IndexStore.open(chroma_server)
    first = index_docs(store, docs, embedder=embedder, progress=False)
    assert first.total_records == 6
    assert index_docs(store, docs, embedder=embedder, progress=False).chunks_embedded == 0  # incremental there too
    top = Retriever(store, text_embedder=embedder).search("grainy radar texture", k=1)[0]
    assert (top.source, top.heading) == ("docs/sar.md", "Speckle")

    host, port = chroma_server.host, str(chroma_server.port)
    assert main(["search", "Sentinel-2 revisit", "--chroma-host", str(host), "--chroma-port", port, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passages"][0]["heading"] == "Revisit time"


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "x", "--chroma-host", "127.0.0.1", "--chroma-port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geochat: error: cannot reach the chroma server") and err.count("\n") == 1
