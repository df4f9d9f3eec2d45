"""The engine core: one thread owns every served model and runs two kinds of jobs, behind an asyncio API.

- generate jobs: sequences in each model's runner, stepped with continuous batching;
- embed jobs: a prefill-only forward that returns one layer's hidden states (the router's decoder
  embeddings), run between steps, bounded in tokens, cancellable like any request.

No other thread touches a model or a device. Input processing (chat templates,
tokenization) happens before ``submit``, in the caller's worker pool; output
processing (detokenization, stop strings) happens in ``RequestStream`` on the
caller's event loop, never on the engine thread.

    engine = Engine()
    engine.add_family("artifacts/fam", device="cpu")          # exposes each branch by name
    engine.add_standalone("phi3", "models/phi3")
    engine.start()
    stream = engine.submit("math", prompt_ids, SamplingParams(temperature=0))
    async for event in stream: ...                            # text deltas, then a finish reason
    stream.cancel()                                           # frees its blocks at the next step
    states = await engine.embed("math", token_ids, layer=-1)  # (L, H) hidden states, on the host

``submit`` checks everything it can (model name, prompt length, queue room)
before returning, so a caller can answer a bad request before streaming.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.engine.kv_cache import BLOCK_SIZE, split_kv
from server.engine.openmp import release_team
from server.engine.runner import FamilyRunner, Runner, StandaloneRunner
from server.engine.scheduler import Admission, Reservation
from server.engine.sequence import Event, Sequence
from server.engine.sampling import SamplingParams
from server.engine.stream import ENGINE_UNAVAILABLE, LIVENESS_POLL_S, RequestStream, deliver
from server.engine.text import load_tokenizer, stop_token_ids

log = logging.getLogger("branchserve.engine")


def _graphs(wanted: bool, device: torch.device, name: str) -> bool:
    """limits.cuda_graphs for one model: CUDA graphs exist on CUDA only; elsewhere its steps run as they did."""
    if wanted and device.type != "cuda":
        log.warning("%s: limits.cuda_graphs applies to models on CUDA; on %s its steps run eagerly", name, device)
    return wanted and device.type == "cuda"


class UnknownModel(KeyError):
    pass


class EngineUnavailable(RuntimeError):
    """The engine thread has died, or is stuck in a step: nothing queued now would ever be answered."""


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
    _grammars: object | None = None
    _grammars_lock: threading.Lock = field(default_factory=threading.Lock)

    def grammars(self):
        """This target's structured.Grammars (built on first use: it reads the whole vocabulary). Blocking."""
        from server.engine.structured import Grammars

        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.runner.vocab_size, sorted(self.stop_ids))
            return self._grammars


@dataclass
class EmbedJob:
    target: "Target"
    tokens: list[int]
    layer: int
    future: concurrent.futures.Future


class EngineBase:
    """What the API asks of an engine, whether it runs in this process (Engine) or behind Ray Serve
    (server/ray_app.py): targets by name, admission, prompt checks, grammars and embeddings."""

    def __init__(self, max_waiting: int, max_embed_tokens: int = 8448):
        from server.engine.structured import CompilePool

        self.targets: dict[str, Target] = {}
        self.admission = Admission(max_waiting)
        self.max_embed_tokens = max_embed_tokens
        self.compile_pool = CompilePool()

    def tokenizer(self, model: str):
        return self._target(model).tokenizer

    def _target(self, model: str) -> Target:
        try:
            return self.targets[model]
        except KeyError:
            raise UnknownModel(model) from None

    def _key(self, target: Target):
        """The admission key of ``target``: its runner."""
        return id(target.runner)

    def waiting(self) -> int:
        """Sequences admitted beyond their runner's batch: the queue that ``max_waiting`` bounds."""
        return self.admission.queued()

    def reserve(self, model: str) -> Reservation:
        """Admit a request that will submit its sequences later (a pipeline's stages, each under this
        reservation): EngineFull now if ``model`` would not admit one more, never later."""
        key = self._key(self._target(model))
        self.admission.admit(key)
        return Reservation(self.admission, key)

    @staticmethod
    def check_prompt(model: str, target: Target, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= target.runner.max_seq:
            raise ValueError(f"the prompt has {len(prompt)} tokens; {model}'s context is {target.runner.max_seq}")

    def check_embed(self, tokens: list[int]) -> None:
        if not tokens:
            raise ValueError("nothing to embed")
        if len(tokens) > self.max_embed_tokens:
            raise ValueError(f"{len(tokens)} tokens to embed; the limit is {self.max_embed_tokens}")

    def compile_now(self, model: str, constraint):
        """A structured.Constraint compiled for ``model``'s tokenizer -> a structured.Compiled to put in
        SamplingParams.grammar. Blocking; raises ConstraintError."""
        from server.engine.structured import Compiled

        grammars = self._target(model).grammars()
        return Compiled(constraint, grammars, grammars.compile(constraint))

    async def load_compiled(self, model: str, constraint, wire: str):
        """A constraint compiled elsewhere for ``model``'s tokenizer (``Compiled.wire``, from a Ray ingress),
        loaded in a worker thread instead of compiled again."""
        from server.engine.structured import Compiled

        grammars = self._target(model).grammars()
        return Compiled(constraint, grammars, await asyncio.to_thread(grammars.load, constraint, wire))

    async def compile(self, model: str, constraint):
        """``compile_now`` in the compile pool (structured.CompilePool): never on the engine thread, the event
        loop or the executor that renders and tokenizes; bounded in time (ConstraintError past it) and in
        number (CompilerBusy)."""
        from server.engine.structured import Compiled

        target = self._target(model)
        grammars = target._grammars
        if grammars is not None:
            hit = grammars.cached(constraint)
            if hit is not None:  # no thread for what is cached
                return Compiled(constraint, grammars, hit)
        return await self.compile_pool.run(id(target), constraint, lambda: self.compile_now(model, constraint))

    def embed_future(self, model: str, tokens: list[int], layer: int = -1) -> concurrent.futures.Future:
        raise NotImplementedError

    async def embed(self, model: str, tokens: list[int], layer: int = -1):
        """As ``embed_future``, awaited; cancelling the awaiting task cancels the job. Raises EngineUnavailable
        when the engine stops answering while it waits."""
        future = self.embed_future(model, tokens, layer)
        waiting = asyncio.wrap_future(future)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), timeout=LIVENESS_POLL_S)
            except asyncio.TimeoutError:
                problem = self.problem()
                if problem is not None:
                    future.cancel()
                    raise EngineUnavailable(problem) from None
            except asyncio.CancelledError:
                future.cancel()
                raise

    def problem(self) -> str | None:
        """Why the engine cannot answer now, or None (see Engine.problem)."""
        return None


FAILED_STEPS_UNHEALTHY = 3  # steps failing in a row before /health says the engine is not answering
DEFAULT_CPU_KV_BYTES = 2 * 2**30  # the KV budget on the CPU when limits.kv_cache_memory is not set
GPU_MEMORY_UTILIZATION = 0.9  # on CUDA by default, keys and values take what loading left of 90% of the memory


class Engine(EngineBase):
    def __init__(self, max_waiting: int = 256, max_embed_tokens: int = 8448, kv_cache_memory: int | None = None,
                 step_timeout_s: float = 300.0, request_timeout_s: float | None = None):
        """``kv_cache_memory``: bytes of keys and values per device, split between the models on it (default:
        ``DEFAULT_CPU_KV_BYTES`` on the CPU; on CUDA what is free of ``GPU_MEMORY_UTILIZATION`` of the memory
        once every model is loaded). ``step_timeout_s``: a step running longer than this makes the engine
        unavailable (``problem``) until it ends; ``request_timeout_s``: the longest a request may run."""
        super().__init__(max_waiting, max_embed_tokens)
        self.kv_cache_memory = kv_cache_memory
        self.step_timeout_s, self.request_timeout_s = step_timeout_s, request_timeout_s
        self._busy_since: float | None = None  # when the engine thread's current step (or embed batch) began
        self._failed_steps = 0  # steps in a row that raised
        self._last_failure = ""
        self._dead: str | None = None  # why the engine thread ended, when it ended on its own
        self.runners: list[Runner] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: list = []  # (event loop, queue, event, sequence) emitted during a step, engine thread only
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set by the engine thread once its warm-up is done
        self.start_error: BaseException | None = None
        self._draining: str | None = None  # set by drain(): every sequence ends with this error

    # -- configuration
    def _add_runner(self, runner: Runner) -> None:
        self.runners.append(runner)
        self.admission.add(id(runner), runner.max_batch)

    def _expose(self, target: Target) -> None:
        if target.name in self.targets:
            raise ValueError(f"model name {target.name!r} is used twice")
        self.targets[target.name] = target

    def add_family(self, artifact_dir: str | Path, names: dict[str, str] | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, max_batch: int = 16, max_seq: int = 2048,
                   prefill_chunk: int = 256, defaults: dict | None = None, compile: bool = False,
                   cuda_graphs: bool = False) -> FamilyRunner:
        """Serve an artifact's branches; ``names`` maps exposed name -> branch (default: every branch as itself)."""
        from compression.artifact import Artifact
        from server.engine.model import FamilyModel

        artifact = Artifact(artifact_dir)
        names = names or {b: b for b in artifact.branches}
        branches = list(dict.fromkeys(names.values()))
        model = FamilyModel.from_artifact(artifact, branches, device=device, dtype=dtype)
        runner = FamilyRunner(model, max_batch, max_seq, prefill_chunk, compile,
                              graphs=_graphs(cuda_graphs, model.device, str(artifact_dir)))
        tokenizers = {}
        for b in branches:
            path = artifact.branch_dir(b)
            tok = load_tokenizer(path)
            tokenizers[b] = (tok, frozenset(stop_token_ids(path, tok)))
        for exposed, b in names.items():
            tok, stops = tokenizers[b]
            self._expose(Target(exposed, "branch", runner, tok, stops, branches.index(b), defaults))
        self._add_runner(runner)
        return runner

    def add_standalone(self, name: str, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                       max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                       trust_remote_code: bool = False, defaults: dict | None = None,
                       compile: bool = False, cuda_graphs: bool = False) -> StandaloneRunner:
        from server.engine.phi3small import Phi3SmallForCausalLM, load_causal_lm

        model = load_causal_lm(path, dtype, device, trust_remote_code)
        if compile and isinstance(model, Phi3SmallForCausalLM):
            log.warning("%s: limits.compile does not apply to Phi-3-small yet; its steps run eagerly", name)
            compile = False
        if cuda_graphs and isinstance(model, Phi3SmallForCausalLM):
            log.warning("%s: limits.cuda_graphs does not apply to Phi-3-small yet; its steps run eagerly", name)
            cuda_graphs = False
        window = getattr(model.config, "sliding_window", None)
        if window and getattr(model.config, "use_sliding_window", True) is not False and max_seq > window:
            # The engine's attention has no window: it is exact while nothing has slid out of it.
            log.warning("%s: context limited to its sliding window of %d tokens (configured %d)", name, window,
                        max_seq)
            max_seq = window
        runner = StandaloneRunner(model, max_batch, max_seq, prefill_chunk, compile=compile,
                                  graphs=_graphs(cuda_graphs, model.device, name))
        tok = load_tokenizer(path)
        self._expose(Target(name, "standalone", runner, tok, frozenset(stop_token_ids(path, tok)), 0, defaults))
        self._add_runner(runner)
        return runner

    # -- lifecycle
    def allocate_kv(self) -> None:
        """Size and allocate every runner's KV cache: each device's budget split evenly between its models,
        none given more than its worst case (every sequence at its full context), what that leaves going to
        the others."""
        by_device: dict = {}
        for runner in self.runners:
            by_device.setdefault(str(runner.device), []).append(runner)
        for device, runners in by_device.items():
            budget = self.kv_cache_memory
            if budget is None and device.startswith("cuda"):
                torch.cuda.empty_cache()  # what loading's temporaries left in torch's cache is free for the KV
                free, total = torch.cuda.mem_get_info(torch.device(device))
                budget = int(free - (1 - GPU_MEMORY_UTILIZATION) * total)
            elif budget is None:
                budget = DEFAULT_CPU_KV_BYTES
            blocks = split_kv(budget, [(r.worst_case_tokens(), r.kv_bytes_per_token()) for r in runners])
            for runner, n in zip(runners, blocks):
                runner.allocate(n * BLOCK_SIZE * runner.kv_bytes_per_token(), budget)
        for line in self.kv_report():
            log.info("%s", line)

    def kv_report(self) -> list[str]:
        """A line per model: its KV capacity in tokens and bytes."""
        lines = []
        for runner in self.runners:
            if runner.pool is None:
                continue
            names = ", ".join(t.name for t in self.targets.values() if t.runner is runner)
            tokens = runner.pool.capacity
            lines.append(f"KV cache for {names}: {tokens} tokens in {runner.pool.usable} blocks of "
                         f"{runner.pool.block_size} ({tokens * runner.kv_bytes_per_token() / 2**30:.2f} GiB); "
                         f"context {runner.max_seq}, {tokens // runner.max_seq} sequences at full context")
        return lines

    def kv_usage(self) -> list[tuple[str, int, int, int]]:
        """(model names, blocks in use, blocks, capacity in tokens) per runner: what /metrics reports."""
        return [(",".join(t.name for t in self.targets.values() if t.runner is r), r.pool.used, r.pool.usable,
                 r.pool.capacity) for r in self.runners if r.pool is not None]

    def start(self) -> None:
        """Allocate the KV caches, then start the engine thread; it prepares every runner's steps (compile)
        before taking work, and ``ready`` is set once it has."""
        self.allocate_kv()
        release_team()  # the loading thread's OpenMP workers: the engine thread's team is to be the only one
        self._thread = threading.Thread(target=self._loop, name="branchserve-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the warm-up is done; raises what it raised."""
        if not self.ready.wait(timeout):
            raise TimeoutError("the engine warm-up did not finish in time")
        if self.start_error is not None:
            raise self.start_error

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def problem(self) -> str | None:
        """Why the engine cannot answer requests now, or None: its thread has ended, a step has run past
        ``step_timeout_s``, or the last steps all failed. /health says it, and waiting requests end with it."""
        if self._dead is not None:
            return f"{ENGINE_UNAVAILABLE}: {self._dead}"
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return f"{ENGINE_UNAVAILABLE}: its thread has ended"
        since = self._busy_since
        if since is not None and time.monotonic() - since > self.step_timeout_s:
            return (f"{ENGINE_UNAVAILABLE}: a step has run for {time.monotonic() - since:.0f} s "
                    f"(limits.step_timeout_s is {self.step_timeout_s:g})")
        if self._failed_steps >= FAILED_STEPS_UNHEALTHY:
            return f"{ENGINE_UNAVAILABLE}: the last {self._failed_steps} steps failed ({self._last_failure})"
        return None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def drain(self, message: str) -> None:
        """End every sequence, running or queued, with an error event saying ``message`` (shutdown: the
        clients get an answer before the connections are cut)."""
        self._draining = message
        self._wake.set()

    # -- requests
    def running(self) -> int:
        return sum(len(r.running) for r in self.runners)

    def submit(self, model: str, prompt: list[int], params: SamplingParams, request_id: str | None = None,
               admitted: bool = False, reservation: Reservation | None = None) -> RequestStream:
        """Queue a sequence. ``admitted``: it continues a request already admitted elsewhere (a Ray ingress), so
        the queue bound does not refuse it; ``reservation``: it runs under a place its request holds (a
        pipeline's stage), so it is neither counted nor released on its own."""
        target = self._target(model)
        runner = target.runner
        self.check_prompt(model, target, prompt)
        problem = self.problem()
        if problem is not None:
            raise EngineUnavailable(problem)
        loop = asyncio.get_running_loop()
        counted = reservation is None
        if counted:
            self.admission.admit(id(runner), force=admitted)
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: Event) -> None:  # on the engine thread: delivered in one batch per step (_flush)
            if event.finish_reason is not None and counted:
                self.admission.release(id(runner))
            self._outbox.append((loop, events, event, seq))

        seq = Sequence(request_id or uuid.uuid4().hex, list(prompt), params, emit, target.branch, target.stop_ids)
        self._inbox.put((runner, seq))
        self._wake.set()
        return RequestStream(seq, events, self._wake, target.tokenizer, self.problem, self.request_timeout_s)

    def embed_future(self, model: str, tokens: list[int], layer: int = -1) -> concurrent.futures.Future:
        """Queue an embed job: ``model``'s hidden states at ``layer`` for ``tokens`` -> a future of an (L, H)
        float32 tensor on the host. Cancelling the future before the engine reaches it drops the job."""
        target = self._target(model)
        self.check_embed(tokens)
        problem = self.problem()
        if problem is not None:
            raise EngineUnavailable(problem)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(EmbedJob(target, list(tokens), layer, future))
        self._wake.set()
        return future

    # -- the engine thread
    def _run_embeds(self, jobs: list[EmbedJob]) -> None:
        """Every waiting embed job, batched per model and layer: one right-padded forward each."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drops those cancelled while waiting
        groups: dict[tuple[int, int], list[EmbedJob]] = {}
        for job in jobs:
            groups.setdefault((id(job.target.runner), job.layer), []).append(job)
        for group in groups.values():
            for batch in self._embed_batches(group):
                try:
                    states = self._hidden(batch)
                except Exception as e:  # these jobs fail alone
                    log.exception("embed job failed")
                    for job in batch:
                        job.future.set_exception(e)
                    continue
                for job, s in zip(batch, states):
                    job.future.set_result(s.float().cpu())

    def _embed_batches(self, jobs: list[EmbedJob]) -> list[list[EmbedJob]]:
        """Jobs packed into forwards of at most ``max_embed_tokens`` padded tokens each (rows x the longest),
        shortest first: a request of 256 long inputs is several bounded forwards, not one of 100k tokens."""
        batches, current, longest = [], [], 0
        for job in sorted(jobs, key=lambda j: len(j.tokens)):
            n = len(job.tokens)
            if current and (len(current) + 1) * max(longest, n) > self.max_embed_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(job)
            longest = max(longest, n)
        return batches + [current] if current else batches

    @staticmethod
    def _hidden(jobs: list[EmbedJob]) -> list[torch.Tensor]:
        target = jobs[0].target
        model, layer = target.runner.model, jobs[0].layer
        tokens = [j.tokens for j in jobs]
        if target.kind == "branch":
            return model.hidden(tokens, [j.target.branch for j in jobs], layer)
        longest = max(len(t) for t in tokens)
        ids = torch.tensor([t + [0] * (longest - len(t)) for t in tokens], device=model.device)  # right padding
        with torch.inference_mode():  # the head only for the last position: logits for every token of a
            # batch of long inputs were most of its memory (vocabulary x tokens)
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        return [out.hidden_states[layer][i, :len(t)] for i, t in enumerate(tokens)]

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the thread ends: say why, and end everything it held
            self._dead = f"the engine thread ended: {type(e).__name__}: {e}"
            log.exception("the engine thread ended")
            raise
        finally:
            if not self._stop.is_set() and self.ready.is_set() and self.start_error is None:
                self._dead = self._dead or "the engine thread ended"
                self._fail_everything(f"{ENGINE_UNAVAILABLE}: {self._dead}")

    def _fail_everything(self, message: str) -> None:
        """End every sequence and embed job the engine holds or has queued (its thread is ending)."""
        for runner in self.runners:
            runner.fail_all(message)
        for item in self._take_inbox():
            if isinstance(item, EmbedJob):
                item.future.set_exception(EngineUnavailable(message))
            else:
                item[1].emit(Event("", [], "error", len(item[1].prompt), 0, error=message))
        self._flush()

    def _take_inbox(self):
        """What other threads have queued for the engine thread (requests and embed jobs), as it comes."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _serve(self) -> None:
        try:
            for runner in self.runners:
                runner.warm_up()
        except BaseException as e:  # reported by wait_ready; the engine takes no work
            log.exception("engine warm-up failed")
            self.start_error = e
            self.ready.set()
            return
        self.ready.set()
        while not self._stop.is_set():
            embeds = []
            for item in self._take_inbox():
                if isinstance(item, EmbedJob):
                    embeds.append(item)
                    continue
                runner, seq = item
                if self._draining:
                    seq.emit(Event("", [], "error", len(seq.prompt), 0, error=self._draining))
                    continue
                try:
                    runner.add(seq)
                except Exception as e:  # this request fails; the engine goes on
                    log.exception("could not queue request %s", seq.id)
                    seq.emit(Event("", [], "error", len(seq.prompt), 0, error=f"{type(e).__name__}: {e}"))
            if embeds and self._stop.is_set():
                for job in embeds:
                    job.future.cancel()
            elif embeds:  # bounded prefill-only forwards, batched, between steps
                self._busy_since = time.monotonic()
                self._run_embeds(embeds)
                self._busy_since = None
            busy = bool(embeds)
            if self._draining:
                for runner in self.runners:
                    if runner.has_work():
                        runner.fail_all(self._draining)
                self._flush()
            for runner in self.runners:
                if self._stop.is_set():
                    break
                if runner.has_work():
                    busy = True
                    self._busy_since = time.monotonic()
                    try:
                        runner.step()
                        self._failed_steps = 0
                    except Exception as e:  # a failed step must not take the engine down
                        log.exception("engine step failed")
                        self._failed_steps += 1
                        self._last_failure = f"{type(e).__name__}: {e}"[:200]
                        runner.fail_all(f"engine error: {type(e).__name__}: {e}")
                    finally:
                        self._busy_since = None
                    self._flush()
            self._flush()
            if not busy:
                self._wake.wait(0.1)
                self._wake.clear()

    def _flush(self) -> None:
        """Hand a step's events to their event loops: one thread-safe call per loop, not one per token."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict = {}
        for loop, events, event, seq in items:
            by_loop.setdefault(loop, []).append((events, event, seq))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, batch)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                for _, _, seq in batch:
                    seq.cancelled.set()
