"""The HTTP API against a real uvicorn server on a loopback port (tiny model, generated GeoTIFFs).

The OpenAI Python client talks to `/v1/chat/completions` (plain, streamed, multi-turn, 8 at once);
malformed requests must come back as 4xx with a JSON message; the bearer token is enforced.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from openai import AuthenticationError, BadRequestError, OpenAI
from PIL import Image

from geochat import GeoChat, Turn
from geochat.imagery import load_image
from geochat.prompting import build_user_message, prompt_facts
from geochat.serving import ServingSettings, create_app
from geochat.serving.limits import QueueFullError, RequestQueue
from tests.tiny import tiny_config

TOKEN = "test-token-123"
MAX_NEW_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_url(path_or_bytes: Path | bytes, mime: str = "image/tiff") -> str:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(seed: int, w: int = 40, h: int = 30) -> bytes:
    rgb = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def user(text: str, image: str | None = None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def gc(tiny_llm_dir: Path) -> GeoChat:
    return GeoChat.from_config(tiny_config(tiny_llm_dir), max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def settings(geotiffs: dict[str, Path]) -> ServingSettings:
    fixtures_dir = geotiffs["rect_600x300_utm.tif"].parent
    return ServingSettings(
        max_upload_bytes=400_000,          # rect_600x300_utm.tif (540 kB) is "too big"
        max_image_pixels=50_000_000,       # sparse_20000.tif (400 Mpx) is "too big"
        max_prompt_chars=2_000,
        max_concurrent_requests=2,         # 8 concurrent requests must queue, not fail
        queue_timeout_s=30,                # a leaked slot would show as 503s, not a hang
        api_token=TOKEN,
        allowed_image_dirs=(fixtures_dir,),
    )


@pytest.fixture(scope="module")
def server(gc: GeoChat, settings: ServingSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app = create_app(gc, settings, download_dir=tmp_path_factory.mktemp("downloads"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server: str) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def post(server: str, path: str, body: Any, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kwargs)
    return httpx.post(server + path, json=body, headers=headers, timeout=60, **kwargs)


# -- health and auth ----------------------------------------------------------------------------

def test_health_is_open_and_names_the_model(server: str, gc: GeoChat) -> None:
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == gc.model_info.name


def test_bearer_token_is_enforced(server: str, client: OpenAI, geotiffs: dict[str, Path]) -> None:
    body = {"messages": [user("what is this?")]}
    for token in (None, "wrong"):
        r = post(server, "/v1/chat/completions", body, token=token)
        assert r.status_code == 401, r.text
        assert "token" in r.json()["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [client.models.list().data[0].id]


def test_the_token_also_guards_the_page_and_gradios_own_endpoints(server: str) -> None:
    # Gradio's event endpoints run the model too (gradio_client calls them): with a token they need a login
    for path in ("/config", "/gradio_api/info"):
        assert httpx.get(server + path).status_code == 401, path
    assert httpx.post(f"{server}/gradio_api/queue/join", json={}).status_code == 401
    assert "token" in httpx.get(server + "/").text  # the login page says what to type
    with httpx.Client(base_url=server) as browser:
        assert browser.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert browser.get("/config").status_code == 401
        assert browser.post("/login", data={"username": "anyone", "password": TOKEN}).status_code == 200
        assert browser.get("/config").status_code == 200
        assert browser.get("/gradio_api/info").status_code == 200
    from gradio_client import Client

    with pytest.raises(ValueError, match="Could not login"):
        Client(server, auth=("me", "wrong"), verbose=False)
    assert Client(server, auth=("me", TOKEN), verbose=False).view_api(print_info=False, return_format="dict")


def test_without_a_token_the_page_is_open(gc: GeoChat, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(gc, ServingSettings(), download_dir=tmp_path)) as open_app:
        assert open_app.get("/config").status_code == 200


# -- chat completions ---------------------------------------------------------------------------

def test_openai_client_non_stream_matches_engine(client: OpenAI, gc: GeoChat, geotiffs: dict[str, Path]) -> None:
    path = geotiffs["landsat8_int16_utm18.tif"]
    expected = gc.chat(load_image(path.read_bytes()), "what is in this image?")
    resp = client.chat.completions.create(
        model="geochat", messages=[user("what is in this image?", data_url(path))],  # type: ignore[list-item]
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected.answer
    extra = resp.model_extra or {}
    assert extra["geochat"]["answer"] == expected.answer
    assert extra["geochat"]["facts"]["crs"] == "EPSG:32618"
    assert set(extra["geochat"]) >= {"boxes", "geojson", "sources", "reasoning", "facts", "timings", "model"}


def test_openai_client_stream_matches_non_stream(client: OpenAI, geotiffs: dict[str, Path]) -> None:
    messages = [user("describe the fields", data_url(geotiffs["s2_13band_uint16_utm33.tif"]))]
    full = client.chat.completions.create(model="geochat", messages=messages, extra_body={"bands": [4, 3, 2]})  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(
        model="geochat", messages=messages, stream=True, extra_body={"bands": [4, 3, 2]},  # type: ignore[arg-type]
    ))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"  # the tiny model
    text = "".join(c.choices[0].delta.content or "" for c in chunks)                        # runs to max_tokens
    assert text == full.choices[0].message.content
    last = chunks[-1].model_extra or {}
    assert last["geochat"]["answer"] == text
    assert last["geochat"]["facts"]["rgb_bands"] == [4, 3, 2]


def test_stream_is_sse_ending_with_done(server: str, geotiffs: dict[str, Path]) -> None:
    body = {"stream": True, "messages": [user("what is this?", data_url(geotiffs["nongeo.png"], "image/png"))]}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_multi_turn_uses_earlier_messages_as_history(client: OpenAI, gc: GeoChat, geotiffs: dict[str, Path]) -> None:
    path = geotiffs["rgb_uint8_3857.tif"]
    first = client.chat.completions.create(model="geochat", messages=[user("what is this?", data_url(path))])  # type: ignore[list-item]
    a1 = first.choices[0].message.content or ""
    second = client.chat.completions.create(model="geochat", messages=[  # type: ignore[list-item]
        user("what is this?", data_url(path)), {"role": "assistant", "content": a1}, user("and the roads?"),
    ])
    loaded = load_image(path.read_bytes())  # as the server reads a data URL
    history = [Turn(build_user_message("what is this?", facts=prompt_facts(loaded.facts)), a1)]
    assert history[0].user == gc.chat(loaded, "what is this?").as_turn().user  # the prompt turn 1 really had
    assert second.choices[0].message.content == gc.chat(loaded, "and the roads?", history=history).answer


def test_eight_concurrent_requests_are_answered_separately(
    client: OpenAI, gc: GeoChat, geotiffs: dict[str, Path]
) -> None:
    images = [("image/png", png_bytes(1)), ("image/png", png_bytes(2, 64, 20)),
              ("image/tiff", geotiffs["landsat8_int16_utm18.tif"].read_bytes()),
              ("image/tiff", geotiffs["gray_float32_nan_4326.tif"].read_bytes())]
    questions = ["what is in this image?", "is there water?"]
    cases = [(mime, data, q) for mime, data in images for q in questions]
    expected = [gc.chat(load_image(data), q).answer for _, data, q in cases]  # sequential reference

    def ask(case: tuple[str, bytes, str]) -> str:
        mime, data, q = case
        resp = client.chat.completions.create(model="geochat", messages=[user(q, data_url(data, mime))])  # type: ignore[list-item]
        return resp.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(ask, cases))
    assert got == expected
    assert len(set(expected)) > 1, "the inputs should give different answers, else the test proves little"


# -- bad inputs ---------------------------------------------------------------------------------

# A GDAL VRT that reads /etc/passwd as pixels: GDAL opens it whatever the upload is called.
VRT = b"""<VRTDataset rasterXSize="40" rasterYSize="1">
  <VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">
    <SourceFilename relativetoVRT="0">/etc/passwd</SourceFilename>
    <ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>40</LineOffset>
  </VRTRasterBand>
</VRTDataset>"""


def test_a_vrt_is_refused_as_an_upload_and_under_a_tif_name(tmp_path: Path) -> None:
    from geochat.serving.images import UnsupportedImageFormatError, open_image
    from geochat.serving.limits import ServingSettings

    settings = ServingSettings(allowed_image_dirs=(tmp_path,))
    disguised = tmp_path / "scene.tif"  # what a browser upload of a renamed VRT becomes
    disguised.write_bytes(VRT)
    for source in (VRT, disguised):
        with pytest.raises(UnsupportedImageFormatError, match="VRT"):
            open_image(source, settings)

@pytest.mark.parametrize(("name", "status", "words"), [
    ("no messages", 400, "messages"),
    ("empty messages", 400, "messages"),
    ("not json", 400, "JSON"),
    ("bad data url", 400, "base64"),
    ("not base64 encoded", 400, "base64"),
    ("remote url", 400, "remote"),
    ("outside allowed dirs", 403, "outside"),
    ("missing allowed file", 400, "not found"),
    ("nul in path", 400, "cannot be a file name"),
    ("path too long", 400, "cannot be a file name"),
    ("deep json", 400, "too deeply"),
    ("corrupt image", 422, "corrupt.tif"),
    ("text as image", 422, "not a readable raster"),
    ("vrt upload", 422, "VRT"),
    ("oversize upload", 413, "max_upload_bytes"),
    ("too many pixels", 413, "max_image_pixels"),
    ("prompt too long", 413, "max_prompt_chars"),
    ("too many labels", 413, "labels"),
    ("labels too long", 413, "max_prompt_chars"),
    ("ends with assistant", 400, "end with a user message"),
    ("two images", 400, "one image"),
    ("identify without region", 400, "region"),
    ("refer without image", 400, "needs an image"),
    ("bad task", 400, "task"),
    ("lone surrogate", 400, "not valid Unicode"),
    ("lone surrogate label", 400, "not valid Unicode"),
    ("blank label", 400, "label 1 is empty"),
    ("number of 4,301 digits", 400, "JSON"),
    ("truncated png", 422, "truncated"),
    ("tokens past the context", 413, "context window"),
    ("bad content part", 400, "type"),
])
def test_bad_requests_get_4xx_with_a_message(
    server: str, geotiffs: dict[str, Path], name: str, status: int, words: str
) -> None:
    png = data_url(png_bytes(0), "image/png")
    bodies: dict[str, Any] = {
        "no messages": {"model": "x"},
        "empty messages": {"messages": []},
        "not json": b"{not json",
        "bad data url": {"messages": [user("hi", "data:image/png;base64,@@not-base64@@")]},
        "not base64 encoded": {"messages": [user("hi", "data:image/png,rawbytes")]},
        "remote url": {"messages": [user("hi", "https://example.com/a.png")]},
        "outside allowed dirs": {"messages": [user("hi", "/etc/passwd")]},
        "missing allowed file": {"messages": [user("hi", "no_such_file.tif")]},
        "nul in path": {"messages": [user("hi", "a\x00b.tif")]},
        "path too long": {"messages": [user("hi", "x" * 300 + ".tif")]},
        "deep json": b"[" * 100_000 + b"]" * 100_000,
        "corrupt image": {"messages": [user("hi", "corrupt.tif")]},
        "text as image": {"messages": [user("hi", data_url(geotiffs["text_as.tif"]))]},
        "vrt upload": {"messages": [user("hi", "data:image/tiff;base64," + base64.b64encode(VRT).decode())]},
        "oversize upload": {"messages": [user("hi", data_url(geotiffs["rect_600x300_utm.tif"]))]},
        "too many pixels": {"messages": [user("hi", "sparse_20000.tif")]},
        "prompt too long": {"messages": [user("x" * 3000, png)]},
        "too many labels": {"messages": [user("which?", png)], "task": "classify",
                            "labels": [f"class{i}" for i in range(500)]},
        "labels too long": {"messages": [user("which?", png)], "task": "classify", "labels": ["a" * 3000, "b"]},
        "ends with assistant": {"messages": [user("hi", png), {"role": "assistant", "content": "hello"}]},
        "two images": {"messages": [user("hi", png), {"role": "assistant", "content": "a"},
                                    user("and this?", data_url(png_bytes(5), "image/png"))]},
        "identify without region": {"messages": [user("what is it", png)], "task": "identify"},
        "refer without image": {"messages": [user("the airport")], "task": "refer"},
        "bad task": {"messages": [user("hi", png)], "task": "dance"},
        # JSON's \ud800 escape is a lone surrogate: valid JSON, not text a tokenizer can read
        "lone surrogate": b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
        "lone surrogate label": json.dumps({"messages": [user("which?", png)], "task": "classify",
                                            "labels": ["a@", "b"]}).replace("a@", "a\\udfff"),
        "blank label": {"messages": [user("which?", png)], "task": "classify", "labels": ["  ", "forest"]},
        "number of 4,301 digits": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + b"9" * 4301
                                  + b"}",
        "truncated png": {"messages": [user("hi", data_url(png_bytes(0)[: len(png_bytes(0)) // 2], "image/png"))]},
        # 1,500 characters (under max_prompt_chars) but 4 bytes, so 4 tokens, each: past the tiny LLM's 1,024
        "tokens past the context": {"messages": [user("\U0001f6f0" * 1500, png)]},
        "bad content part": {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
    }
    r = post(server, "/v1/chat/completions", bodies[name])
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words.lower() in message.lower()
    assert "Traceback" not in message


def test_the_same_file_under_two_names_is_one_image(server: str, geotiffs: dict[str, Path]) -> None:
    path = geotiffs["rgb_uint8_3857.tif"]
    body = {"messages": [user("hi", path.name), {"role": "assistant", "content": "a scene"},
                         user("and its roads?", str(path.resolve()))], "max_tokens": 2}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text


def test_a_wrong_method_gets_405_in_the_error_shape(server: str) -> None:
    for method, path, allowed in (("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/ground", "POST"),
                                  ("POST", "/v1/models", "GET")):
        r = httpx.request(method, server + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["allow"] == allowed and allowed in r.json()["error"]["message"]


def test_oversize_body_is_refused_before_reading(server: str, settings: ServingSettings) -> None:
    r = post(server, "/v1/chat/completions", b"x" * (settings.max_body_bytes + 10))
    assert r.status_code == 413
    assert "bytes" in r.json()["error"]["message"]


def test_openai_client_raises_on_bad_request(client: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="base64"):
        client.chat.completions.create(model="geochat", messages=[user("hi", "data:image/png;base64,%%%")])  # type: ignore[list-item]


# -- grounding ----------------------------------------------------------------------------------

def test_ground_returns_a_feature_collection(server: str, geotiffs: dict[str, Path]) -> None:
    r = post(server, "/v1/ground", {"image": "landsat8_int16_utm18.tif", "phrase": "the river"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "FeatureCollection"
    assert isinstance(body["features"], list)
    for feature in body["features"]:  # the tiny model rarely emits boxes; the mapping is tested by hand below
        assert feature["geometry"]["type"] == "Polygon"
    assert body["geochat"]["georeferenced"] is True
    assert isinstance(body["geochat"]["boxes"], list)


def test_ground_rejects_missing_phrase(server: str) -> None:
    r = post(server, "/v1/ground", {"image": "landsat8_int16_utm18.tif"})
    assert r.status_code == 400
    assert "phrase" in r.json()["error"]["message"]


# -- the queue ----------------------------------------------------------------------------------

def test_queue_waits_then_refuses_when_full() -> None:
    async def scenario() -> None:
        queue = RequestQueue(limit=1, max_waiting=1, timeout_s=0.2)
        first = await queue.acquire()
        waiter = asyncio.create_task(queue.acquire())   # waits in line
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="max_queued_requests"):
            await queue.acquire()                       # the line is full
        first.release()
        first.release()                                 # idempotent
        second = await waiter                           # the waiter got the slot
        with pytest.raises(QueueFullError, match="queue_timeout_s"):
            await queue.acquire()                       # times out behind `second`
        second.release()
        assert queue.running == 0 and queue.waiting == 0

    asyncio.run(scenario())


def test_line_wrapped_base64_is_accepted() -> None:
    from geochat.serving.images import decode_data_url
    from geochat.serving.limits import ServingSettings

    raw = png_bytes(3)
    wrapped = base64.encodebytes(raw).decode()  # 76-character lines, as `base64` prints without -w0
    assert "\n" in wrapped
    assert decode_data_url("data:image/png;base64," + wrapped, ServingSettings()) == raw


def test_a_body_that_trickles_in_gets_408(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import geochat.serving.api as api

    monkeypatch.setattr(api, "BODY_READ_TIMEOUT_S", 0.5)
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": ".encode())
        reply = sock.recv(4096).decode()  # the rest never comes
    assert reply.startswith("HTTP/1.1 408") and "longer than 0.5 s" in reply


def test_a_client_that_leaves_mid_body_is_no_server_error(server: str, caplog: pytest.LogCaptureFixture) -> None:
    host, port = server.removeprefix("http://").split(":")
    with caplog.at_level("ERROR"):
        for _ in range(3):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"messages\": [".encode())
        time.sleep(1.0)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    assert httpx.get(server + "/health", timeout=30).status_code == 200
