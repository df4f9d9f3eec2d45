"""The engine: every served model's runner, stepped by one background thread, behind an asyncio API.

    engine = Engine()
    engine.add_family("artifacts/fam", device="cpu")          # exposes each branch by name
    engine.add_standalone("phi3", "models/phi3")
    engine.start()
    stream = engine.submit("math", prompt_ids, SamplingParams(temperature=0))
    async for event in stream: ...                            # text deltas, then a finish reason
    stream.cancel()                                           # frees the slot at the next step

``submit`` checks everything it can (model name, prompt length, queue room)
before returning, so a caller can answer a bad request before streaming.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from server.engine.runner import Event, FamilyRunner, Runner, Sequence, StandaloneRunner
from server.engine.sampling import SamplingParams
from server.engine.text import IncrementalText, load_tokenizer, stop_token_ids

log = logging.getLogger("branchserve.engine")


class UnknownModel(KeyError):
    pass


class EngineFull(RuntimeError):
    pass


@dataclass
class Target:
    """One name a request can ask for: a family branch or a standalone model."""

    name: str
    kind: str  # "branch" | "standalone"
    runner: Runner
    tokenizer: object
    stop_ids: frozenset
    branch: int = 0
    defaults: dict | None = None  # sampling defaults for requests that leave them out


class RequestStream:
    def __init__(self, seq: Sequence, events: asyncio.Queue, wake: threading.Event):
        self.seq, self._events, self._wake = seq, events, wake
        self.finish_reason: str | None = None
        self.prompt_tokens = len(seq.prompt)

    @property
    def id(self) -> str:
        return self.seq.id

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        event = await self._events.get()
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        return event

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.output)

    def cancel(self) -> None:
        self.seq.cancelled.set()
        self._wake.set()


class Engine:
    def __init__(self, max_waiting: int = 256):
        self.max_waiting = max_waiting
        self.targets: dict[str, Target] = {}
        self.runners: list[Runner] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- configuration
    def _expose(self, target: Target) -> None:
        if target.name in self.targets:
            raise ValueError(f"model name {target.name!r} is used twice")
        self.targets[target.name] = target

    def add_family(self, artifact_dir: str | Path, names: dict[str, str] | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, max_batch: int = 16, max_seq: int = 2048,
                   prefill_chunk: int = 256, defaults: dict | None = None,
                   static_decode: bool = False, compile: bool = False) -> FamilyRunner:
        """Serve an artifact's branches; ``names`` maps exposed name -> branch (default: every branch as itself)."""
        from compression.artifact import Artifact
        from server.engine.model import FamilyModel

        artifact = Artifact(artifact_dir)
        names = names or {b: b for b in artifact.branches}
        branches = list(dict.fromkeys(names.values()))
        model = FamilyModel.from_artifact(artifact, branches, device=device, dtype=dtype)
        runner = FamilyRunner(model, max_batch, max_seq, prefill_chunk, static_decode, compile)
        tokenizers = {}
        for b in branches:
            path = artifact.branch_dir(b)
            tok = load_tokenizer(path)
            tokenizers[b] = (tok, frozenset(stop_token_ids(path, tok)))
        for exposed, b in names.items():
            tok, stops = tokenizers[b]
            self._expose(Target(exposed, "branch", runner, tok, stops, branches.index(b), defaults))
        self.runners.append(runner)
        return runner

    def add_standalone(self, name: str, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                       max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                       trust_remote_code: bool = False, defaults: dict | None = None) -> StandaloneRunner:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto",
                                                     trust_remote_code=trust_remote_code)
        model = model.to(device).eval()
        window = getattr(model.config, "sliding_window", None)
        if window and getattr(model.config, "use_sliding_window", True) is not False and max_seq > window:
            # The shared padded cache is only exact while nothing has slid out of the window.
            log.warning("%s: context limited to its sliding window of %d tokens (configured %d)", name, window,
                        max_seq)
            max_seq = window
        runner = StandaloneRunner(model, max_batch, max_seq, prefill_chunk)
        tok = load_tokenizer(path)
        self._expose(Target(name, "standalone", runner, tok, frozenset(stop_token_ids(path, tok)), 0, defaults))
        self.runners.append(runner)
        return runner

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="branchserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- requests
    def tokenizer(self, model: str):
        return self._target(model).tokenizer

    def _target(self, model: str) -> Target:
        try:
            return self.targets[model]
        except KeyError:
            raise UnknownModel(model) from None

    def waiting(self) -> int:
        return self._inbox.qsize() + sum(len(r.waiting) for r in self.runners)

    def running(self) -> int:
        return sum(len(r.running) for r in self.runners)

    def submit(self, model: str, prompt: list[int], params: SamplingParams, request_id: str | None = None
               ) -> RequestStream:
        target = self._target(model)
        runner = target.runner
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= runner.max_seq:
            raise ValueError(f"the prompt has {len(prompt)} tokens; {model}'s context is {runner.max_seq}")
        if self.waiting() >= self.max_waiting:
            raise EngineFull(f"{self.waiting()} requests are waiting; try again later")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        seq = Sequence(request_id or uuid.uuid4().hex, list(prompt), params, emit,
                       IncrementalText(target.tokenizer, params.stop), target.branch, target.stop_ids)
        self._inbox.put((runner, seq))
        self._wake.set()
        return RequestStream(seq, events, self._wake)

    # -- the engine thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    runner, seq = self._inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    runner.add(seq)
                except Exception as e:  # this request fails; the engine goes on
                    log.exception("could not queue request %s", seq.id)
                    seq.emit(Event("", [], "error", len(seq.prompt), 0, error=f"{type(e).__name__}: {e}"))
            busy = False
            for runner in self.runners:
                if runner.has_work():
                    busy = True
                    try:
                        runner.step()
                    except Exception as e:  # a failed step must not take the engine down
                        log.exception("engine step failed")
                        runner.fail_all(f"engine error: {type(e).__name__}: {e}")
            if not busy:
                self._wake.wait(0.1)
                self._wake.clear()
