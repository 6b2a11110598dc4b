"""The background scheduling loop: admits requests, runs steps, applies results, notifies sinks.

All request/scheduler state is touched only from the loop thread; callers talk to it through
``submit``/``abort`` (a locked inbox) and receive outputs through per-request sinks. The loop
owns its ``PauseController`` (``pause_generation``); the memory controller gates its steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine_core.control.pause import PauseController
from engine_core.requests.request import Request
from engine_core.scheduling.scheduler import Chunk, Scheduler
from engine_core.scheduling.step_plan import StepPlan, StepResult, build_plan
from engine_core.tokenizer import find_stop_regex, find_stop_string

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Receives a request's progress; called from the loop thread, must not block."""

    def on_progress(self, req: Request) -> None: ...
    def on_finish(self, req: Request, text: str) -> None: ...
    def fail(self, error: BaseException) -> None: ...


class StepGate(Protocol):
    """Gates the loop's steps on memory and ticks its idle timer
    (``control.engine_memory.MemoryController``). ``runnable``/``idle_timeout`` are cheap and
    may run under the loop's lock; ``tick`` runs on the loop thread before each would-be step."""

    def runnable(self) -> bool: ...
    def tick(self, has_work: bool, paused: bool) -> None: ...
    def idle_timeout(self) -> float | None: ...


@dataclass
class LoopStats:
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0  # tokens computed by chunks that are not single-token decodes
    finished_requests: int = 0
    busy_seconds: float = 0.0


class EngineLoop:
    """Owns the scheduler and drives ``execute(plan) -> result`` (the model runner) in a thread."""

    def __init__(
        self,
        scheduler: Scheduler,
        execute: Callable[[StepPlan], StepResult],
        eos_ids: tuple[int, ...],
        decode: Callable[[Request], str],
        weight_version: Callable[[], str],
        memory: StepGate,
    ):
        self.scheduler = scheduler
        self.execute = execute
        self.eos_ids = set(eos_ids)
        self.decode = decode
        self.weight_version = weight_version
        self.stats = LoopStats()
        self._sinks: dict[str, Sink] = {}
        self._inbox: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.memory = memory
        self.pause = PauseController(scheduler, self._abort_all)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- caller side (any thread) ----
    def submit(self, reqs: list[Request], sinks: list[Sink]) -> None:
        with self._cond:
            self._inbox.append(("add", list(zip(reqs, sinks))))
            self._cond.notify()

    def abort(self, rid: str | None, message: str = "aborted by request") -> None:
        """Abort one request by id, or every request when ``rid`` is None."""
        with self._cond:
            self._inbox.append(("abort", (rid, message)))
            self._cond.notify()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the loop thread between two steps and return its result (or raise its
        exception). Weight updates use this, so no forward ever sees half-written weights."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed back to the caller's thread
                box["error"] = exc
            done.set()

        if threading.current_thread() is self._thread:
            run()
        else:
            with self._cond:
                if self._stopping or not self.alive:
                    raise RuntimeError("engine loop is not running")
                self._inbox.append(("call", run))
                self._cond.notify()
            if not done.wait(timeout):
                raise TimeoutError(f"engine loop did not run the call within {timeout}s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- loop thread ----
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._runnable() and not self._stopping:
                    timeout = self.memory.idle_timeout()
                    if timeout is not None and timeout <= 0:
                        break  # idle long enough: tick() below acts on it
                    self._cond.wait(timeout)
                if self._stopping:
                    for kind, payload in self._inbox:
                        if kind == "call":
                            payload()  # unblock callers; they see the engine stopping
                    break
                inbox, self._inbox = self._inbox, []
            try:
                for kind, payload in inbox:
                    self._handle(kind, payload)
                self.memory.tick(self.scheduler.has_work(), self.pause.paused)
                if self._runnable():
                    self._step()
            except Exception as exc:  # a bug here must not strand callers or kill the loop
                log.exception("engine loop iteration failed")
                self._abort_all(f"engine error: {exc!r}")
        self._abort_all("engine shut down")

    def _runnable(self) -> bool:
        return self.scheduler.has_work() and not self.pause.paused and self.memory.runnable()

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "call":
            payload()
        elif kind == "add":
            for req, sink in payload:
                self._sinks[req.rid] = sink
                self.scheduler.add(req)
        elif kind == "abort":
            rid, message = payload
            if rid is None:
                self._abort_all(message)
            else:
                req = self.scheduler.find(rid)
                if req is not None:
                    self._finish(req, {"type": "abort", "message": message})

    def _abort_all(self, message: str) -> None:
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(req, {"type": "abort", "message": message})

    def _step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            return
        started = time.perf_counter()
        try:
            result = self.execute(build_plan(chunks, self.eos_ids))
        except Exception as exc:  # a failed step must not kill the loop or strand callers
            log.exception("engine step failed")
            for chunk in chunks:
                self._finish(chunk.req, {"type": "abort", "message": f"engine error: {exc!r}"})
            return
        self._apply(chunks, result)
        self.stats.steps += 1
        self.stats.busy_seconds += time.perf_counter() - started

    def _apply(self, chunks: list[Chunk], result: StepResult) -> None:
        row_of = 0  # walks logit rows in plan order
        sample_index = 0
        version = self.weight_version()
        hidden_row = 0  # walks result.hidden_states in plan order
        for chunk in chunks:
            req = chunk.req
            req.num_computed += chunk.length
            if chunk.length > 1 or chunk.start < len(req.prompt_ids):
                self.stats.prefill_tokens += chunk.length
            if req.return_hidden_states:
                rows = result.hidden_states[hidden_row : hidden_row + chunk.length]
                req.hidden_states.update(enumerate(rows, start=chunk.start))
                hidden_row += chunk.length
            if req.return_logprob:
                row_of = self._record_input_logprobs(req, chunk, result, row_of)
            if not chunk.samples:
                continue
            token = result.tokens[sample_index]
            sample_index += 1
            if req.max_new_tokens == 0:
                self._finish(req, {"type": "length", "length": 0})
                row_of += 1
                continue
            req.output_ids.append(token)
            req.output_versions.append(version)
            if req.return_logprob:
                _record_row(
                    req,
                    result,
                    row_of,
                    req.output_logprobs,
                    req.output_top_logprobs,
                    req.output_token_ids_logprobs,
                )
            row_of += 1
            self.stats.generated_tokens += 1
            self._after_token(req, token)

    def _record_input_logprobs(
        self, req: Request, chunk: Chunk, result: StepResult, row: int
    ) -> int:
        for pos in range(chunk.start, chunk.start + chunk.length):
            if req.wants_input_logprob_at(pos):
                _record_row(
                    req,
                    result,
                    row,
                    req.input_logprobs,
                    req.input_top_logprobs,
                    req.input_token_ids_logprobs,
                )
                row += 1
        return row

    def _after_token(self, req: Request, token: int) -> None:
        params = req.params
        if not params.ignore_eos and token in self.eos_ids:
            return self._finish(req, {"type": "stop", "matched": token})
        if token in params.stop_token_ids:
            return self._finish(req, {"type": "stop", "matched": token})
        if params.stop or params.stop_regex:
            text = self.decode(req)
            hit = find_stop_string(text, params.stop)
            matched = hit[1] if hit is not None else find_stop_regex(text, params.stop_regex)
            if matched is not None:  # the sink's text is trimmed by the decode (outputs.py)
                return self._finish(req, {"type": "stop", "matched": matched})
        if len(req.output_ids) >= req.max_new_tokens:
            return self._finish(req, {"type": "length", "length": len(req.output_ids)})
        sink = self._sinks.get(req.rid)
        if sink is None:
            return
        try:
            sink.on_progress(req)
        except Exception:  # the caller is gone (e.g. its event loop closed): end its request only
            log.exception("progress of %s could not be delivered; aborting it", req.rid)
            self._finish(req, {"type": "abort", "message": "its output could not be delivered"})

    def _finish(self, req: Request, reason: dict, text: str | None = None) -> None:
        if req.finished:
            return
        req.finish_reason = reason
        self.scheduler.finish(req)
        self.stats.finished_requests += 1
        sink = self._sinks.pop(req.rid, None)
        if sink is None:
            return
        try:
            sink.on_finish(req, self.decode(req) if text is None else text)
        except Exception as exc:  # a broken output must not stop the engine or strand its caller
            log.exception("output of %s failed", req.rid)
            try:
                sink.fail(exc)
            except Exception:  # e.g. the caller's event loop is closed: nobody is waiting
                log.exception("could not report the failure of %s", req.rid)


def _record_row(req: Request, result: StepResult, row: int, logprobs, tops, id_logprobs) -> None:
    """Append logits row ``row``'s logprob (and the top / asked-for token ones, if wanted)."""
    logprobs.append(result.logprobs[row])  # type: ignore[index]
    if req.top_logprobs_num > 0:
        tops.append(result.top_logprobs[row])
    if req.token_ids_logprob is not None:
        id_logprobs.append(result.token_ids_logprobs[row])
