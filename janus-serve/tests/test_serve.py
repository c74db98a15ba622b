"""`janus serve` through the official `openai` client, on the tiny Hugging Face-layout checkpoint.

Answers equal the library's (`janus_rs`) for the same input, images equal `janus generate`'s files
byte for byte, concurrent requests equal their serial results, and every error class returns its
status and OpenAI's error object. The server binary comes from `JANUS_BIN`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import openai
import PIL.Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "hf-tiny"
BIN = os.environ.get("JANUS_BIN")

pytestmark = pytest.mark.skipif(not BIN, reason="JANUS_BIN (the janus binary) is not set")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `janus serve` process on a free loopback port."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model", str(MODEL), "--port", str(self.port), "--quiet", *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("the server did not become ready")
            time.sleep(0.05)

    def request(
        self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def post(self, path: str, body: Any, headers: Optional[dict] = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, raw = self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(raw) if raw else None

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def library():
    janus_rs = pytest.importorskip("janus_rs")
    return janus_rs.Janus.load(MODEL)


def picture(k: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (40 + 9 * k, 30), (20 * k % 256, 120, 255 - 30 * k % 256)).transform(
        (40 + 9 * k, 30), PIL.Image.Transform.AFFINE, (1, 0.3, 0, 0.2, 1, 0)
    )


def data_url(img: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: PIL.Image.Image) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_health_and_models(server: Server) -> None:
    assert server.get("/health") == (200, b'{"status":"ok"}')
    models = server.client().models.list()
    assert [m.id for m in models.data] == [str(MODEL)]


def test_chat_equals_the_library(server: Server, library) -> None:
    client = server.client()
    img = picture(1)
    for options, lib_options in [
        ({"max_tokens": 12}, {"max_new_tokens": 12}),
        (
            {"max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7},
            {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7},
        ),
    ]:
        r = client.chat.completions.create(
            model="anything", messages=[user("What is shown here?", img)], **options
        )
        want = library.understand([img], "What is shown here?", **lib_options)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == want.prompt_tokens
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.choices[0].finish_reason in ("stop", "length")
        pieces, usage, finish = [], None, None
        for chunk in client.chat.completions.create(
            model="anything",
            messages=[user("What is shown here?", img)],
            stream=True,
            stream_options={"include_usage": True},
            **options,
        ):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(pieces) == want.text, "the streamed pieces add up to the answer"
        assert usage.prompt_tokens == want.prompt_tokens
        assert finish == r.choices[0].finish_reason


def test_multi_turn_with_a_system_message(server: Server, library) -> None:
    a, b = picture(2), picture(3)
    messages = [
        {"role": "system", "content": "Answer in one word."},
        user("Describe this.", a),
        {"role": "assistant", "content": "A square."},
        user("And this one?", b),
    ]
    r = server.client().chat.completions.create(model="m", messages=messages, max_tokens=8)
    want = library.chat(
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Describe this.", "images": [a]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "And this one?", "images": [b]},
        ],
        max_new_tokens=8,
    )
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens


def test_a_stop_string_cuts_the_answer(server: Server) -> None:
    client = server.client()
    full = client.chat.completions.create(
        model="m", messages=[user("Hello")], max_tokens=16, temperature=1, seed=3
    ).choices[0].message.content
    assert len(full) > 6
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.chat.completions.create(
        model="m", messages=[user("Hello")], max_tokens=16, temperature=1, seed=3, stop=[stop]
    )
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_images_equal_janus_generate(server: Server, tmp_path: pathlib.Path) -> None:
    client = server.client()
    for extra in [{"seed": 5, "temperature": 0}, {"seed": 9}, {"seed": 2, "cfg_weight": 3.0, "top_k": 8}]:
        r = client.images.generate(
            prompt="a red fox in the snow", n=2, response_format="b64_json", extra_body=extra
        )
        assert len(r.data) == 2
        out = tmp_path / f"fox{extra['seed']}.png"
        args = [BIN, "generate", "--model", str(MODEL), "--prompt", "a red fox in the snow"]
        args += ["--count", "2", "--out", str(out), "--quiet"]
        for k, v in extra.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        subprocess.run(args, check=True)
        for i, d in enumerate(r.data):
            png = base64.b64decode(d.b64_json)
            assert png == (tmp_path / f"fox{extra['seed']}_{i}.png").read_bytes(), f"{extra} image {i}"


def test_concurrent_requests_equal_their_serial_results(server: Server) -> None:
    client = server.client()

    def chat(k: int) -> str:
        return client.chat.completions.create(
            model="m",
            messages=[user(f"Question number {k}?", *([picture(k)] if k % 2 else []))],
            max_tokens=6 + k,
            temperature=1.0 if k % 3 else 0.0,
            seed=k,
        ).choices[0].message.content

    def images(k: int) -> list[str]:
        r = client.images.generate(
            prompt=f"picture {k}", n=1 + k % 2, response_format="b64_json", extra_body={"seed": k}
        )
        return [d.b64_json for d in r.data]

    jobs = [(chat, k) for k in range(10)] + [(images, k) for k in range(6)]
    serial = [f(k) for f, k in jobs]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda job: job[0](job[1]), jobs))
    assert together == serial
    metrics = server.get("/metrics")[1].decode()
    batches = [l for l in metrics.splitlines() if l.startswith("janus_batch_sequences_bucket")]
    assert batches and 'le="1"' in batches[0]
    ones = int(batches[0].split()[-1])
    total = int(next(l for l in metrics.splitlines() if l.startswith("janus_batch_sequences_count")).split()[-1])
    assert total > ones, "some steps ran several sequences"


def error_of(status_and_body: tuple[int, Any]) -> tuple[int, str]:
    status, body = status_and_body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert err["message"]
    return status, err["type"]


def test_bad_requests_are_openai_errors(server: Server) -> None:
    bad = "invalid_request_error"
    chat = "/v1/chat/completions"
    hello = [{"role": "user", "content": "Hi"}]
    assert error_of(server.post(chat, b"{not json")) == (400, bad)
    assert error_of(server.post(chat, {"messages": hello, "max_tokens": "5"})) == (400, bad)
    assert error_of(server.post(chat, {"messages": "Hi"})) == (400, bad)
    assert error_of(server.post(chat, {"messages": hello, "n": 2})) == (400, bad)
    assert error_of(server.post(chat, {"messages": hello, "max_tokens": 2040})) == (400, bad), "past the context"
    many = [user("Too many.", *[picture(0)] * 9)]
    assert error_of(server.post(chat, {"messages": many})) == (400, bad)
    for url in ["data:image/png;base64,###", "data:image/png;base64,aGVsbG8=", "https://example.com/x.png", "/etc/passwd"]:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        assert error_of(server.post(chat, body)) == (400, bad), url
    images = "/v1/images/generations"
    assert error_of(server.post(images, {"prompt": "x", "size": "1024x1024"})) == (400, bad)
    assert error_of(server.post(images, {"prompt": "x", "response_format": "url"})) == (400, bad)
    assert error_of(server.post(images, {"n": 1})) == (400, bad)
    assert error_of(server.post("/v1/nothing", {})) == (404, "not_found_error")
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="m", messages=hello, n=3)


def test_limits_keys_and_queue() -> None:
    s = Server("--api-key", "sekrit", "--max-body-mb", "1", "--max-batch", "1", "--max-queue", "1")
    try:
        hello = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert error_of(s.post("/v1/chat/completions", hello)) == (401, "authentication_error")
        assert error_of(s.post("/v1/chat/completions", hello, {"Authorization": "Bearer nope"}))[0] == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sekrit").chat.completions.create(model="m", messages=hello["messages"], max_tokens=2)
        assert s.get("/health")[0] == 200, "the health check needs no key"
        key = {"Authorization": "Bearer sekrit"}
        big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
        assert error_of(s.post("/v1/chat/completions", big, key)) == (413, "invalid_request_error")
        # One request runs (the batch holds one), one waits (the queue holds one): the next is 429.
        long = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1900}
        results: list[tuple[int, Any]] = []
        threads = [threading.Thread(target=lambda: results.append(s.post("/v1/chat/completions", long, key)))]
        # (The long answer takes about a second here: the sleeps leave it well within that.)
        threads[0].start()
        time.sleep(0.2)
        threads.append(threading.Thread(target=lambda: results.append(s.post("/v1/chat/completions", long, key))))
        threads[1].start()
        time.sleep(0.2)
        third = s.post("/v1/chat/completions", hello, key)
        for t in threads:
            t.join()
        assert error_of(third) == (429, "rate_limit_error")
        assert sorted(r[0] for r in results) == [200, 200]
    finally:
        assert s.stop() == 0


def test_a_client_that_leaves_is_cancelled_and_sigterm_exits_cleanly() -> None:
    s = Server()
    try:
        body = json.dumps(
            {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1900, "stream": True}
        ).encode()
        req = urllib.request.Request(
            s.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.readline().startswith(b"data: ")
        deadline = time.monotonic() + 20
        while "janus_active_sequences 0" not in s.get("/metrics")[1].decode():
            assert time.monotonic() < deadline, "the cancelled request left the batch"
            time.sleep(0.1)
        # A request in flight when SIGTERM comes ends with an error event; the server exits 0.
        req = urllib.request.Request(
            s.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            r.readline()
            s.proc.send_signal(signal.SIGTERM)
            rest = r.read().decode()
        assert "shutting down" in rest and rest.rstrip().endswith("data: [DONE]")
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
