"""The server through the official openai and anthropic clients, and raw HTTP
for what a client library would never send."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pytest
import uvicorn

from mlx_memosight import demo, load
from mlx_memosight.generation import generate
from mlx_memosight.scoring import eval_prompt, extract_boxed
from mlx_memosight.server import Server, create_app
from mlx_memosight.serving import AnswerSplitter, Job, conversation_ids, Message, merge

MAX = 400


def _question(i=0):
    return eval_prompt(demo.problems("heldout", 8)[i].eval_item())


class Served:
    def __init__(self, model, tokenizer, **kw):
        self.server = Server("demo_model", model, tokenizer, "demo", **kw)
        self.log = []
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        config = uvicorn.Config(create_app(self.server, log=self.log.append), host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_keep_alive=2)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def openai(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def anthropic(self, **kw):
        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def post(self, path, body, headers=None, method="POST"):
        """Raw HTTP: ``(status, parsed JSON body)``."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=10)
        self.server.worker.stop()


@pytest.fixture(scope="module")
def demo_model():
    return load(demo.demo_model_path())


@pytest.fixture(scope="module")
def served(demo_model):
    s = Served(*demo_model)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(demo_model):
    """What generate writes for the first questions (its printed text)."""
    model, tok = demo_model
    return {i: generate(model, tok, _question(i), max_tokens=MAX).text.rstrip("\n") for i in range(8)}


def _usage_ok(m: dict, log_free=True):
    assert m["compress_events"] >= demo.MIN_DAYS
    assert 0 < m["peak_kv_tokens"] < m["plain_kv_tokens"]
    assert m["forward_passes"] > 0 and 0 <= m["accepted_draft_tokens"] <= m["drafted_tokens"]
    assert m["kv_bytes_saved"] > 0


def test_chat_completion_matches_generate(served, reference):
    r = served.openai().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": _question(0)}], max_tokens=MAX)
    msg = r.choices[0].message
    extra = msg.model_extra
    # the finished steps are the reasoning, the last step (with \boxed{}) the answer
    assert extra["reasoning_content"] == extra["reasoning"] and extra["reasoning_content"].startswith("Day 01:")
    assert "\\boxed{" in msg.content and "Day 01" not in msg.content
    assert extra["reasoning_content"] + msg.content == reference[0]
    assert extract_boxed(msg.content) == extract_boxed(reference[0])
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens + u.completion_tokens == u.total_tokens and u.completion_tokens > 100
    m = u.model_extra["memosight"]
    _usage_ok(m)
    assert m["kv_bytes_saved"] == (m["plain_kv_tokens"] - m["peak_kv_tokens"]) * served.server.kv_entry_bytes


def test_streaming_chat_matches_and_reports_usage(served, reference):
    reasoning, content, usage, finish = "", "", None, None
    for ch in served.openai().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": _question(1)}], max_tokens=MAX, stream=True,
            stream_options={"include_usage": True}):
        if ch.choices:
            d = ch.choices[0].delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            finish = ch.choices[0].finish_reason or finish
        else:
            usage = ch.usage
    assert reasoning + content == reference[1] and "\\boxed{" in content
    assert finish == "stop" and usage.completion_tokens > 100
    _usage_ok(usage.model_extra["memosight"])


def test_everything_in_content_on_request(served, reference):
    r = served.openai().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": _question(0)}], max_tokens=MAX,
        extra_body={"reasoning_split": "none"})
    assert r.choices[0].message.content.rstrip("\n") == reference[0]
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})


def test_completions_take_the_raw_prompt(served, demo_model):
    model, tok = demo_model
    prompt = "Solve the problem step by step.\n\nQuestion: " + _question(2) + "\n\nAnswer:\n"
    want = generate(model, tok, prompt, max_tokens=60, raw_prompt=True)
    r = served.openai().completions.create(model="demo", prompt=prompt, max_tokens=60)
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    text = "".join(c.choices[0].text for c in served.openai().completions.create(
        model="demo", prompt=prompt, max_tokens=60, stream=True) if c.choices)
    assert text == want.text


def test_anthropic_messages(served, reference):
    client = served.anthropic()
    r = client.messages.create(model="demo", max_tokens=MAX, messages=[{"role": "user", "content": _question(0)}])
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert r.content[0].thinking + r.content[1].text == reference[0]
    assert r.stop_reason == "end_turn" and r.usage.input_tokens > 0 and r.usage.output_tokens > 100
    _usage_ok(r.usage.model_extra["memosight"])
    with client.messages.stream(model="demo", max_tokens=MAX,
                                messages=[{"role": "user", "content": _question(1)}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking + final.content[1].text == reference[1]
    # a stop sequence ends the text where it starts, and is named
    r = client.messages.create(model="demo", max_tokens=MAX, stop_sequences=["Day 03"],
                               messages=[{"role": "user", "content": _question(0)}])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "Day 03"
    text = "".join(b.thinking if b.type == "thinking" else b.text for b in r.content)
    assert reference[0].startswith(text) and reference[0][len(text):].lstrip("\n").startswith("Day 03")


def test_max_tokens_ends_with_length(served, reference):
    r = served.openai().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": _question(0)}], max_tokens=30)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30
    m = r.choices[0].message
    assert ((m.model_extra or {}).get("reasoning_content") or "") + m.content == reference[0][:len(
        ((m.model_extra or {}).get("reasoning_content") or "") + m.content)]


def test_models_and_health(served):
    assert [m.id for m in served.openai().models.list()] == ["demo"]
    status, body = served.post("/health", None, method="GET")
    assert status == 200 and body["status"] == "ok"


def test_second_turn_starts_with_the_first_turns_prompt(demo_model):
    model, tok = demo_model
    cfg = model.memosight_config
    first = conversation_ids(tok, [Message("user", "What is 2 + 3?")], cfg)
    second = conversation_ids(tok, [Message("user", "What is 2 + 3?"), Message("assistant", "\\boxed{5}"),
                                    Message("user", "And 4 + 4?")], cfg)
    assert second[:len(first)] == first and cfg.token_ids.eos in second[len(first):]
    from mlx_memosight.generation import prompt_ids

    assert first == prompt_ids(tok, "What is 2 + 3?", cfg)


def test_eight_concurrent_streams_each_get_their_own(served, reference):
    results, errors = {}, []

    def client(i):
        try:
            text = ""
            for ch in served.openai().chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": _question(i)}], max_tokens=MAX,
                    stream=True):
                if ch.choices:
                    d = ch.choices[0].delta
                    text += ((d.model_extra or {}).get("reasoning_content") or "") + (d.content or "")
            results[i] = text
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    status, body = served.post("/health", None, method="GET")  # answers while the worker is busy
    assert status == 200
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == list(range(8))
    for i in range(8):
        assert results[i] == reference[i], i


def test_a_client_that_leaves_frees_the_server(served, reference):
    worker = served.server.worker
    before = worker.cancelled_jobs
    body = json.dumps({"model": "demo", "stream": True, "max_tokens": 2000, "compress": False,
                       "messages": [{"role": "user", "content": _question(3)}]}).encode()
    s = socket.create_connection(("127.0.0.1", served.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 5:
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 60
    while worker.cancelled_jobs == before:
        assert time.time() < deadline, "the generation went on after its client left"
        time.sleep(0.05)
    r = served.openai().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": _question(0)}], max_tokens=MAX)
    assert r.choices[0].message.model_extra["reasoning_content"] + r.choices[0].message.content == reference[0]


def test_busy_server_answers_503(demo_model):
    s = Served(*demo_model, max_queue=1)
    try:
        release = threading.Event()
        # a job that holds the worker until released, and one that fills the queue
        s.server.worker.submit(Job([1, 2, 3], 1, lambda kind, payload: release.wait(30)))
        time.sleep(0.2)
        s.server.worker.submit(Job([1, 2, 3], 1, lambda kind, payload: None))
        status, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and "busy" in body["error"]["message"]
        status, body = s.post("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        release.set()
        status, body = s.post("/v1/chat/completions", {"max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and body["usage"]["completion_tokens"] == 5
    finally:
        s.close()


def _chat(**fields):
    return {"model": "demo", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 5, **fields}


HOSTILE = {
    # name: (path, body, status, words the error holds, field named)
    "bad-json": ("/v1/chat/completions", b'{"messages": [', 400, "not valid JSON", None),
    "not-utf8": ("/v1/chat/completions", b'{"messages": "\xff"}', 400, "not UTF-8", None),
    "array-body": ("/v1/chat/completions", b"[1, 2]", 400, "JSON object", None),
    "deep-nesting": ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400, "nested too deeply", None),
    "no-messages": ("/v1/chat/completions", {"model": "demo"}, 400, "messages is required", "messages"),
    "messages-string": ("/v1/chat/completions", _chat(messages="hi"), 400, "messages must be an array",
                        "messages"),
    "empty-messages": ("/v1/chat/completions", _chat(messages=[]), 400, "no user message", "messages"),
    "bad-role": ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
                 "role must be one of", "messages"),
    "image-part": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "only text parts", "messages"),
    "ends-with-assistant": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "a"},
                                                                    {"role": "assistant", "content": "b"}]),
                            400, "end with a user turn", "messages"),
    "temperature-string": ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature must be a number",
                           "temperature"),
    "negative-temperature": ("/v1/chat/completions", _chat(temperature=-1), 400, "temperature", "temperature"),
    "max-tokens-float": ("/v1/chat/completions", _chat(max_tokens=1.5), 400, "max_tokens must be an integer",
                         "max_tokens"),
    "max-tokens-bool": ("/v1/chat/completions", _chat(max_tokens=True), 400, "max_tokens must be an integer",
                        "max_tokens"),
    "negative-max-tokens": ("/v1/chat/completions", _chat(max_tokens=-5), 400, "at least 1", "max_tokens"),
    "huge-max-tokens": ("/v1/chat/completions", _chat(max_tokens=10 ** 15), 400, "more than the model's context",
                        "max_tokens"),
    "top-p-2": ("/v1/chat/completions", _chat(top_p=2), 400, "top_p", "top_p"),
    "negative-seed": ("/v1/chat/completions", _chat(seed=-1), 400, "seed", "seed"),
    "draft-len-99": ("/v1/chat/completions", _chat(draft_len=99), 400, "draft_len", "draft_len"),
    "stream-string": ("/v1/chat/completions", _chat(stream="yes"), 400, "stream must be true or false", "stream"),
    "n-2": ("/v1/chat/completions", _chat(n=2), 400, "n must be 1", "n"),
    "many-stops": ("/v1/chat/completions", _chat(stop=["x"] * 17), 400, "at most 16", "stop"),
    "unknown-model": ("/v1/chat/completions", _chat(model="gpt-9"), 404, "not served here", "model"),
    "prompt-too-long": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "seven " * 3000}]),
                        400, "model's context", "messages"),
    "completion-no-prompt": ("/v1/completions", {"max_tokens": 5}, 400, "prompt must be a string", "prompt"),
    "anthropic-no-max-tokens": ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}, 400,
                                "max_tokens is required", None),
    "anthropic-system-role": ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
                              400, "role must be one of user, assistant", None),
}


def _raw(port, head: bytes, body: bytes):
    """Send a request over a plain socket, as far as the server lets it, and
    read the answer: ``(status, parsed JSON body)``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        s.sendall(head)
        try:
            for i in range(0, len(body), 1 << 16):
                s.sendall(body[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the body was all sent
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest[:_length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_ten_megabyte_bodies_get_a_413(served):
    body = b'{"x": "' + b"a" * (10 << 20) + b'"}'
    # declared: refused before it is read
    status, reply = _raw(served.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode(), body)
    assert status == 413 and "larger than" in reply["error"]["message"]
    # chunked, no length declared: refused once the limit is passed
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                       for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    status, reply = _raw(served.port, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 413 and reply["type"] == "error" and "larger than" in reply["error"]["message"]
    assert served.post("/health", None, method="GET")[0] == 200


@pytest.mark.parametrize("name", list(HOSTILE))
def test_bad_requests_get_a_4xx_naming_the_field(served, name):
    path, body, status, words, field = HOSTILE[name]
    before = len(served.log)
    got, reply = served.post(path, body)
    assert got == status, reply
    if path == "/v1/messages":
        assert reply["type"] == "error" and words in reply["error"]["message"], reply
    else:
        assert words in reply["error"]["message"], reply
        assert reply["error"]["param"] == field, reply
    new = served.log[before:]
    assert len(new) == 1 and str(status) in new[0] and "Traceback" not in new[0], new


def test_after_bad_requests_and_a_stalled_connection_good_requests_work(served):
    # a connection that sends half its headers and stays open
    stalled = socket.create_connection(("127.0.0.1", served.port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    try:
        for path, method in (("/nowhere", "GET"), ("/v1/chat/completions", "GET")):
            status, body = served.post(path, None, method=method)
            assert status in (404, 405) and "error" in body
        # unknown fields are ignored, as mlx_lm.server and llama-server do
        status, body = served.post("/v1/chat/completions", _chat(logit_bias={"1": 2}, user="me"))
        assert status == 200 and body["usage"]["completion_tokens"] == 5
    finally:
        stalled.close()


def test_api_key(served):
    served.server.api_key = "sesame"
    try:
        with pytest.raises(openai.AuthenticationError):
            served.openai(api_key="wrong").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            served.anthropic(api_key="wrong").messages.create(
                model="demo", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert [m.id for m in served.openai(api_key="sesame").models.list()] == ["demo"]
        r = served.anthropic(api_key="sesame").messages.create(
            model="demo", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert r.usage.output_tokens == 5
        status, _ = served.post("/health", None, method="GET")  # health answers without a key
        assert status == 200
    finally:
        served.server.api_key = None


# ---------------------------------------------------------------------------
# The reasoning split on its own


def _split(pieces, **kw):
    s = AnswerSplitter(**kw)
    out = []
    for text, end in pieces:
        out += s.feed(text, end)
    return merge(out + s.finish()), s


def test_steps_split_at_the_last_step_with_text():
    pieces = [("Day 1", False), (": a\n", False), ("\n", True), ("So ", False), ("\\boxed{3}.\n", False),
              ("\n", True), ("", False)]
    got, _ = _split(pieces)
    assert got == {"reasoning": "Day 1: a\n\n", "answer": "So \\boxed{3}."}
    got, _ = _split(pieces[:4])  # cut off inside the second step: that step is the answer so far
    assert got == {"reasoning": "Day 1: a\n\n", "answer": "So "}


def test_think_blocks_split_at_their_end_and_stream():
    s = AnswerSplitter()
    deltas = []
    for piece in ["<th", "ink>\nLet me", " think.", "</th", "ink>\n\nThe answer", " is 4."]:
        deltas += s.feed(piece)
    deltas += s.finish()
    assert merge(deltas) == {"reasoning": "Let me think.", "answer": "The answer is 4."}
    assert sum(d.kind == "reasoning" for d in deltas) >= 2  # streamed, not held to the end


def test_stop_strings_across_pieces():
    got, s = _split([("The ans", False), ("wer: 4", False), ("2. Done", False)], split="none", stop=["4", "Done"])
    assert got["answer"] == "The answer: " and s.hit == "4" and s.stopped
    got, s = _split([("ab", False), ("c", False)], split="none", stop=["bcd"])
    assert got["answer"] == "abc" and not s.stopped


# ---------------------------------------------------------------------------
# The terminal chat, through a pseudo-terminal


def test_chat_repl_through_a_terminal():
    import os
    import pty
    import re
    import select
    import subprocess
    import sys

    from conftest import ROOT

    main, sub = pty.openpty()
    def terminal():
        # the pseudo-terminal becomes the chat's controlling terminal, so that ^C is SIGINT
        import fcntl
        import signal
        import termios

        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen([sys.executable, "-m", "mlx_memosight.chat", "--max-tokens", "400"], stdin=sub,
                         stdout=sub, stderr=sub, cwd=ROOT, close_fds=True, preexec_fn=terminal)
    os.close(sub)
    seen = b""

    def until(pattern, timeout=120):
        nonlocal seen
        deadline = time.time() + timeout
        while not re.search(pattern, seen, re.S):
            assert time.time() < deadline, seen.decode(errors="replace")[-2000:]
            r, _, _ = select.select([main], [], [], 0.5)
            if r:
                try:
                    seen += os.read(main, 65536)
                except OSError:
                    break
        found = seen
        seen = b""
        return found.decode(errors="replace")

    def say(text):
        os.write(main, text.encode() + b"\r")

    try:
        until(rb">> ")
        say(_question(0))
        out = until(rb"compress events.*\]\r?\n.*>> ")
        assert "Day 01:" in out and "\\boxed{" in out
        stats = re.search(r"\[(\d+) tokens, [\d.]+ tokens/s, [\d.]+ tokens/pass, (\d+) compress events, "
                          r"KV (\d+) entries at peak vs (\d+) plain\]", out)
        assert stats and int(stats[2]) >= demo.MIN_DAYS and int(stats[3]) < int(stats[4]), out
        say("And after one more day?")  # a second turn: the first answer is part of the prompt
        out = until(rb"compress events.*\]\r?\n.*>> ")
        assert "tokens/s" in out
        say("/reset")
        until(rb"a new conversation.*>> ")
        say(_question(1))
        until(rb"Day 01")
        os.write(main, b"\x03")  # Ctrl-C: the answer stops, the session stays
        out = until(rb"\]\r?\n.*>> ")
        assert "stopped;" in out and "\\boxed" not in out, out
        say("/quit")
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(main)


# ---------------------------------------------------------------------------
# Prompt cache


def test_prompt_cache_reuses_a_shared_prefix_and_changes_nothing(demo_model):
    from mlx_memosight.cache import PromptCache
    from mlx_memosight.generation import prompt_ids

    model, tok = demo_model
    cfg = model.memosight_config
    first = conversation_ids(tok, [Message("user", _question(0))], cfg)
    answer = generate(model, tok, first, max_tokens=MAX)
    second = conversation_ids(tok, [Message("user", _question(0)), Message("assistant", "\\boxed{52}"),
                                    Message("user", _question(4))], cfg)
    other = prompt_ids(tok, _question(5), cfg)  # shares the system prompt only
    cache = PromptCache()
    runs = {}
    for name, ids in (("first", first), ("second", second), ("other", other), ("again", other)):
        r = generate(model, tok, ids, max_tokens=MAX, prompt_cache=cache)
        runs[name] = r
        # the reference: the same prompt without a cache
        assert r.token_ids == generate(model, tok, ids, max_tokens=MAX).token_ids, name
    assert runs["first"].token_ids == answer.token_ids
    assert runs["first"].stats.cached_prompt_tokens == 0
    assert runs["second"].stats.cached_prompt_tokens == len(first)  # the whole first prompt
    shared = next(i for i, (a, b) in enumerate(zip(second, other)) if a != b)
    assert 0 < runs["other"].stats.cached_prompt_tokens == shared
    assert runs["again"].stats.cached_prompt_tokens == len(other) - 1  # the last token runs for its logits
    # the second prompt extends the first, which is then dropped; entries take what they say
    kept = [ids for ids, _ in cache.entries]
    assert first not in kept and second in kept and other in kept
    per_entry = sum(c.nbytes for _, c in cache.entries) // sum(len(k) for k in kept)
    assert per_entry == 2 * len(model.layers) * model.args.num_key_value_heads * \
        (model.args.hidden_size // model.args.num_attention_heads) * 4
    # a budget for one prompt keeps only the most recent
    small = PromptCache(max_bytes=per_entry * (len(other) + 10))
    generate(model, tok, second, max_tokens=5, prompt_cache=small)
    generate(model, tok, other, max_tokens=5, prompt_cache=small)
    assert [ids for ids, _ in small.entries] == [other]


def test_second_turn_reports_cached_prompt_tokens(served):
    client = served.openai()
    messages = [{"role": "user", "content": _question(6)}]
    r1 = client.chat.completions.create(model="demo", messages=messages, max_tokens=MAX)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": _question(7)}]
    r2 = client.chat.completions.create(model="demo", messages=messages, max_tokens=MAX)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens
    a = served.anthropic().messages.create(model="demo", max_tokens=5, messages=messages)
    assert a.usage.cache_read_input_tokens == r2.usage.prompt_tokens - 1  # the same prompt again
    assert a.usage.input_tokens == 1


def test_bench_server_script():
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "examples/bench_server.py", "--clients", "1", "2", "--max-tokens", "20"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("mlx_memosight.server", "mlx_lm."))]
    assert [(x[0], x[1]) for x in rows] == [("mlx_memosight.server", "1"), ("mlx_memosight.server", "2"),
                                            ("mlx_lm.server", "1"), ("mlx_lm.server", "2")]
    assert all(float(x[3]) > 0 for x in rows) and rows[2][4] == rows[3][4] == "1.00x"


def test_worker_survives_a_request_that_fails(demo_model):
    """A request whose delivery raises (its text or its client side) gets an
    error, the requests beside it in the batch finish, and the worker keeps
    serving; the batch's buffers shrink as rows leave."""
    from mlx_memosight.serving import Worker

    model, tok = demo_model
    worker = Worker(model, tok, batch_size=4)
    events = {i: [] for i in range(3)}
    done = {i: threading.Event() for i in range(3)}

    def emitter(i, fail=False):
        def emit(kind, payload):
            if fail and kind == "token":
                raise RuntimeError("the client side broke")
            events[i].append(kind)
            if kind in ("done", "error"):
                done[i].set()
        return emit

    ids = conversation_ids(tok, [Message("user", _question(0))], model.memosight_config)
    try:
        worker.submit(Job(ids, 40, emitter(0)))
        worker.submit(Job(ids, 40, emitter(1, fail=True)))
        for i in (0, 1):
            assert done[i].wait(60), i
        assert events[0][-1] == "done" and events[0].count("token") == 40
        assert events[1] == ["error"]
        worker.submit(Job(ids, 10, emitter(2)))
        assert done[2].wait(60) and events[2][-1] == "done"
        assert not worker.busy
    finally:
        worker.stop()
        worker.thread.join(10)
