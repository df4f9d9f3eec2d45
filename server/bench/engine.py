"""`branchserve bench engine`: tokens/s of the same engine for dense, one branch and N branches mixed.

The family is synthetic (random weights of any shape, built in memory, never
written to disk) and goes through the same loader and runner as a served
artifact. "dense" is that engine on a family with no residual at all: the
cost of one plain model. With ``--hf-baseline PATH`` it also runs transformers'
``generate`` and our engine on that checkpoint's very weights, and 16
concurrent requests against the same 16 run one after another.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from compression.artifact import Residual, SingleCheckpoint
from compression.plan import is_compressed, rank_for_rate
from compression.report import text_table
from server.engine.kv_cache import BLOCK_SIZE, kv_bytes_per_token
from server.engine.model import DenseBranches, FamilyModel, PerBranch, single_branch
from server.engine.runner import FamilyRunner
from server.engine.sequence import Sequence
from server.engine.sampling import SamplingParams

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


# -- what a decode step must move: the byte model the bandwidth column divides by
def linear_read_bytes(m, branches: list[int]) -> int:
    """Bytes of weight one forward of a BranchLinear or DenseBranches reads for rows of ``branches``: the trunk
    and one branch's residual, or every residual (a mix); each present branch's dense weight."""
    size = m.weight.element_size()
    if isinstance(m, DenseBranches):
        return len(set(branches)) * m.weight[0].numel() * size
    single = single_branch(branches)
    n_in = m.weight.shape[1]
    if single is None:
        return (m.weight.numel() + sum(m.u(j).numel() for j, (_, r) in enumerate(m.h_spans) if r)) * size
    residual = sum(m.spans[j][single][1] * (n_in + width) for j, (_, width) in enumerate(m.out_spans))
    return (m.trunk_rows * n_in + residual) * size


def step_read_bytes(model: FamilyModel, branches: list[int], span: int) -> int:
    """Bytes one decode step over rows of ``branches`` must read: the weights those branches use, each once, and
    every row's cached keys and values over the step's ``span`` (row i reads cache row i up to the span). Norms
    and the embedding rows are left out: they are under 0.1 % at every shape."""
    total = 0
    for block in model.blocks:
        total += sum(linear_read_bytes(m, branches) for m in (block.qkv, block.o, block.gate_up, block.down))
    head = model.heads or model.embed
    if isinstance(head, PerBranch):
        total += (1 if head.shared else len(set(branches))) * head.weight[0].numel() * head.weight.element_size()
    else:
        total += linear_read_bytes(head, branches)
    cfg = model.cfg
    per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    return total + len(branches) * span * per_token


def weight_bytes(model: FamilyModel) -> int:
    """Bytes of every weight and buffer the model holds (each storage once), without the KV cache."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


COPY_OPS = {"aten.index_select", "aten.index", "aten.clone", "aten.copy_", "aten._to_copy", "aten.cat",
            "aten.stack", "aten.repeat_interleave", "aten.gather", "aten.contiguous", "aten.repeat",
            "aten._unsafe_index", "aten.expand_copy", "aten.slice_copy"}


def kv_copied_bytes(runner: FamilyRunner, step) -> int:
    """Bytes of KV cache that ``step()`` copies: the output bytes of every copying aten op that reads the
    cache's storage (an index_select gather, a contiguous(), a GQA expand...). Writing new keys into the cache
    is not a copy of it. Measured by watching the ops the step really dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    caches = {t.untyped_storage().data_ptr() for t in runner.model.k_cache + runner.model.v_cache}

    def reads_cache(func, args, kwargs) -> bool:
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func.__name__.startswith("copy_"):  # copy_(dst, src): a copy of the cache if src is the cache
            tensors = tensors[1:2]
        return any(t.untyped_storage().data_ptr() in caches for t in tensors)

    class Watch(TorchDispatchMode):
        copied = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func.overloadpacket) in COPY_OPS and reads_cache(func, args, kwargs or {}):
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in caches:
                        Watch.copied += t.numel() * t.element_size()
            return out

    with Watch():
        step()
    return Watch.copied


class RandomFamily:
    """An in-memory family with the Artifact interface: random trunk, scales and rank-r residuals."""

    def __init__(self, shape: str, branches: int, rate: float | None, device, dtype, seed: int = 0,
                 embeddings: bool = False, overrides: dict | None = None):
        """``overrides``: config keys over the shape's (another layer count, say)."""
        self.embeddings = embeddings
        self.config = dict(SHAPES[shape], model_type="llama", architectures=["LlamaForCausalLM"],
                           rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                           **(overrides or {}))
        self.branches = [f"branch{i}" for i in range(branches)]
        self.dtype, self.device, self.rate = dtype, device, rate
        self.gen = torch.Generator(device=device).manual_seed(seed)
        h, i, v = self.config["hidden_size"], self.config["intermediate_size"], self.config["vocab_size"]
        kv = h // self.config["num_attention_heads"] * self.config["num_key_value_heads"]
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                  "mlp.down_proj": (h, i)}
        self.shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
        for layer in range(self.config["num_hidden_layers"]):
            for name, shp in shapes.items():
                self.shapes[f"model.layers.{layer}.{name}.weight"] = shp
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.shapes[f"model.layers.{layer}.{norm}.weight"] = (h,)
        self.tensor_names = list(self.shapes)

    def _randn(self, *shape, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, device=self.device) * std).to(self.dtype)

    def check_branch(self, branch):
        pass

    def is_compressed(self, name):
        return is_compressed(name, self.shapes[name], self.embeddings)

    def trunk(self, name):
        m, n = self.shapes[name]
        return self._randn(m, n, std=1 / math.sqrt(m * n))  # unit Frobenius norm, like a normalized trunk

    def scale(self, branch, name):
        return math.sqrt(self.shapes[name][0])

    def residual(self, branch, name):
        m, n = self.shapes[name]
        r = 0 if self.rate is None else rank_for_rate(m, n, self.rate)
        if r == 0:
            return Residual("none")
        return Residual("lowrank", U=self._randn(m, r, std=0.1 / math.sqrt(m * r)), V=self._randn(r, n, std=1.0))

    def own(self, branch, name):
        shape = self.shapes[name]
        return torch.ones(shape, dtype=self.dtype, device=self.device) if len(shape) == 1 \
            else self._randn(*shape, std=0.02)


def run_batch(runner: FamilyRunner, prompts: list[list[int]], branches: list[int], new_tokens: int,
              watch_copies: bool = False, counted: int | None = None) -> dict:
    """Generate ``new_tokens`` for every prompt at once; decode tok/s counts only steps without prefill, and
    only the first ``counted`` rows' tokens (default: all). ``watch_copies``: also measure the KV bytes one
    decode step copies (on a step that is not timed)."""
    seqs = []
    for i, (prompt, branch) in enumerate(zip(prompts, branches)):
        seq = Sequence(str(i), prompt, SamplingParams(max_tokens=new_tokens, temperature=0), lambda ev: None,
                       branch)
        runner.add(seq)
        seqs.append(seq)
    decode_s = decode_tokens = 0.0
    copied = None
    _sync(runner.device)
    started = time.perf_counter()
    while runner.has_work():
        prefilling = bool(runner.waiting) or any(s.length - s.computed > 1 for s in runner.running)
        before = sum(len(s.output) for s in seqs[:counted])
        if watch_copies and copied is None and not prefilling:
            t0 = time.perf_counter()
            copied = kv_copied_bytes(runner, runner.step)
            started += time.perf_counter() - t0  # the watched step is not timed
            continue
        t0 = time.perf_counter()
        runner.step()
        _sync(runner.device)
        if not prefilling:
            decode_s += time.perf_counter() - t0
            decode_tokens += sum(len(s.output) for s in seqs[:counted]) - before
    total_s = time.perf_counter() - started
    generated = sum(len(s.output) for s in seqs)
    return {"tokens": generated, "seconds": total_s, "tok_s": generated / total_s,
            "decode_tok_s": decode_tokens / decode_s if decode_s else None, "kv_copied_bytes": copied}


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of a large buffer: the rate a
    decode step that streams its weights could at best read them at."""
    nbytes = (2 << 30) if device.type == "cuda" else (512 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_to_first_token(runner: FamilyRunner, length: int, vocab: int, tries: int = 3) -> float:
    """Seconds from a request's arrival to its first token, alone in the engine (best of ``tries``)."""
    return min(run_batch(runner, _prompts(1, length, vocab, 2 + i), [0], 1)["seconds"] for i in range(tries))


def cache_tokens(args, batch: int, mixed: bool) -> int:
    """KV tokens a configuration's runs at ``batch`` hold at once, each sequence's last block whole: the timed
    batch, the time-to-first-token prompt at batch 1, and for the mixed family at ``args.batch``, the
    mixed-lengths run's long row beside its short ones."""
    def blocks(tokens: int) -> int:
        return -(-(tokens + 1) // BLOCK_SIZE) * BLOCK_SIZE

    need = batch * blocks(args.prompt + args.new_tokens)
    if batch == 1:
        need = max(need, blocks(args.ttft_prompt))
    if mixed and args.long and batch == args.batch:
        need += args.long_rows * blocks(args.long + beside_tokens(args))
    return need


def bench_engine(args) -> dict:
    """Every configuration is loaded at once and the configurations take turns, ``args.rounds`` rounds of one
    timed batch each: a ratio to dense is the median of ratios within a round, so a machine whose speed drifts
    over minutes (a shared VM) moves both sides of it alike."""
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    if args.long_only:
        return bench_mixed_lengths(args, device, dtype)
    copy_bw = copy_bandwidth(device)
    results = []
    max_seq = max(args.prompt + args.new_tokens, args.ttft_prompt, args.long + beside_tokens(args)) + 1
    configs = [("dense", None, 1), ("one branch", args.rate, 1), (f"{args.branches} branches mixed", args.rate,
                                                                     args.branches)]
    models = {}
    for label, rate, n_branches in configs:
        source = RandomFamily(args.shape, n_branches if rate is not None else 1, rate, device, dtype,
                              embeddings=args.compress_embeddings and rate is not None)
        models[label] = (FamilyModel.from_artifact(source, device=device, dtype=dtype), n_branches)
    vocab = SHAPES[args.shape]["vocab_size"]
    report_long = None
    for batch in (1, args.batch):
        runners, rounds = {}, {label: [] for label in models}
        for label, (model, n_branches) in models.items():
            runner = FamilyRunner(model, max_batch=batch, max_seq=max_seq,
                                  prefill_chunk=max(512, args.prompt, args.ttft_prompt), compile=args.compile,
                                  graphs=args.cuda_graphs)
            # The three are held together: each cache holds what its runs use, not batch x max_seq (with --long
            # 8000 at llama3-8b's shape that would be 34 GB each).
            runner.allocate(cache_tokens(args, batch, label == configs[-1][0]) * runner.kv_bytes_per_token())
            t0 = time.perf_counter()
            runner.warm_up()  # compiles the steps, as the server does before it is ready
            warm_s = time.perf_counter() - t0
            branches = [i % n_branches for i in range(batch)]
            run_batch(runner, _prompts(batch, args.prompt, vocab, 1), branches, 4)  # warm-up (kernels, allocator)
            runners[label] = (runner, branches, warm_s)
        for i in range(args.rounds):
            for label, (runner, branches, _) in runners.items():
                rounds[label].append(run_batch(runner, _prompts(batch, args.prompt, vocab), branches,
                                               args.new_tokens, watch_copies=i == 0))
        for label, (runner, branches, warm_s) in runners.items():
            model = runner.model
            r = dict(rounds[label][0], warm_up_s=warm_s, rounds=[x["decode_tok_s"] for x in rounds[label]])
            r["decode_tok_s"] = statistics.median(r["rounds"])
            r["vs_dense"] = statistics.median(x["decode_tok_s"] / d["decode_tok_s"]
                                              for x, d in zip(rounds[label], rounds["dense"]))
            # Bytes per decode step at the run's mean context; steps/s = tokens/s / batch.
            context = args.prompt + args.new_tokens // 2
            r["read_bytes"] = step_read_bytes(model, branches, context) + (r["kv_copied_bytes"] or 0)
            r["read_bytes_per_s"] = r["read_bytes"] * r["decode_tok_s"] / batch
            r["of_copy_bandwidth"] = r["read_bytes_per_s"] / copy_bw
            r["weight_bytes"] = weight_bytes(model)
            if runner.graphs is not None:  # whether the timed steps really went through the buckets
                r["decode_graphs"] = {"enabled": runner.graphs.enabled, "buckets": len(runner.graphs.static),
                                      "captured": any(s.graph is not None for s in runner.graphs.static.values()),
                                      "replays": runner.graphs.replays}
            if batch == 1:
                r["ttft_s"] = time_to_first_token(runner, args.ttft_prompt, vocab)
            results.append({"config": label, "batch": batch, **r})
            if args.long and batch == args.batch and label == configs[-1][0]:
                report_long = mixed_lengths(runner, args, vocab, branches)
        del runners
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    model = models[configs[-1][0]][0]  # the mixed family, for the memory report; the others are let go
    models.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "rate": args.rate,
              "compress_embeddings": args.compress_embeddings, "compile": args.compile,
              "cuda_graphs": args.cuda_graphs,
              "branches": args.branches, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "ttft_prompt": args.ttft_prompt, "rounds": args.rounds, "copy_bytes_per_s": copy_bw,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    if device.type == "cuda":
        report.update(gpu=torch.cuda.get_device_name(), cuda_peak_bytes=peak)
    if args.long:
        report["mixed_lengths"] = report_long
    if args.standalone:
        report["memory"] = bench_memory(model, args, device, dtype, max_seq)
    del model
    if args.hf_baseline:
        report["hf_baseline"] = bench_hf_baseline(args.hf_baseline, device, dtype, args)
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print_engine_report(report, args, device)
    return report


def bench_mixed_lengths(args, device: torch.device, dtype: torch.dtype) -> dict:
    """``--long-only``: the mixed-lengths run alone, on the N-branch mixed family (one model loaded, one
    warm-up: what a device lent for minutes has time for)."""
    source = RandomFamily(args.shape, args.branches, args.rate, device, dtype, embeddings=args.compress_embeddings)
    model = FamilyModel.from_artifact(source, device=device, dtype=dtype)
    max_seq = max(args.prompt + args.new_tokens, args.long + beside_tokens(args)) + 1
    runner = FamilyRunner(model, max_batch=args.batch, max_seq=max_seq,
                          prefill_chunk=max(512, args.prompt, args.ttft_prompt), compile=args.compile,
                          graphs=args.cuda_graphs)
    runner.allocate(cache_tokens(args, args.batch, True) * runner.kv_bytes_per_token())
    t0 = time.perf_counter()
    runner.warm_up()
    warm_s = time.perf_counter() - t0
    branches = [i % args.branches for i in range(args.batch)]
    rounds = [mixed_lengths(runner, args, SHAPES[args.shape]["vocab_size"], branches) for _ in range(args.rounds)]
    report = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "rate": args.rate,
              "compile": args.compile, "cuda_graphs": args.cuda_graphs, "branches": args.branches,
              "batch": args.batch, "prompt": args.prompt,
              "new_tokens": args.new_tokens, "long": args.long, "long_rows": args.long_rows, "warm_up_s": warm_s,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": rounds,
              "mixed_lengths": {k: statistics.median(r[k] for r in rounds)
                                for k in ("beside_short", "beside_long", "ratio")}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    where = report.get("gpu", f"{device}, {report['threads']} threads")
    print(f"engine, shape {args.shape}, {args.dtype} on {where}, rate {args.rate}"
          f"{', torch.compile' if args.compile else ''}{', decode graphs' if args.cuda_graphs else ''}, "
          f"torch {torch.__version__}, {args.rounds} rounds "
          f"(median), warm-up {warm_s:.1f} s")
    print_mixed_lengths(report["mixed_lengths"], args)
    return report


def print_mixed_lengths(m: dict, args) -> None:
    n = args.long_rows
    print(f"\nmixed lengths, {args.branches} branches mixed: decode tok/s of {args.batch - n} rows of "
          f"{args.prompt} prompt tokens beside {n} more row{'s' if n > 1 else ''}")
    print(text_table(["beside", "decode tok/s", "ratio"],
                     [[f"{n} x {args.prompt} tokens", f"{m['beside_short']:.1f}", "1.00x"],
                      [f"{n} x {args.long} tokens", f"{m['beside_long']:.1f}", f"{m['ratio']:.2f}x"]]))


def print_engine_report(report: dict, args, device: torch.device) -> None:
    gb = 1e9
    rows = [[r["config"], str(r["batch"]), f"{r['decode_tok_s']:.1f}", f"{r['vs_dense']:.2f}x",
             f"{(r['kv_copied_bytes'] or 0) / 1e6:.1f}",
             f"{r['read_bytes'] / 1e6:.1f}", f"{r['read_bytes_per_s'] / gb:.1f}",
             f"{100 * r['of_copy_bandwidth']:.0f}%",
             f"{1000 * r['ttft_s']:.1f}" if "ttft_s" in r else "", f"{r['weight_bytes'] / gb:.2f}"]
            for r in report["results"]]
    heads = "embeddings/heads compressed" if args.compress_embeddings else "per-branch embeddings/heads"
    if args.compile:
        heads += ", torch.compile"
    if args.cuda_graphs:
        heads += ", decode graphs" + (" (CUDA)" if device.type == "cuda" else " (static inputs, no capture)")
    where = report.get("gpu", f"{device}, {report['threads']} threads")
    print(f"engine, shape {args.shape}, {args.dtype} on {where}, rate {args.rate}, {heads}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, torch {torch.__version__}, {args.rounds} rounds in turn")
    print(text_table(["configuration", "batch", "decode tok/s", "vs dense", "KV MB copied/step", "MB read/step",
                      "GB/s read",
                      "of copy bw", f"TTFT {args.ttft_prompt} ms", "weights GB"], rows))
    print("decode tok/s: the median of the rounds; vs dense: the median of each round's ratio")
    print(f"copy bandwidth (read + write) {report['copy_bytes_per_s'] / gb:.1f} GB/s; MB read/step: weights the "
          f"step's branches use + every row's KV over the step's span at the mean context + KV copied; KV copied: "
          f"measured on one decode step by watching the aten ops that read the cache")
    for r in report["results"]:
        g = r.get("decode_graphs")
        if g is not None:
            state = (f"{g['buckets']} buckets {'captured' if g['captured'] else 'without capture'}, "
                     f"{g['replays']} steps through them" if g["enabled"] else "capture failed: eager steps")
            print(f"decode graphs, {r['config']} at batch {r['batch']}: {state}")
    if "mixed_lengths" in report:
        print_mixed_lengths(report["mixed_lengths"], args)
    if "memory" in report:
        m = report["memory"]
        print(f"\nmemory: {args.branches}-branch family + {args.standalone} standalone, {args.dtype}")
        print(text_table(["item", "GB"], [[k, f"{v / gb:.2f}"] for k, v in m["bytes"].items()]))
        if "cuda_allocated" in m:
            print(f"CUDA memory allocated with both loaded: {m['cuda_allocated'] / gb:.2f} GB "
                  f"(peak {m['cuda_peak'] / gb:.2f} GB) of {m['cuda_total'] / gb:.1f} GB")
    if args.hf_baseline:
        b = report["hf_baseline"]
        print(f"\nsame weights ({args.hf_baseline}), greedy, prompt {args.prompt}, {args.new_tokens} new tokens")
        rows = [[k, f"{v:.1f}"] for k, v in b["tok_s"].items()]
        print(text_table(["run", "tok/s"], rows))
        print(f"engine vs generate: batch 1 {b['engine_vs_generate_batch1']:.2f}x, "
              f"batch {args.batch} {b['engine_vs_generate_batchB']:.2f}x; "
              f"{args.batch} concurrent vs one after another: {b['concurrent_vs_sequential']:.2f}x")


def beside_tokens(args) -> int:
    """Tokens each of the mixed-lengths run's other rows generates at most: enough to go on decoding through
    the steps that prefill the others after it (they take turns by chunk), the timed rows' prefill steps and
    all their decode steps."""
    chunk = max(512, args.prompt, args.ttft_prompt)
    others = -(-args.long_rows * max(args.long, args.prompt) // chunk) + args.long_rows
    return args.new_tokens + others + -(-args.batch * args.prompt // chunk) + 4


def mixed_lengths(runner: FamilyRunner, args, vocab: int, branches: list[int]) -> dict:
    """Decode tok/s of batch - N short rows beside N more short rows, then beside N rows of ``args.long`` prompt
    tokens (N = ``args.long_rows``): a paged step reads each row's own context, so the long rows cost their own
    keys, not everyone's."""
    n = args.long_rows
    short = _prompts(args.batch - n, args.prompt, vocab, 5)
    out = {}
    for key, others in (("beside_short", _prompts(n, args.prompt, vocab, 6)),
                        ("beside_long", _prompts(n, args.long, vocab, 7))):
        decode_beside(runner, others[:1], short[:2], branches[:3], 2)  # warm-up at this length
        out[key] = decode_beside(runner, others, short, branches, args.new_tokens, beside_tokens(args))
    out["ratio"] = out["beside_long"] / out["beside_short"]
    return out


def decode_beside(runner: FamilyRunner, others: list[list[int]], timed: list[list[int]], branches: list[int],
                  new_tokens: int, others_tokens: int | None = None) -> float:
    """Decode tok/s of the ``timed`` rows while the ``others`` decode beside them: the others come first and
    are stepped until their prompts are in the cache (a long prompt takes many steps), then the timed rows
    arrive. Only steps in which every row decodes are timed, and only the timed rows' tokens counted; once
    those are done the others are cancelled."""
    def queue(prompts, offset, max_tokens):
        seqs = [Sequence(str(offset + i), p, SamplingParams(max_tokens=max_tokens, temperature=0), lambda ev: None,
                         branches[(offset + i) % len(branches)]) for i, p in enumerate(prompts)]
        for seq in seqs:
            runner.add(seq)
        return seqs

    beside = queue(others, len(timed), others_tokens or new_tokens + 8)
    while runner.waiting or any(s.computed < len(s.prompt) for s in beside):
        runner.step()
    seqs = queue(timed, 0, new_tokens)
    seconds = tokens = 0.0
    while not all(s.finished for s in seqs):
        prefilling = bool(runner.waiting) or any(s.length - s.computed > 1 for s in runner.running)
        before = sum(len(s.output) for s in seqs)
        _sync(runner.device)
        t0 = time.perf_counter()
        runner.step()
        _sync(runner.device)
        if not prefilling:
            seconds += time.perf_counter() - t0
            tokens += sum(len(s.output) for s in seqs) - before
    if any(s.finished for s in beside):
        raise RuntimeError("a row beside the timed ones ended before them: beside_tokens is too small")
    for seq in beside:
        seq.cancelled.set()
    while runner.has_work():
        runner.step()
    return tokens / seconds


# Standalone models of another architecture served next to the family (random weights, transformers' Mistral).
STANDALONE_SHAPES = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=8192),
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),  # Mistral-7B: 7.24 B parameters
}


def bench_memory(family: FamilyModel, args, device: torch.device, dtype: torch.dtype, max_seq: int) -> dict:
    """The family (as last loaded) and a standalone model held together on one device; their KV caches on paper
    at ``args.batch`` sequences of ``max_seq`` (the bench's own caches hold only what its runs use)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(**STANDALONE_SHAPES[args.standalone], max_position_embeddings=8192)
    with torch.device(device):
        standalone = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    kv_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                  cfg.hidden_size // cfg.num_attention_heads, dtype)
    fc = family.cfg
    out = {"bytes": {
        "family weights": weight_bytes(family),
        f"family KV cache ({args.batch} x {max_seq}, on paper)":
            args.batch * max_seq * kv_bytes_per_token(fc.num_layers, fc.num_kv_heads, fc.head_dim, dtype),
        "standalone weights": sum(p.numel() * p.element_size() for p in standalone.parameters()),
        f"standalone KV cache ({args.batch} x {max_seq}, on paper)": args.batch * max_seq * kv_token,
    }}
    out["bytes"]["total"] = sum(out["bytes"].values())
    if device.type == "cuda":
        out.update(cuda_allocated=torch.cuda.memory_allocated(), cuda_peak=torch.cuda.max_memory_allocated(),
                   cuda_total=torch.cuda.get_device_properties(device).total_memory)
    del standalone
    return out


def bench_hf_baseline(path: str, device: torch.device, dtype: torch.dtype, args) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = hf.config.vocab_size
    B, P, N = args.batch, args.prompt, args.new_tokens

    def generate(batch: int) -> float:
        ids = torch.tensor(_prompts(batch, P, vocab), device=device)
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        hf.generate(ids[:, :8], **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return (out.shape[0] * (out.shape[1] - P)) / (time.perf_counter() - t0)

    tok_s = {"transformers generate, batch 1": generate(1), f"transformers generate, static batch {B}": generate(B)}
    model = FamilyModel.from_artifact(SingleCheckpoint(path), device=device, dtype=dtype)
    runner = FamilyRunner(model, max_batch=B, max_seq=P + N + 1, prefill_chunk=max(512, P))
    runner.allocate()
    runner.warm_up()
    run_batch(runner, _prompts(1, P, vocab, 1), [0], 4)  # warm-up
    one = run_batch(runner, _prompts(1, P, vocab), [0], N)
    tok_s["engine, batch 1"] = one["tok_s"]
    together = run_batch(runner, _prompts(B, P, vocab), [0] * B, N)
    tok_s[f"engine, {B} concurrent"] = together["tok_s"]
    t0, tokens = time.perf_counter(), 0
    for prompt in _prompts(B, P, vocab):
        tokens += run_batch(runner, [prompt], [0], N)["tokens"]
    tok_s[f"engine, {B} one after another"] = tokens / (time.perf_counter() - t0)
    return {
        "tok_s": tok_s,
        "engine_vs_generate_batch1": tok_s["engine, batch 1"] / tok_s["transformers generate, batch 1"],
        "engine_vs_generate_batchB": together["tok_s"] / tok_s[f"transformers generate, static batch {B}"],
        "concurrent_vs_sequential": together["tok_s"] / tok_s[f"engine, {B} one after another"],
    }
