"""What the server and the chat need besides HTTP: conversations to prompt
ids, the generated text split into reasoning and answer (with stop strings),
and one worker that runs the requests on the model.

A MemoSight model writes its reasoning as steps, each closed by
``<|splitter|>``; the reference's answer is the last step (the one holding
``\\boxed{}``). So the answer is the last step that holds text (the demo
model closes it with a splitter, then EOS) and the reasoning is every step
before it. A finished step is known to be reasoning once another step with
text has finished after it, so reasoning streams a step at a time, one step
behind, and the answer comes when the generation ends. A model that writes a
``<think>`` block (Qwen3, R1-style distills) is split at ``</think>``
instead and streams token by token. ``split="none"`` keeps everything in the answer, streamed token by
token. Trailing newlines of the answer are dropped (as ``generate`` prints
it), so reasoning + answer is ``generate``'s printed text.
"""

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .config import TEMPLATES, MemoSightConfig
from .errors import GenerationError, MemoSightError

# A later user turn of each known template, written after the previous
# answer and the template's EOS token.
NEXT_TURN = {
    "qwen": "\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n{question}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n",
    "plain": "\n\nQuestion: {question}\n\nAnswer:\n",
}


class RequestError(MemoSightError):
    """A request the server refuses; ``param`` names the field at fault."""


@dataclass
class Message:
    role: str
    content: str


def conversation_ids(tokenizer, messages: Sequence[Message], cfg: Optional[MemoSightConfig]) -> List[int]:
    """The prompt ids of a conversation: system messages join into the system
    prompt; user and assistant turns alternate, from a user turn to a user
    turn. A one-question conversation gives exactly the ids of ``generate``'s
    prompt, and turn ``n + 1``'s ids start with turn ``n``'s prompt ids (each
    turn is encoded on its own), which is what the prompt cache reuses."""
    from .generation import prompt_ids

    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise RequestError("messages holds no user message", "messages")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise RequestError(f"messages: turn {i + 1} is {m.role!r} where a {want!r} turn belongs "
                               "(user and assistant turns alternate, from a user turn to a user turn)",
                               "messages")
    if len(turns) % 2 == 0:
        raise RequestError("messages must end with a user turn", "messages")
    if cfg is None:
        if getattr(tokenizer, "chat_template", None):
            plain = ([{"role": "system", "content": system}] if system else []) + [
                {"role": m.role, "content": m.content} for m in turns]
            return list(tokenizer.apply_chat_template(plain, add_generation_prompt=True))
        return prompt_ids(tokenizer, "\n\n".join(m.content for m in turns), None, system)
    ids = prompt_ids(tokenizer, turns[0].content, cfg, system)
    if len(turns) > 1:
        t = cfg.template
        known = TEMPLATES.get(t.name)
        if known is None or known.prompt != t.prompt or t.name not in NEXT_TURN:
            raise RequestError(f"this model's template ({t.name!r}) has no known form for a second "
                               "turn: send one user message", "messages")
        for answer, question in zip(turns[1::2], turns[2::2]):
            ids += tokenizer.encode(answer.content, add_special_tokens=False) + [cfg.token_ids.eos]
            ids += tokenizer.encode(NEXT_TURN[t.name].format(question=question.content),
                                    add_special_tokens=False)
    return ids


@dataclass
class Delta:
    """New text of one kind: ``reasoning`` or ``answer``."""

    kind: str
    text: str


class AnswerSplitter:
    """Turns the stream of committed segments into reasoning and answer
    deltas, cut at the first stop string.

    ``feed(text, step_end)`` takes a token's text (``step_end``: the token
    closed a step); ``finish()`` flushes what was held back. ``stopped`` is
    set once a stop string was seen (generation should end).
    """

    def __init__(self, split: str = "steps", stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False
        self.hit: Optional[str] = None  # the stop string that ended the text
        self.mode: Optional[str] = None if split == "steps" else "none"
        self.step = ""  # the current step (steps mode: held until it ends)
        self.finished = ""  # steps mode: the last finished step, held until another one starts
        self.pending = ""  # text not yet checked against all stop strings
        self.seen = ""  # everything passed the stop check, for the <think> test
        self.in_think = False

    def _emit(self, text: str, step_end: bool, out: List[Delta]):
        """Text that passed the stop check."""
        if not text and not step_end:
            return
        if self.mode is None:
            probe = (self.seen + text).lstrip()
            if probe.startswith("<think>"):
                self.mode, self.in_think = "think", True
            elif len(probe) >= len("<think>") or not "<think>".startswith(probe) or step_end:
                self.mode = "steps"
            else:
                self.seen += text
                return
            text, self.seen = self.seen + text, ""
        if self.mode == "none":
            out.append(Delta("answer", text))
        elif self.mode == "think":
            self.step += text
            while True:
                if self.in_think:
                    start = self.step.find("<think>")
                    if start >= 0 and not self.step[:start].strip():
                        self.step = self.step[start + len("<think>"):].lstrip("\n")
                    end = self.step.find("</think>")
                    if end >= 0:
                        out.append(Delta("reasoning", self.step[:end].rstrip("\n")))
                        self.step = self.step[end + len("</think>"):].lstrip("\n")
                        self.in_think = False
                        continue
                    safe = len(self.step) - (len("</think>") - 1)
                    if safe > 0:
                        out.append(Delta("reasoning", self.step[:safe]))
                        self.step = self.step[safe:]
                    return
                out.append(Delta("answer", self.step))
                self.step = ""
                return
        else:
            self.step += text
            if step_end and self.step.strip():
                # the step before this one was not the last: it is reasoning
                if self.finished:
                    out.append(Delta("reasoning", self.finished))
                self.finished, self.step = self.step, ""
            elif step_end:
                self.finished, self.step = self.finished + self.step, ""

    def feed(self, text: str, step_end: bool = False) -> List[Delta]:
        return [d for d in self._feed(text, step_end) if d.text]

    def _feed(self, text: str, step_end: bool) -> List[Delta]:
        out: List[Delta] = []
        if self.stopped:
            return out
        if not self.stop:
            self._emit(text, step_end, out)
            return out
        self.pending += text
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                self._emit(self.pending[:i], False, out)
                self.pending, self.stopped, self.hit = "", True, s
                return out
        if step_end:
            self._emit(self.pending, True, out)
            self.pending = ""
        else:
            safe = len(self.pending) - self.hold
            if safe > 0:
                self._emit(self.pending[:safe], False, out)
                self.pending = self.pending[safe:]
        return out

    def finish(self) -> List[Delta]:
        out: List[Delta] = []
        if self.pending:
            self._emit(self.pending, False, out)
            self.pending = ""
        if self.mode is None and self.seen:
            self.mode, text, self.seen = "steps", self.seen, ""
            self.step += text
        if self.mode == "steps":
            if self.step.strip():
                out.append(Delta("reasoning", self.finished))
                answer = self.step
            else:
                answer = self.finished + self.step
            out.append(Delta("answer", answer.rstrip("\n")))
            self.step = self.finished = ""
        elif self.step:
            kind = "reasoning" if (self.mode == "think" and self.in_think) else "answer"
            out.append(Delta(kind, self.step.rstrip("\n") if kind == "answer" else self.step))
            self.step = ""
        return [d for d in out if d.text]


def merge(deltas: Sequence[Delta]) -> Dict[str, str]:
    out = {"reasoning": "", "answer": ""}
    for d in deltas:
        out[d.kind] += d.text
    return out


# ----------------------------------------------------------------------------
# The worker


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    """One request for the worker. ``emit(kind, payload)`` is called from the
    worker thread: ``("token", GenerationResponse)`` per committed token,
    then ``("done", GenerationStats)`` or ``("error", message)``."""

    ids: List[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    sampler: Optional[Callable] = None
    logits_processors: Sequence[Callable] = ()
    engine_options: dict = field(default_factory=dict)
    seed: Optional[int] = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """Runs the requests on the model in a thread of its own (the model's
    arrays are used from that thread only), up to ``batch_size`` of them
    decoded together in one batch (:class:`mlx_memosight.engine.BatchEngine`):
    a waiting request joins between two passes, a finished or cancelled one
    leaves at once. Requests with the same engine settings share a batch;
    batches of different settings take turns, a pass each. At most
    ``max_queue`` requests wait; :meth:`submit` raises :class:`Busy` beyond.
    Prompts share KV entries through a :class:`mlx_memosight.cache.PromptCache`
    of ``prompt_cache_bytes`` (0: none)."""

    def __init__(self, model, tokenizer, max_queue: int = 16, prompt_cache_bytes: int = 1 << 30,
                 batch_size: int = 8):
        from .cache import PromptCache

        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.engines: Dict[tuple, object] = {}  # engine settings -> BatchEngine
        self.running: Dict[tuple, "_Running"] = {}  # (settings, sequence id) -> request
        self.cancelled_jobs = 0  # stopped early: the client left or a stop string ended the text
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="memosight-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy() from None

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def stop(self):
        self.jobs.put(None)

    def _loop(self):
        while not (self._stopping and not self.running):
            try:
                self._admit()
                for key, engine in list(self.engines.items()):
                    if len(engine):
                        self._step(key, engine)
            except Exception as e:  # never leave the loop: fail what runs, keep serving
                self._fail(list(self.running), _message(e))
                self.engines.clear()

    def _fail(self, keys, message: str):
        for k in keys:
            run = self.running.pop(k, None)
            if run is not None:
                try:
                    run.job.emit("error", message)
                except Exception:  # the request's side is gone
                    pass

    def _admit(self):
        """Take waiting requests while the batch has room (wait for one when
        nothing runs)."""
        while not self._stopping and len(self.running) < self.batch_size:
            try:
                job = self.jobs.get(block=not self.running)
            except queue.Empty:
                return
            if job is None:
                self._stopping = True
                return
            if job.cancelled.is_set():
                continue
            try:
                self._start(job)
            except Exception as e:  # the server keeps serving; the client is told
                job.emit("error", _message(e))

    def _start(self, job: Job):
        from .generation import TextStream, make_engine

        key = tuple(sorted(job.engine_options.items()))
        engine = self.engines.get(key)
        if engine is None:
            engine = make_engine(self.model, self.tokenizer, batch=True, **job.engine_options)
            self.engines[key] = engine
        uid = engine.add(job.ids, job.max_tokens, self.prompt_cache, sampler=job.sampler,
                         logits_processors=job.logits_processors, seed=job.seed)
        self.running[(key, uid)] = _Running(job, TextStream(self.tokenizer, engine.cfg, engine.stop_ids))

    def _step(self, key, engine):
        for (k, uid), run in list(self.running.items()):
            if k == key and run.job.cancelled.is_set():
                stats = engine.cancel(uid)
                self.running.pop((k, uid))
                self.cancelled_jobs += 1
                if run.emitted:  # a stop string ended the text: the request ends with what it has
                    run.job.emit("done", stats)
        if not len(engine):
            return
        try:
            results = engine.step()
        except Exception as e:  # a failed pass fails the requests in it; the server keeps serving
            self._fail([k for k in self.running if k[0] == key], _message(e))
            self.engines.pop(key, None)
            return
        for r in results:
            run = self.running.get((key, r.uid))
            if run is None:
                continue
            try:
                self._deliver(run, r)
            except Exception as e:  # this request fails (its text, its client); the others go on
                if not r.finished:
                    engine.cancel(r.uid)
                self._fail([(key, r.uid)], _message(e))
                continue
            if r.finished:
                self.running.pop((key, r.uid), None)

    @staticmethod
    def _deliver(run: "_Running", r):
        for event in r.events:
            out = run.text.feed(event, r.stats)
            if out is not None:
                run.job.emit("token", out)
                run.emitted = True
        if r.finished:
            last = run.text.finish(r.stats)
            if last is not None:
                run.job.emit("token", last)
                run.emitted = True
            if run.emitted:
                run.job.emit("done", r.stats)
            else:
                run.job.emit("error", str(GenerationError("nothing was generated")))


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, MemoSightError) else f"generation failed: {type(e).__name__}: {e}"


@dataclass
class _Running:
    job: Job
    text: object  # generation.TextStream
    emitted: bool = False


def kv_bytes_per_entry(model) -> int:
    """Bytes one KV cache entry takes over all layers (keys and values)."""
    a = model.args
    layers = getattr(a, "num_hidden_layers")
    heads = getattr(a, "num_attention_heads")
    kv_heads = getattr(a, "num_key_value_heads", None) or heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // heads
    from .backend import model_dtype

    dtype = model_dtype(model)[0]
    size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 2)
    return 2 * layers * kv_heads * head_dim * size
