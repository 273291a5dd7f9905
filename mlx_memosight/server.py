"""``python -m mlx_memosight.server``: MemoSight decoding behind the OpenAI and
Anthropic APIs.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (OpenAI), ``POST /v1/messages`` (Anthropic Messages) and
``GET /health``; streaming as Server-Sent Events in each API's own shape.

The HTTP side is Starlette on uvicorn (ASGI): an event loop holds any number
of connections open at no cost (an idle or half-sent request, a slow reader
or a long stream ties up no thread), streams responses natively and tells a
stream when its client has gone, which is what stops that generation. The
model runs in one worker thread (:class:`mlx_memosight.serving.Worker`), one
request at a time in arrival order, with a bounded queue (503 when full).

Every refused request gets a 4xx with a JSON error in its API's shape naming
the field at fault, and one log line; the server keeps serving.
"""

import asyncio
import json
import os
import sys
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from . import cli
from .options import REASONING_SPLITS, ServerOptions, add_arguments

API_KEY_ENV = "MLX_MEMOSIGHT_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """A refused request: HTTP status, message, the field at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error",
                             404: "not_found_error", 413: "request_too_large",
                             503: "overloaded_error"}.get(status, "api_error")


# Request fields -> GenerationOptions parameters, per API.
_OPENAI_FIELDS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "seed": "seed", "repetition_penalty": "repetition_penalty", "draft_len": "draft_len",
                  "foresight": "foresight", "compress": "compress"}
_ANTHROPIC_FIELDS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "draft_len": "draft_len",
                     "foresight": "foresight", "compress": "compress"}
_TYPES = {"temp": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float), "seed": int,
          "repetition_penalty": (int, float), "draft_len": int, "foresight": bool, "compress": bool}


def _type_name(t) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "an array",
             dict: "an object"}
    if isinstance(t, tuple):
        return "a number" if float in t else " or ".join(names[x] for x in t)
    return names[t]


def _field(body: dict, name: str, kind, default=None, required: bool = False):
    """``body[name]`` checked against ``kind`` (JSON booleans are not numbers)."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"{name} is required", name)
        return default
    v = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ApiError(400, f"{name} must be {_type_name(kind)}, got {json.dumps(v)[:40]}", name)
    return v


@dataclass
class Request:
    """A request reduced to what the worker and the response need."""

    ids: List[int]
    options: Any  # GenerationOptions
    stop: List[str]
    stream: bool
    include_usage: bool
    split: str


class Server:
    """The model, its worker and the API shapes."""

    def __init__(self, model_path: str, model, tokenizer, model_id: str, api_key: Optional[str] = None,
                 max_queue: int = ServerOptions.default("max_queue"),
                 batch_size: int = ServerOptions.default("batch_size"),
                 max_body_bytes: int = ServerOptions.default("max_body_bytes"),
                 default_max_tokens: int = ServerOptions.default("max_tokens"),
                 split: str = ServerOptions.default("reasoning_split"),
                 prompt_cache_bytes: int = ServerOptions.default("prompt_cache_bytes")):
        from .serving import Worker, kv_bytes_per_entry

        self.model_path, self.model, self.tokenizer = model_path, model, tokenizer
        self.cfg = model.memosight_config
        self.model_id = model_id
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.split = split
        self.context = getattr(model.args, "max_position_embeddings", None)
        self.kv_entry_bytes = kv_bytes_per_entry(model)
        self.worker = Worker(model, tokenizer, max_queue=max_queue, prompt_cache_bytes=prompt_cache_bytes,
                             batch_size=batch_size)
        self.created = int(time.time())

    # -- requests ------------------------------------------------------------

    def check_key(self, headers) -> None:
        if not self.api_key:
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")
        if given != self.api_key:
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY or x-api-key: KEY)")

    def check_model(self, body: dict) -> None:
        name = _field(body, "model", str)
        if name is not None and name not in (self.model_id, os.path.basename(self.model_id.rstrip("/")),
                                              "default_model"):
            raise ApiError(404, f"model {name!r} is not served here (this server serves {self.model_id!r})",
                           "model", "not_found_error")

    def options(self, body: dict, fields: Dict[str, str], max_tokens: int):
        from .errors import OptionError
        from .options import GenerationOptions

        values = {"max_tokens": max_tokens}
        back = {"max_tokens": "max_tokens"}
        for name, param in fields.items():
            v = _field(body, name, _TYPES[param])
            back[param] = name
            if v is not None:
                values[param] = float(v) if param in ("temp", "top_p", "min_p", "repetition_penalty") else v
        try:
            return GenerationOptions(**values)
        except OptionError as e:
            name = back.get(e.param, e.param)
            message = str(e)
            if e.param and message.startswith(e.param):
                message = name + message[len(e.param):]
            raise ApiError(400, message, name) from None

    def max_tokens(self, body: dict, names=("max_completion_tokens", "max_tokens"), required=False) -> int:
        value, name = None, names[-1]
        for n in names:
            v = _field(body, n, int)
            if v is not None:
                value, name = v, n
                break
        if value is None:
            if required:
                raise ApiError(400, f"{names[-1]} is required", names[-1])
            value = self.default_max_tokens
        if value < 1:
            raise ApiError(400, f"{name} must be at least 1, got {value}", name)
        if self.context and value > self.context:
            raise ApiError(400, f"{name} is {value}, more than the model's context of {self.context} tokens",
                           name)
        return value

    def check_prompt(self, ids: List[int], field_name: str) -> None:
        if not ids:
            raise ApiError(400, f"{field_name} is empty", field_name)
        if self.context and len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the model's context is {self.context}",
                           field_name)

    def stop_list(self, body: dict, name: str) -> List[str]:
        v = body.get(name)
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > 16:
            raise ApiError(400, f"{name} must be a string or an array of at most 16 strings", name)
        return [s for s in v if s]

    def split_of(self, body: dict) -> str:
        v = _field(body, "reasoning_split", str, self.split)
        if v not in REASONING_SPLITS:
            raise ApiError(400, f"reasoning_split must be one of {', '.join(REASONING_SPLITS)}, got {v!r}",
                           "reasoning_split")
        return v

    def messages(self, body: dict, anthropic: bool):
        from .serving import Message

        raw = _field(body, "messages", list, required=True)
        out = []
        if anthropic and body.get("system") is not None:
            out.append(Message("system", self.text_of(body["system"], "system")))
        for i, m in enumerate(raw):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise ApiError(400, f"{where} must be an object", "messages")
            role = m.get("role")
            roles = ("user", "assistant") if anthropic else ("system", "developer", "user", "assistant")
            if role not in roles:
                raise ApiError(400, f"{where}.role must be one of {', '.join(roles)}, got {json.dumps(role)[:40]}",
                               "messages")
            out.append(Message("system" if role == "developer" else role,
                               self.text_of(m.get("content"), f"{where}.content")))
        return out

    @staticmethod
    def text_of(content, where: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") not in ("text", "input_text"):
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise ApiError(400, f"{where}[{j}]: only text parts are supported, got {json.dumps(kind)[:40]}",
                                   "messages")
                if not isinstance(p.get("text"), str):
                    raise ApiError(400, f"{where}[{j}].text must be a string", "messages")
                parts.append(p["text"])
            return "".join(parts)
        raise ApiError(400, f"{where} must be a string or an array of text parts", "messages")

    def chat_request(self, body: dict, anthropic: bool = False) -> Request:
        from .errors import MemoSightError
        from .serving import conversation_ids

        self.check_model(body)
        if not anthropic and _field(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1 (one completion per request)", "n")
        max_tokens = self.max_tokens(body, ("max_tokens",), required=True) if anthropic else self.max_tokens(body)
        options = self.options(body, _ANTHROPIC_FIELDS if anthropic else _OPENAI_FIELDS, max_tokens)
        stop = self.stop_list(body, "stop_sequences" if anthropic else "stop")
        stream = _field(body, "stream", bool, False)
        so = _field(body, "stream_options", dict, {})
        include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False
        messages = self.messages(body, anthropic)
        try:
            ids = conversation_ids(self.tokenizer, messages, self.cfg)
        except MemoSightError as e:
            raise ApiError(400, str(e), getattr(e, "param", None) or "messages") from None
        self.check_prompt(ids, "messages")
        return Request(ids, options, stop, stream, include_usage, self.split_of(body))

    def completion_request(self, body: dict) -> Request:
        self.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "prompt")
        if _field(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1 (one completion per request)", "n")
        max_tokens = self.max_tokens(body, ("max_tokens",))
        options = self.options(body, _OPENAI_FIELDS, max_tokens)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if prompt.strip() else []
        self.check_prompt(ids, "prompt")
        so = _field(body, "stream_options", dict, {})
        return Request(ids, options, self.stop_list(body, "stop"), _field(body, "stream", bool, False),
                       bool(so.get("include_usage")), "none")

    # -- running ---------------------------------------------------------------

    async def run(self, req: Request, is_disconnected=None) -> AsyncIterator[Tuple[str, Any]]:
        """Yield ``("delta", Delta)`` items and finally ``("done", (stats,
        finish_reason, the stop string that ended it or None))``; a refused or failed start raises
        :class:`ApiError` before the first item."""
        from .generation import special_ids
        from .serving import AnswerSplitter, Busy, Job

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        o = req.options

        def emit(kind, payload):
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = Job(req.ids, o.max_tokens, emit, sampler=o.sampler(),
                  logits_processors=o.logits_processors(special_ids(self.tokenizer)),
                  engine_options=o.engine_options(), seed=o.seed)
        try:
            self.worker.submit(job)
        except Busy:
            raise ApiError(503, f"the server is busy ({self.worker.waiting} requests waiting); retry later")
        splitter = AnswerSplitter(req.split, req.stop)
        step_id = self.cfg.token_ids.splitter if self.cfg is not None else None
        started = False
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        job.cancelled.set()
                        return
                    continue
                if kind == "error":
                    if not started:
                        raise ApiError(400, payload)
                    raise RuntimeError(payload)
                if kind == "done":
                    for d in splitter.finish():
                        yield "delta", d
                    reason = "stop" if splitter.stopped else (payload.finish_reason or "stop")
                    yield "done", (payload, reason, splitter.hit)
                    return
                started = True
                for d in splitter.feed(payload.text, payload.token == step_id):
                    yield "delta", d
                if splitter.stopped:
                    job.cancelled.set()
        finally:
            job.cancelled.set()  # a client gone mid-stream frees the worker

    def memosight_usage(self, st) -> dict:
        saved = max(0, st.plain_kv_tokens - st.peak_kv_tokens)
        return dict(forward_passes=st.forward_passes, drafted_tokens=st.drafted_tokens,
                    accepted_draft_tokens=st.accepted_draft_tokens, compress_events=st.compress_events,
                    peak_kv_tokens=st.peak_kv_tokens, plain_kv_tokens=st.plain_kv_tokens,
                    kv_bytes_saved=saved * self.kv_entry_bytes, tokens_per_pass=round(st.tokens_per_pass, 3),
                    generation_tps=round(st.generation_tps, 2), prompt_tps=round(st.prompt_tps, 2))

    def openai_usage(self, req: Request, st) -> dict:
        n = st.generated_tokens if st is not None else 0
        u = dict(prompt_tokens=len(req.ids), completion_tokens=n, total_tokens=len(req.ids) + n)
        if st is not None:
            u["prompt_tokens_details"] = {"cached_tokens": st.cached_prompt_tokens}
            u["memosight"] = self.memosight_usage(st)
        return u


# ----------------------------------------------------------------------------
# HTTP


def _openai_error(e: ApiError):
    return {"error": {"message": e.message, "type": e.kind if e.status != 400 else "invalid_request_error",
                      "param": e.param, "code": e.kind if e.status in (404, 413, 503) else None}}


def _anthropic_error(e: ApiError):
    return {"type": "error", "error": {"type": e.kind, "message": e.message}}


def _sse(data: dict, event: Optional[str] = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(server: Server, log=None, log_requests: bool = False):
    """The Starlette application serving ``server``. ``log(line)`` gets one
    line per refused request, and with ``log_requests`` one per request."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    async def read_body(request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > server.max_body_bytes):
            raise ApiError(413, f"the body is larger than {server.max_body_bytes} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > server.max_body_bytes:
                    raise ApiError(413, f"the body is larger than {server.max_body_bytes} bytes")
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before sending the whole body")
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the body is not UTF-8 (byte {e.start})")
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply")
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def endpoint(handler, anthropic=False):
        shape = _anthropic_error if anthropic else _openai_error

        async def wrapped(request):
            try:
                server.check_key(request.headers)
                response = await handler(request)
                if log_requests:
                    log(f"{request.method} {request.url.path}: {response.status_code}"
                        + (" (streamed)" if response.media_type == "text/event-stream" else ""))
                return response
            except ApiError as e:
                log(f"{request.method} {request.url.path}: {e.status} {e.message}")
                return JSONResponse(shape(e), status_code=e.status)
            except Exception as e:  # one line, no traceback; the server keeps serving
                log(f"{request.method} {request.url.path}: 500 {type(e).__name__}: {e}")
                return JSONResponse(shape(ApiError(500, f"internal error: {type(e).__name__}")), status_code=500)

        return wrapped

    async def health(request):
        return JSONResponse({"status": "ok", "model": server.model_id, "busy": server.worker.busy,
                             "waiting": server.worker.waiting})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "mlx-memosight"}]})

    async def start(req: Request, request):
        """Start a generation: a refused or failed start raises here (and
        becomes an error response); returns its items, closed at the end or
        when the client leaves."""
        agen = server.run(req, request.is_disconnected)
        try:
            head = await agen.__anext__()
        except StopAsyncIteration:
            head = None

        async def items():
            try:
                if head is not None:
                    yield head
                    async for item in agen:
                        yield item
            finally:
                await agen.aclose()

        return items()

    async def collect(items):
        """A whole generation: ``(text per kind, done payload)``; the payload
        is None when the client left."""
        parts, done = {"reasoning": "", "answer": ""}, None
        async with aclosing(items):
            async for kind, payload in items:
                if kind == "delta":
                    parts[payload.kind] += payload.text
                else:
                    done = payload
        return parts, done

    async def chat(request):
        body = await read_body(request)
        req = server.chat_request(body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        items = await start(req, request)

        def choice_delta(d) -> dict:
            if d.kind == "reasoning":
                return {"reasoning_content": d.text, "reasoning": d.text}
            return {"content": d.text}

        if not req.stream:
            parts, done = await collect(items)
            if done is None:  # the client left
                return JSONResponse({}, status_code=499)
            st, reason, _ = done
            message = {"role": "assistant", "content": parts["answer"]}
            if parts["reasoning"]:
                message.update(reasoning_content=parts["reasoning"], reasoning=parts["reasoning"])
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": server.model_id,
                                 "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                                 "usage": server.openai_usage(req, st)})

        def chunk(delta: dict, finish=None) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async with aclosing(items):  # a client gone stops its generation at once
                async for kind, payload in items:
                    if kind == "delta":
                        yield chunk(choice_delta(payload))
                        continue
                    st, reason, _ = payload
                    yield chunk({}, reason)
                    if req.include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": server.model_id, "choices": [], "usage": server.openai_usage(req, st)})
                    yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request):
        body = await read_body(request)
        req = server.completion_request(body)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        items = await start(req, request)

        def piece(text, finish=None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": server.model_id,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if not req.stream:
            parts, done = await collect(items)  # the whole text is the answer here (no split)
            if done is None:
                return JSONResponse({}, status_code=499)
            out = piece(parts["answer"], done[1])
            out["usage"] = server.openai_usage(req, done[0])
            return JSONResponse(out)

        async def events():
            async with aclosing(items):  # a client gone stops its generation at once
                async for kind, payload in items:
                    if kind == "delta":
                        yield _sse(piece(payload.text))
                        continue
                    yield _sse(piece("", payload[1]))
                    if req.include_usage:
                        u = piece("")
                        u["choices"], u["usage"] = [], server.openai_usage(req, payload[0])
                        yield _sse(u)
                    yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def messages(request):
        body = await read_body(request)
        req = server.chat_request(body, anthropic=True)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        items = await start(req, request)

        def stop_reason(reason, hit):
            return "stop_sequence" if hit else ("max_tokens" if reason == "length" else "end_turn")

        def usage(st) -> dict:
            # Anthropic counts cached prompt tokens apart from input_tokens
            cached = st.cached_prompt_tokens if st else 0
            return {"input_tokens": len(req.ids) - cached, "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0, "output_tokens": st.generated_tokens if st else 0,
                    "memosight": server.memosight_usage(st) if st else None}

        def message(content, reason=None, hit=None, st=None) -> dict:
            return {"id": mid, "type": "message", "role": "assistant", "model": server.model_id,
                    "content": content, "stop_reason": reason, "stop_sequence": hit, "usage": usage(st)}

        if not req.stream:
            parts, done = await collect(items)
            if done is None:
                return JSONResponse({}, status_code=499)
            st, reason, hit = done
            content = []
            if parts["reasoning"]:
                content.append({"type": "thinking", "thinking": parts["reasoning"], "signature": ""})
            content.append({"type": "text", "text": parts["answer"]})
            return JSONResponse(message(content, stop_reason(reason, hit), hit, st))

        def switch(kind: str, index: int, open_kind):
            """Events that close the open content block (if any) and open the
            next one, of ``kind``."""
            if open_kind is not None:
                yield _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                {"type": "text", "text": ""}
            yield _sse({"type": "content_block_start", "index": index + 1, "content_block": block},
                       "content_block_start")

        async def events():
            yield _sse({"type": "message_start", "message": message([])}, "message_start")
            index, open_kind = -1, None
            async with aclosing(items):  # a client gone stops its generation at once
                async for kind, payload in items:
                    # at the end the answer block is open, even when empty
                    block = "thinking" if kind == "delta" and payload.kind == "reasoning" else "text"
                    if block != open_kind:
                        for e in switch(block, index, open_kind):
                            yield e
                        index, open_kind = index + 1, block
                    if kind == "delta":
                        delta = {"type": "thinking_delta", "thinking": payload.text} if block == "thinking" else \
                            {"type": "text_delta", "text": payload.text}
                        yield _sse({"type": "content_block_delta", "index": index, "delta": delta},
                                   "content_block_delta")
                        continue
                    st, reason, hit = payload
                    yield _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                    yield _sse({"type": "message_delta", "delta": {"stop_reason": stop_reason(reason, hit),
                                                                   "stop_sequence": hit},
                                "usage": usage(st)}, "message_delta")
                    yield _sse({"type": "message_stop"}, "message_stop")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def not_found(request, exc):
        e = ApiError(404, f"no such endpoint: {request.method} {request.url.path}", kind="not_found_error")
        log(f"{request.method} {request.url.path}: 404")
        return JSONResponse(_openai_error(e), status_code=404)

    async def not_allowed(request, exc):
        e = ApiError(405, f"{request.method} is not allowed on {request.url.path}", kind="invalid_request_error")
        return JSONResponse(_openai_error(e), status_code=405)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/messages", endpoint(messages, anthropic=True), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


# ----------------------------------------------------------------------------
# The command


def build_parser():
    p = cli.ArgumentParser(
        prog="mlx_memosight.server",
        description="Serve a MemoSight model behind the OpenAI (/v1/chat/completions, /v1/completions, "
                    "/v1/models) and Anthropic (/v1/messages) APIs.",
    )
    p.add_argument("--model", help=cli.MODEL_HELP)
    p.add_argument("--adapter-path", help="MemoSight adapters (mlx_memosight.lora) to load into --model")
    add_arguments(p, ServerOptions)
    return p


def _serve(args):
    import uvicorn

    from .loading import load_for_decoding, resolve_model

    o = ServerOptions.from_args(args)
    path = resolve_model(args.model)
    model, tokenizer = load_for_decoding(path, adapter_path=args.adapter_path)
    if model.memosight_config is None:
        from .loading import memosight_notice

        print(memosight_notice(path), file=sys.stderr)
    model_id = args.model or "mlx-memosight-demo"
    server = Server(str(path), model, tokenizer, model_id, api_key=o.api_key or os.environ.get(API_KEY_ENV),
                    max_queue=o.max_queue, batch_size=o.batch_size, max_body_bytes=o.max_body_bytes,
                    default_max_tokens=o.max_tokens, split=o.reasoning_split,
                    prompt_cache_bytes=o.prompt_cache_bytes)
    if o.host not in LOCAL_HOSTS:
        print(f"warning: listening on {o.host}: other machines can reach this server"
              + ("" if server.api_key else " and no --api-key is set"), file=sys.stderr)
    print(f"serving {model_id} on http://{o.host}:{o.port}/v1 (OpenAI) and /v1/messages (Anthropic)",
          file=sys.stderr, flush=True)
    # one line per request, ours (uvicorn's access log would add a second for a refused one)
    uvicorn.run(create_app(server, log_requests=True), host=o.host, port=o.port, log_level=o.log_level,
                access_log=False)


def main(argv=None):
    cli.run(build_parser(), _serve, argv)


if __name__ == "__main__":
    main()
