"""Constrained decoding with xgrammar: a request's constraint becomes a compiled grammar, and each of its rows
gets a matcher whose token bitmask is applied to the row's logits before sampling.

- ``Constraint``: what a request asked for (a JSON schema, a regex, a choice of strings, or a
  raw EBNF grammar), hashable, so that compiled grammars are cached per (tokenizer, constraint).
- ``Grammars``: one per served tokenizer; ``compile`` runs in a worker thread (never on the engine thread), so a
  slow schema stalls nobody else. A constraint xgrammar cannot compile raises ``ConstraintError`` (a 400).
- ``Matcher``: one row's state on the engine thread: ``fill`` its bitmask row, ``accept`` the sampled token.

The grammar's end lets only the model's stop tokens through, so a constrained answer ends with the model's own
end of turn, as an unconstrained one does.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_SPEC_CHARS = 64_000  # a schema, regex or grammar larger than this is refused before compiling
MAX_CHOICES = 256
CACHE_SIZE = 128  # compiled grammars kept per tokenizer, at most
CACHE_BYTES = 256 * 2**20  # and at most this many bytes of them (xgrammar's own count)
WIRE_BYTES = 64 * 2**20  # serialized grammars kept for sending to Ray replicas
# Threads that compile constraints, for every model (renders and tokenizes never wait on them): one per 4 cores,
# at most 2. On 2 cores, two threads compiling expensive constraints left the engine one core or none.
COMPILE_WORKERS = max(1, min(2, (os.cpu_count() or 1) // 4))
COMPILE_QUEUE = 16  # constraints compiling or waiting to; past that a request gets 429
COMPILE_TIMEOUT_S = 10.0  # a constraint taking longer is refused (400), and refused at once if asked again
# Threads that work for constrained requests only run at a lower priority than the engine's forward (Linux
# nice values, per thread): under contention, constrained requests slow down before everyone's steps do.
COMPILE_NICE = int(os.environ.get("BRANCHSERVE_COMPILE_NICE", "10"))
FILL_NICE = int(os.environ.get("BRANCHSERVE_FILL_NICE", "5"))


def lower_priority(nice: int) -> None:
    """Run the calling thread (and the threads it starts) at ``nice`` (Linux; elsewhere nothing happens)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


class ConstraintError(ValueError):
    """A constraint that cannot be compiled; the message names the problem."""


class CompilerBusy(RuntimeError):
    """Too many constraints are compiling: try again shortly (429)."""


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json_schema" | "regex" | "choice" | "grammar"
    spec: str = ""  # the schema as JSON text, the regex, the choices as a JSON list, the EBNF

    @staticmethod
    def json_schema(schema) -> "Constraint":
        if isinstance(schema, str):
            _bounded(schema)
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e.msg}") from None
            except RecursionError:
                raise ConstraintError(f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be an object")
        check_schema(schema)
        return Constraint("json_schema", _bounded(json.dumps(schema)))  # keys in the caller's order: output order

    @staticmethod
    def regex(pattern: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("the regex is empty")
        check_regex(_bounded(pattern))
        return Constraint("regex", pattern)

    @staticmethod
    def choice(options) -> "Constraint":
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError("a choice is a non-empty list of non-empty strings")
        if len(options) > MAX_CHOICES:
            raise ConstraintError(f"at most {MAX_CHOICES} choices")
        return Constraint("choice", _bounded(json.dumps(list(dict.fromkeys(options)))))

    @staticmethod
    def grammar(ebnf: str) -> "Constraint":
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise ConstraintError("the grammar is empty")
        return Constraint("grammar", _bounded(ebnf))

    def describe(self) -> str:
        return self.kind.replace("_", " ")


MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema's objects and lists
MAX_REPEAT = 10_000  # the largest count a bounded repetition may expand to, nested ones multiplied
# Schema keywords xgrammar (0.2.9) leaves out of the grammar (checked: the grammar is the same without them):
# refused, rather than accepted and not enforced.
UNENFORCEABLE = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired")
BOUNDS = ("maxLength", "maxItems", "maxProperties", "minLength", "minItems", "minProperties")


def check_schema(schema: dict) -> None:
    """Refuse, before compiling, what xgrammar would not enforce or could not compile in bounded time: nesting
    deeper than MAX_SCHEMA_DEPTH, keywords it cannot enforce, a $ref outside the schema, length and item bounds
    whose product along a path exceeds MAX_REPEAT (each is expanded into that many grammar repetitions)."""
    stack = [(schema, 1, 1)]
    while stack:
        node, depth, repeat = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ConstraintError(f"the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            stack.extend((item, depth + 1, repeat) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        for key in UNENFORCEABLE:
            if isinstance(node.get(key), (dict, bool, list)):
                raise ConstraintError(f"the JSON schema uses {key!r}, which is not enforced while decoding")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise ConstraintError(f"the JSON schema's $ref {ref[:80]!r} points outside it: only local references "
                                  "(#/$defs/...) are followed")
        here = repeat
        for key in BOUNDS:
            value = node.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                here = max(here, repeat * value)
        if here > MAX_REPEAT:
            raise ConstraintError(f"the JSON schema's length and item bounds expand to {here} repetitions (nested "
                                  f"ones multiply); the limit is {MAX_REPEAT}")
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, here if key in ("items", "prefixItems", "properties",
                                                                  "additionalProperties") else repeat))


MAX_NESTED_REPEAT = 1_000  # the same inside another bounded repetition: xgrammar's cost grows far faster there


def check_regex(pattern: str) -> None:
    """Refuse a regex whose bounded repetitions xgrammar cannot compile in bounded time. Measured with SmolLM2's
    tokenizer (bench/RESULTS.md): ``.{1,9999}`` compiles in 1.2 s; ``(.{1,100}){1,10}`` in 0.6 s; ``(.{1,99}){1,99}``
    had not compiled after 10 minutes, and ``(.{1,999}){1,999}`` made each token's mask take seconds. So one
    bounded repetition may expand to MAX_REPEAT, nested ones (multiplied) to MAX_NESTED_REPEAT. Unbounded ``*``
    and ``+`` are loops and cost nothing extra."""
    levels = [[(1, False), (1, False)]]  # per open group: [largest (expansion, nested) in it, the last atom's]
    i, n = 0, len(pattern)

    def atom(value):
        levels[-1][1] = value
        levels[-1][0] = max(levels[-1][0], value)

    while i < n:
        c = pattern[i]
        if c == "\\":
            atom((1, False))
            i += 2
            continue
        if c == "[":  # a character class is one atom; skip to its end
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            atom((1, False))
            i = j + 1
            continue
        if c == "(":
            levels.append([(1, False), (1, False)])
        elif c == ")" and len(levels) > 1:
            inner = levels.pop()[0]
            atom(inner)
        elif c == "{":
            m = re.match(r"\{(\d+)(?:,(\d*))?\}", pattern[i:])
            if m:
                bound = max(int(m.group(2)) if m.group(2) else int(m.group(1)), 1)
                last, nested = levels[-1][1]
                value = (last * bound, nested or last > 1)
                limit = MAX_NESTED_REPEAT if value[1] else MAX_REPEAT
                if value[0] > limit:
                    raise ConstraintError(f"the regex's bounded repetitions expand to {value[0]}; the limit is "
                                          f"{limit}{' for repetitions inside repetitions' if value[1] else ''}")
                atom(value)
                i += m.end()
                continue
        else:
            atom((1, False))
        i += 1


def _bounded(text: str) -> str:
    if len(text) > MAX_SPEC_CHARS:
        raise ConstraintError(f"the constraint is {len(text)} characters; the limit is {MAX_SPEC_CHARS}")
    return text


def _first_line(e: Exception) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)[:300]  # xgrammar's "[time] file.cc:line: " prefix


# xgrammar (0.2.8) writes strings with a length bound as [^"\\\r\n]{m,n}, which lets control characters through
# unescaped; JSON forbids them, and json.loads refuses them. The EBNF is patched to the class its unbounded
# strings use.
_BOUNDED_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'


def json_schema_ebnf(schema: str) -> str:
    """The EBNF grammar of a JSON schema: compact separators (no runs of whitespace for a model to loop in)."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    return ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)


class Grammars:
    """Compiled grammars for one tokenizer (and its model's vocabulary size), cached per constraint."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids) or None)
        # One thread: the compile runs in the compile pool's own (low-priority) thread, whose CPU time the time
        # limit counts.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self._bytes = 0
        self._wire: OrderedDict[Constraint, str] = OrderedDict()  # serialized, for a Ray replica
        self._wire_bytes = 0
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled here
        self.loads = 0  # grammars compiled elsewhere and loaded here (a Ray replica's, from its ingress)

    def cached(self, constraint: Constraint):
        """The compiled grammar if it is cached, else None."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        return None

    def compile(self, constraint: Constraint):
        """-> an xgrammar CompiledGrammar. Blocking: call it from a worker thread (``CompilePool``)."""
        hit = self.cached(constraint)
        if hit is not None:
            return hit
        compiled = self._compile(constraint)
        self.compiles += 1
        return self._keep(constraint, compiled)

    def _keep(self, constraint: Constraint, compiled):
        size = getattr(compiled, "memory_size_bytes", 0)
        with self._lock:
            if constraint not in self._cache:
                self._cache[constraint] = compiled
                self._bytes += size
            while len(self._cache) > CACHE_SIZE or (self._bytes > CACHE_BYTES and len(self._cache) > 1):
                _, old = self._cache.popitem(last=False)
                self._bytes -= getattr(old, "memory_size_bytes", 0)
        return compiled

    def serialized(self, constraint: Constraint, compiled) -> str:
        """``compiled`` as xgrammar's JSON, for a process with the same tokenizer to load instead of compiling
        (kept for the constraints sent most recently, up to WIRE_BYTES). Blocking."""
        with self._lock:
            if constraint in self._wire:
                self._wire.move_to_end(constraint)
                return self._wire[constraint]
        text = compiled.serialize_json()
        with self._lock:
            if constraint not in self._wire:
                self._wire[constraint] = text
                self._wire_bytes += len(text)
            while self._wire_bytes > WIRE_BYTES and len(self._wire) > 1:
                _, old = self._wire.popitem(last=False)
                self._wire_bytes -= len(old)
        return text

    def load(self, constraint: Constraint, text: str):
        """The grammar ``serialized`` gave elsewhere, as a compiled one (cached like those compiled here)."""
        hit = self.cached(constraint)
        if hit is not None:
            return hit
        compiled = self._xgr.CompiledGrammar.deserialize_json(text, self.info)
        self.loads += 1
        return self._keep(constraint, compiled)

    def _compile(self, c: Constraint):
        try:
            if c.kind == "json_schema":
                return self.compiler.compile_grammar(json_schema_ebnf(c.spec))
            if c.kind == "regex":
                return self.compiler.compile_regex(c.spec)
            if c.kind == "choice":
                rule = " | ".join(json.dumps(o) for o in json.loads(c.spec))
                return self.compiler.compile_grammar(f"root ::= {rule}")
            if c.kind == "grammar":
                return self.compiler.compile_grammar(c.spec)
        except Exception as e:  # xgrammar says what it could not parse
            raise ConstraintError(f"the {c.describe()} cannot be compiled: {_first_line(e)}") from None
        raise ConstraintError(f"unknown constraint kind {c.kind!r}")

    def matcher(self, compiled) -> "Matcher":
        return Matcher(self._xgr.GrammarMatcher(compiled), self.vocab_size)


WALL_FACTOR = 6  # a compile starved of CPU this many times its limit, in wall time, is a 429 (load, not cost)


class CompileClock:
    """How long a compilation has run: CPU seconds of the thread that runs it (a busy machine or the thread's
    low priority does not make a constraint "too slow"), and when it started."""

    def __init__(self):
        self.started: float | None = None
        self._clock = None
        self._cpu0 = 0.0

    def start(self) -> None:
        try:
            self._clock = time.pthread_getcpuclockid(threading.get_ident())
            self._cpu0 = time.clock_gettime(self._clock)
        except (AttributeError, OSError):  # no per-thread CPU clock here: count wall time
            self._clock = None
        self.started = time.monotonic()

    def cpu(self) -> float:
        if self._clock is not None:
            try:
                return time.clock_gettime(self._clock) - self._cpu0
            except OSError:  # the thread has moved on: the compilation is over
                pass
        return time.monotonic() - self.started


class CompilePool:
    """Where constraints compile: a few threads of their own, a bounded queue, a time limit, and one compilation
    for identical constraints asked at once.

    A constraint may take ``timeout_s`` of compiling (CPU time of its thread, which runs at a low priority);
    past that its request gets a 400 saying so, and the same constraint is refused at once from then on (the
    thread finishes its work, but nobody waits for it again). One starved of CPU by load for ``WALL_FACTOR``
    times that gets a 429.
    More than ``queue`` compilations at once is a 429. Nothing here runs on the event loop or the engine thread,
    and the default executor (chat templates, tokenization) never waits behind a slow schema.
    """

    def __init__(self, workers: int = COMPILE_WORKERS, queue: int = COMPILE_QUEUE,
                 timeout_s: float = COMPILE_TIMEOUT_S):
        import concurrent.futures

        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="branchserve-compile",
                                                               initializer=lower_priority, initargs=(COMPILE_NICE,))
        self.queue, self.timeout_s = queue, timeout_s
        self._inflight: dict = {}  # (key, constraint) -> concurrent Future
        self._too_slow: OrderedDict = OrderedDict()  # (key, constraint) seen to pass the time limit
        self._lock = threading.Lock()

    def submit(self, key, constraint: Constraint, work):
        """The future of ``work()`` compiling ``constraint`` for ``key`` (a model's grammars): shared with any
        identical compilation in flight."""
        with self._lock:
            if (key, constraint) in self._too_slow:
                raise ConstraintError(self._slow_message(constraint))
            future = self._inflight.get((key, constraint))
            if future is not None:
                return future
            if len(self._inflight) >= self.queue:
                raise CompilerBusy(f"{len(self._inflight)} constraints are compiling; try again shortly")

            clock = CompileClock()  # the time limit is for compiling, not for waiting a turn or for the machine

            def timed():
                clock.start()
                return work()

            future = self._executor.submit(timed)
            future.clock = clock
            self._inflight[(key, constraint)] = future
        future.add_done_callback(lambda _: self._done(key, constraint))
        return future

    def _done(self, key, constraint) -> None:
        with self._lock:
            self._inflight.pop((key, constraint), None)

    def _slow_message(self, constraint: Constraint) -> str:
        return f"the {constraint.describe()} took longer than {self.timeout_s:g} s to compile: simplify it"

    async def run(self, key, constraint: Constraint, work):
        """Await ``work()`` through the pool, for at most ``timeout_s``."""
        import asyncio

        future = self.submit(key, constraint, work)
        waiting = asyncio.wrap_future(future)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:  # a fresh shield each time: wait_for cancels what it was given when it times out
                return await asyncio.wait_for(asyncio.shield(waiting), timeout=max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                clock = future.clock
                if clock.started is None:  # still waiting for a thread: the pool is busy, not this constraint slow
                    raise CompilerBusy(f"waited {self.timeout_s:g} s for a compile thread; try again shortly") \
                        from None
                used = clock.cpu()
                if used < self.timeout_s:
                    if time.monotonic() - clock.started > WALL_FACTOR * self.timeout_s:  # starved of CPU
                        raise CompilerBusy("the server is too busy to compile this constraint now; try again "
                                           "shortly") from None
                    deadline = time.monotonic() + max(self.timeout_s - used, 0.05)  # its full time, in CPU
                    continue
                with self._lock:
                    self._too_slow[(key, constraint)] = True
                    while len(self._too_slow) > 1024:
                        self._too_slow.popitem(last=False)
                raise ConstraintError(self._slow_message(constraint)) from None

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)


@dataclass(frozen=True)
class Compiled:
    """A compiled constraint, ready for the engine: each sequence that carries it gets its own matcher."""

    constraint: Constraint
    grammars: Grammars
    grammar: object  # xgrammar CompiledGrammar
    wire: str | None = None  # serialized, when it goes to a Ray replica (RemoteEngine.compile)

    def matcher(self) -> "Matcher":
        return self.grammars.matcher(self.grammar)


class Matcher:
    """One row's grammar state. Engine thread only."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def done(self) -> bool:
        """The grammar has ended (a stop token was accepted)."""
        return self.matcher.is_terminated()


@functools.lru_cache(maxsize=8)
def _bitmask(rows: int, vocab: int) -> torch.Tensor:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab)


@functools.lru_cache(maxsize=1)
def _batch_matcher():
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads=2)


def fill_masks(matchers: list[Matcher | None], vocab: int) -> tuple[torch.Tensor, list[int]]:
    """Every constrained row's bitmask of allowed tokens, in one call (xgrammar's batch matcher, its own
    threads): (bitmask (rows, words) on the host, the constrained rows). A step starts it before its forward,
    in a worker thread, so the fill runs while the model does. One step at a time fills (the engine thread)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    mask = _bitmask(len(matchers), vocab)
    _batch_matcher().batch_fill_next_token_bitmask([matchers[i].matcher for i in rows], mask, rows)
    return mask, rows


def apply_masks(logits: torch.Tensor, masks: tuple[torch.Tensor, list[int]]) -> torch.Tensor:
    """Mask each constrained row's logits (B, V) to the tokens its grammar allows; returns float32 logits."""
    import xgrammar as xgr

    mask, rows = masks
    logits = logits.float().contiguous()  # the CPU GEMM may hand back logits transposed; the kernel needs rows
    device_mask = mask if logits.device.type == "cpu" else mask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, device_mask, vocab_size=logits.shape[-1], indices=rows)
    return logits
