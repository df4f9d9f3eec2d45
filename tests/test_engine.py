"""The engine through its asyncio API: continuous batching, sampling, stops, cancel, standalone models."""

import asyncio
import time

import pytest
import torch

from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.engine.sampling import SamplingParams
from server.engine.core import Engine, UnknownModel
from server.engine.scheduler import EngineFull


@pytest.fixture(scope="module")
def paths(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4)}


@pytest.fixture
def engine(paths):
    e = Engine(max_waiting=64)
    e.add_family(paths["artifact"], max_batch=4, max_seq=128, prefill_chunk=8)
    e.add_standalone("phi3", paths["phi3"], max_batch=4, max_seq=128, prefill_chunk=8)
    e.start()
    yield e
    e.stop()


async def collect(stream):
    text, tokens = "", []
    async for ev in stream:
        text += ev.text
        tokens += ev.token_ids
    return text, tokens, stream.finish_reason


def greedy(n=12, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


PROMPTS = {
    "math": [5, 80, 17, 200, 33, 101, 7, 64, 250, 3, 99, 42, 13, 14, 15, 16, 17, 18, 19],  # > one prefill chunk
    "code": [9, 8, 7],
    "chat": [120, 121, 122, 123, 124],
    "phi3": [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
}


def test_mixed_batch_with_late_joiners_matches_each_request_alone(engine):
    async def main():
        alone = {}
        for model, prompt in PROMPTS.items():
            alone[model] = await collect(engine.submit(model, prompt, greedy()))
        # Together: two start, the others join while those are mid-decode; phi3 twice with different prompts.
        first = [engine.submit("math", PROMPTS["math"], greedy()), engine.submit("phi3", PROMPTS["phi3"], greedy())]
        math_head = []
        async for ev in first[0]:
            math_head += ev.token_ids
            if len(math_head) >= 3:
                break
        later = [engine.submit(m, PROMPTS[m], greedy()) for m in ("code", "chat")]
        phi_short = engine.submit("phi3", PROMPTS["phi3"][:4], greedy())
        rest = await asyncio.gather(collect(first[0]), collect(first[1]), *(collect(s) for s in later),
                                    collect(phi_short))
        phi_short_alone = await collect(engine.submit("phi3", PROMPTS["phi3"][:4], greedy()))
        return alone, rest, phi_short_alone, math_head

    alone, rest, phi_short_alone, math_head = asyncio.run(main())
    math_rest, phi_rest, code, chat, phi_short = rest
    assert len(alone["math"][1]) == 12
    assert math_head + math_rest[1] == alone["math"][1]
    family_runner = engine.targets["math"].runner
    assert family_runner is engine.targets["code"].runner
    assert family_runner.peak_mixed >= 2  # a decode step really mixed branches
    assert engine.targets["phi3"].runner.peak_batch >= 2
    assert code[1] == alone["code"][1] and chat[1] == alone["chat"][1]
    assert phi_rest[1] == alone["phi3"][1]
    assert phi_short[1] == phi_short_alone[1]
    for got in (code, chat, phi_rest, phi_short):
        assert got[2] == "length"


def test_seeded_sampling_reproduces_whatever_the_neighbours(engine):
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50)

    async def main():
        alone = await collect(engine.submit("code", PROMPTS["code"], SamplingParams(seed=7, **params)))
        crowd = [engine.submit(m, PROMPTS[m], SamplingParams(seed=i, **params)) for i, m in enumerate(PROMPTS)]
        again = engine.submit("code", PROMPTS["code"], SamplingParams(seed=7, **params))
        other = engine.submit("code", PROMPTS["code"], SamplingParams(seed=8, **params))
        results = await asyncio.gather(collect(again), collect(other), *(collect(s) for s in crowd))
        return alone, results[0], results[1]

    alone, again, other = asyncio.run(main())
    assert again[1] == alone[1]
    assert other[1] != alone[1]


def test_stop_strings_cut_exactly(engine):
    async def main():
        full = await collect(engine.submit("chat", PROMPTS["chat"], greedy(24)))
        text = full[0]
        stop = text[6:9]
        cut = await collect(engine.submit("chat", PROMPTS["chat"], greedy(24, stop=["\x00never", stop])))
        streamed = []
        s = engine.submit("chat", PROMPTS["chat"], greedy(24, stop=[stop]))
        async for ev in s:
            streamed.append(ev.text)
        return text, stop, cut, "".join(streamed), s.finish_reason

    text, stop, cut, streamed, reason = asyncio.run(main())
    assert len(text) > 9
    assert cut[0] == text[: text.find(stop)]
    assert cut[2] == "stop" and reason == "stop"
    assert streamed == cut[0]


def test_stop_token_ends_with_stop(engine):
    async def main():
        full = await collect(engine.submit("math", PROMPTS["math"], greedy(12)))
        third = full[1][2]
        return full, await collect(engine.submit("math", PROMPTS["math"], greedy(12, stop_token_ids=[third])))

    full, got = asyncio.run(main())
    assert got[1] == full[1][: full[1].index(full[1][2]) + 1]
    assert got[2] == "stop"


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(engine):
    async def main():
        full = await collect(engine.submit("math", PROMPTS["math"], greedy(12)))
        first = full[1][0]
        ended = await collect(engine.submit("math", PROMPTS["math"], greedy(12, stop_token_ids=[first])))
        held = await collect(engine.submit("math", PROMPTS["math"], greedy(12, stop_token_ids=[first],
                                                                             min_tokens=4)))
        return first, ended, held

    first, ended, held = asyncio.run(main())
    assert ended[1] == [first] and ended[2] == "stop"  # the stop token comes first...
    assert len(held[1]) >= 4 and first not in held[1][:3]  # ...but not before min_tokens
    with pytest.raises(ValueError):
        greedy(4, min_tokens=5)


def test_cancel_frees_the_blocks(paths):
    e = Engine()
    runner = e.add_family(paths["artifact"], max_batch=1, max_seq=128)
    e.start()
    try:
        async def main():
            long = e.submit("math", PROMPTS["math"], greedy(100))
            waiting = e.submit("code", PROMPTS["code"], greedy(4))
            n = 0
            async for _ in long:
                n += 1
                if n == 3:
                    long.cancel()
            done = await collect(waiting)
            return long.finish_reason, done

        reason, done = asyncio.run(main())
        assert reason == "cancelled"
        assert done[2] == "length" and len(done[1]) == 4  # it only got the one slot once "long" let go
        deadline = time.monotonic() + 5
        while runner.running and time.monotonic() < deadline:  # the engine reaps right after its last event
            time.sleep(0.01)
        assert runner.pool.used == 0 and not runner.running  # every block back in the pool
    finally:
        e.stop()


def test_bad_requests_fail_before_streaming(paths):
    e = Engine(max_waiting=1)
    e.add_family(paths["artifact"], max_batch=1, max_seq=32)

    async def main():
        with pytest.raises(UnknownModel):
            e.submit("nobody", [1, 2], greedy())
        with pytest.raises(ValueError, match="context"):
            e.submit("math", list(range(40)), greedy())
        e.submit("math", [1, 2], greedy())  # engine not started: max_batch (1) + max_waiting (1) are admitted
        e.submit("math", [1, 2], greedy())
        assert e.waiting() == 1
        with pytest.raises(EngineFull):
            e.submit("math", [1, 2], greedy())

    asyncio.run(main())
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_context_limit_ends_with_length(paths):
    e = Engine()
    e.add_family(paths["artifact"], max_batch=2, max_seq=16)
    e.start()
    try:
        text, tokens, reason = asyncio.run(collect_after_start(e))
        assert reason == "length" and len(tokens) == 16 - 5
    finally:
        e.stop()


async def collect_after_start(e):
    return await collect(e.submit("chat", PROMPTS["chat"], greedy(100)))


def run_alone_then_together(e, requests):
    async def main():
        alone = [await collect(e.submit(m, p, greedy(n))) for m, p, n in requests]
        together = await asyncio.gather(*(collect(e.submit(m, p, greedy(n))) for m, p, n in requests))
        return alone, together
    return asyncio.run(main())


def test_prompts_of_different_lengths_prefill_together(paths):
    """One forward over several newcomers' prompts (no padding) gives each the tokens it gets alone."""
    e = Engine()
    runner = e.add_family(paths["artifact"], max_batch=4, max_seq=64, prefill_chunk=64)
    forward, rows = runner._forward, []
    runner._forward = lambda scheduled, decode_rows, sampling: (rows.append(len(scheduled) - decode_rows),
                                                                 forward(scheduled, decode_rows, sampling))[1]
    e.start()
    try:
        requests = [("math", PROMPTS["math"], 8), ("code", PROMPTS["code"], 8), ("chat", PROMPTS["chat"], 8)]
        alone, together = run_alone_then_together(e, requests)
        assert [t[1] for t in together] == [a[1] for a in alone]
        assert max(rows) >= 2  # newcomers' prompts really shared a forward
    finally:
        e.stop()


def test_prompts_near_the_context_end_beside_others(paths):
    e = Engine()
    e.add_family(paths["artifact"], max_batch=2, max_seq=26, prefill_chunk=20)
    e.start()
    try:
        long_prompt = (PROMPTS["math"] + PROMPTS["chat"])[:23]  # 20 tokens, then 3 beside "code"
        requests = [("math", long_prompt, 3), ("code", PROMPTS["code"] + [1, 2, 3, 4, 5], 3)]
        alone, together = run_alone_then_together(e, requests)
        assert [t[1] for t in together] == [a[1] for a in alone]
        assert [t[2] for t in together] == ["length", "length"]
    finally:
        e.stop()


def test_each_branch_renders_its_own_chat_template(family, tmp_path):
    import shutil

    from server.engine.text import render_chat

    members = {}
    for name, path in family.items():
        members[name] = tmp_path / name
        shutil.copytree(path, members[name])
    (members["code"] / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    compress(members, tmp_path / "art", CompressOptions(rate=1, progress=False))
    e = Engine()
    e.add_family(tmp_path / "art", names={"m": "math", "c": "code"}, max_batch=1, max_seq=64)
    assert set(e.targets) == {"m", "c"}
    messages = [{"role": "user", "content": "2+2?"}]
    as_math = e.tokenizer("m").decode(render_chat(e.tokenizer("m"), messages))
    as_code = e.tokenizer("c").decode(render_chat(e.tokenizer("c"), messages))
    assert as_math == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert as_code == "[user] 2+2?\n[assistant] "


def test_top_k_and_top_p_limits():
    """Batched sampling: each row keeps its own top-k/top-p/temperature whatever the neighbours."""
    from server.engine.sampling import sample_rows

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.01), SamplingParams(temperature=5.0),
              SamplingParams(temperature=0)]
    draws = [set() for _ in params]
    for _ in range(400):
        tokens = sample_rows(logits.repeat(len(params), 1), params, [None] * len(params))
        for seen, tok in zip(draws, tokens):
            seen.add(tok)
    assert draws == [{1, 2}, {1}, {0, 1, 2, 3, 4}, {1}]
    # The exponential race draws each token with its probability.
    probs = torch.softmax(logits, -1)
    counts = torch.bincount(torch.tensor([sample_rows(logits[None], [SamplingParams()], [None])[0]
                                          for _ in range(4000)]), minlength=5) / 4000
    assert (counts - probs).abs().max() < 0.03


def test_seeded_rows_reproduce_in_any_batch():
    from server.engine.sampling import sample_rows

    logits = torch.randn(4, 50)
    p = SamplingParams(seed=3, top_p=0.9)
    alone = [sample_rows(logits[2:3], [p], [p.generator(torch.device("cpu"))])[0] for _ in range(1)]
    g = p.generator(torch.device("cpu"))
    batch = sample_rows(logits, [SamplingParams(), SamplingParams(temperature=0), p, SamplingParams(top_k=3)],
                        [None, None, g, None])
    assert batch[2] == alone[0]


def test_every_step_is_compiled_at_start_and_never_while_serving(paths):
    """limits.compile: the family's steps (decode rows, prompts, both; one branch and mixed) are compiled by the
    warm-up before the engine is ready; serving long and short rows afterwards compiles nothing, falls back to
    eager nowhere (fail_on_recompile_limit_hit would raise) and gives eager's greedy tokens."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tokens = {}
    for compile in (False, True):
        e = Engine()
        e.add_family(paths["artifact"], max_batch=4, max_seq=600, prefill_chunk=32, compile=compile)
        e.start()
        try:
            e.wait_ready(timeout=600)
            made = dict(counters["stats"])
            if compile:
                assert made["unique_graphs"] >= 1
            requests = [("math", PROMPTS["math"] * 16, 6), ("code", PROMPTS["code"], 6), ("chat", PROMPTS["chat"], 6),
                        ("math", PROMPTS["math"], 6)]
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                tokens[compile] = run_alone_then_together(e, requests)
        finally:
            e.stop()
    assert tokens[True] == tokens[False]
    assert dict(counters["stats"]) == made  # nothing compiled while serving


def test_compiled_steps_build_on_a_torch_without_torch_compiles_recompile_limit(monkeypatch):
    """torch 2.11 (the CUDA images' torch) has no ``recompile_limit`` argument to torch.compile: the step is
    still compiled, the limit set as dynamo's own, and on CUDA Triton's tiling analysis is off (it failed an
    assertion on these steps' dynamic shapes there); a CPU step's inductor options are left alone."""
    from server.engine import compiled

    seen = {}

    def old_compile(fn, *, dynamic=None, fullgraph=False, options=None):
        seen.update(dynamic=dynamic, fullgraph=fullgraph, options=options)
        return fn

    monkeypatch.setattr(compiled.torch, "compile", old_compile)
    with torch._dynamo.config.patch(recompile_limit=8):
        step = compiled.compile_step(len, 20, torch.device("cuda"))
        assert torch._dynamo.config.recompile_limit == 20
    assert step is len and seen["dynamic"] and seen["fullgraph"]
    assert seen["options"]["triton.coalesce_tiling_analysis"] is False
    compiled.compile_step(len, 20, torch.device("cpu"))
    assert "triton.coalesce_tiling_analysis" not in seen["options"]


def test_a_compiled_standalone_model_decodes_the_same_tokens_and_compiles_only_at_start(paths):
    """limits.compile for a transformers model: its steps compiled by warm_up (dynamic shapes), the same greedy
    tokens as eager for rows alone and together, and nothing compiled while serving."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tokens = {}
    for compile in (False, True):
        e = Engine()
        e.add_standalone("phi3", paths["phi3"], max_batch=4, max_seq=600, prefill_chunk=32, compile=compile)
        e.start()
        try:
            e.wait_ready(timeout=600)
            made = dict(counters["stats"])
            if compile:
                assert made["unique_graphs"] >= 1
            p = PROMPTS["phi3"]
            requests = [("phi3", p * 30, 6), ("phi3", p[:3], 6), ("phi3", p[2:7], 6)]  # long and short rows
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                tokens[compile] = run_alone_then_together(e, requests)
        finally:
            e.stop()
    assert tokens[True] == tokens[False]
    assert dict(counters["stats"]) == made  # nothing compiled while serving


def test_sliding_window_models_are_held_inside_their_window(tmp_path):
    import json

    from compression.synthetic import build_standalone

    path = build_standalone(tmp_path / "phi3", seed=4)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 24
    (path / "config.json").write_text(json.dumps(cfg))
    e = Engine()
    runner = e.add_standalone("phi3", path, max_batch=2, max_seq=128)
    assert runner.max_seq == 24

    async def main():
        with pytest.raises(ValueError, match="context"):
            e.submit("phi3", list(range(30)), greedy())
    asyncio.run(main())


def test_incremental_text_matches_a_full_decode(family):
    from server.engine.text import IncrementalText, load_tokenizer

    tok = load_tokenizer(family["math"])
    text = "Grüße, 世界! naïve café ✓ done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok, [])
    pieces = [inc.add(i)[0] for i in ids]
    assert "".join(pieces) + inc.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # a character split over byte tokens is held until complete
    stop = IncrementalText(tok, ["café"])
    out, stopped = "", False
    for i in ids:
        delta, stopped = stop.add(i)
        out += delta
        if stopped:
            break
    assert stopped and out == "Grüße, 世界! naïve "


def test_bench_engine_reports_bytes_bandwidth_ttft_and_memory():
    import json

    from tests.conftest import run_cli

    out = run_cli("bench", "engine", "--shape", "tiny", "--batch", "4", "--prompt", "4", "--new-tokens", "4",
                  "--ttft-prompt", "16", "--standalone", "small", "--long", "1100", "--long-rows", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    by = {(r["config"], r["batch"]): r for r in report["results"]}
    assert by[("dense", 4)]["vs_dense"] == 1.0
    # A mixed batch reads every branch's residual and head: more bytes than one branch, which reads more than dense.
    read = [by[(config, 4)]["read_bytes"] for config in ("dense", "one branch", "4 branches mixed")]
    assert read == sorted(set(read))
    assert all(r["ttft_s"] > 0 for r in report["results"] if r["batch"] == 1)
    assert report["copy_bytes_per_s"] > 0 and report["memory"]["bytes"]["standalone weights"] > 0
    # the long rows take three prefill steps (chunks of 512): they are in the cache before the timed rows come
    assert report["mixed_lengths"]["beside_long"] > 0 and report["mixed_lengths"]["beside_short"] > 0
    alone = run_cli("bench", "engine", "--shape", "tiny", "--batch", "4", "--prompt", "4", "--new-tokens", "4",
                    "--long", "600", "--long-rows", "2", "--long-only", "--rounds", "1", "--json")
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["mixed_lengths"]["beside_long"] > 0
    for flags in (["--ttft-prompt", "0"], ["--batch", "4", "--long", "100", "--long-rows", "4"], ["--long-only"]):
        bad = run_cli("bench", "engine", "--shape", "tiny", *flags)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_bfloat16_tokens_do_not_depend_on_the_neighbours(paths):
    """Scales are fp32 on every path: in bf16 a request's greedy tokens are the same alone (one branch, its own
    path) and inside a batch that mixes other branches."""
    e = Engine()
    e.add_family(paths["artifact"], dtype=torch.bfloat16, max_batch=4, max_seq=128, prefill_chunk=64)
    e.start()
    try:
        requests = [("code", PROMPTS["code"], 16), ("math", PROMPTS["math"], 16), ("chat", PROMPTS["chat"], 16)]
        alone, together = run_alone_then_together(e, requests)
    finally:
        e.stop()
    assert e.targets["code"].runner.peak_mixed == 3
    assert [t[1] for t in together] == [a[1] for a in alone]
    assert all(len(a[1]) == 16 for a in alone)


def test_standalone_rows_join_and_leave_and_give_their_blocks_back(paths):
    e = Engine()
    runner = e.add_standalone("phi3", paths["phi3"], max_batch=4, max_seq=128, prefill_chunk=32)
    e.start()
    try:
        requests = [("phi3", PROMPTS["phi3"], 4), ("phi3", PROMPTS["phi3"][:5], 12), ("phi3", PROMPTS["phi3"][:7], 8)]
        alone, together = run_alone_then_together(e, requests)
    finally:
        e.stop()
    assert [t[1] for t in together] == [a[1] for a in alone]
    assert runner.peak_batch == 3 and runner.pool.used == 0


def test_embed_jobs_are_bounded_and_checked_before_queueing(paths):
    e = Engine(max_embed_tokens=32)
    e.add_family(paths["artifact"], max_batch=1, max_seq=64)
    with pytest.raises(ValueError, match="limit is 32"):
        e.embed_future("math", list(range(33)))
    with pytest.raises(ValueError, match="nothing"):
        e.embed_future("math", [])
    with pytest.raises(UnknownModel):
        e.embed_future("nobody", [1])
    with pytest.raises(TimeoutError):
        e.wait_ready(timeout=0.01)  # not started: no warm-up has run


def test_many_long_embed_jobs_run_as_bounded_forwards_without_the_head(paths):
    """A request of many long inputs to a standalone model (256 x 400 tokens grew a server to 20 GB): the jobs go
    in forwards of at most max_embed_tokens padded tokens, the head runs on one position per row, and each
    job's states equal those of its input alone."""
    e = Engine(max_embed_tokens=256)
    runner = e.add_standalone("phi3", paths["phi3"], max_batch=2, max_seq=128)
    sizes, kept = [], []
    hidden = e._hidden
    e._hidden = lambda jobs: sizes.append(len(jobs) * max(len(j.tokens) for j in jobs)) or hidden(jobs)
    runner.model.register_forward_pre_hook(lambda m, a, kw: kept.append(kw.get("logits_to_keep")), with_kwargs=True)
    jobs = [[(7 * i + j) % 250 + 1 for j in range(40 + 7 * i)] for i in range(12)]
    futures = [e.embed_future("phi3", t) for t in jobs]  # queued before the engine starts: one batch to split
    e.start()
    try:
        states = [f.result(timeout=120) for f in futures]
        alone = [e.embed_future("phi3", jobs[i]).result(timeout=60) for i in (0, 11)]
    finally:
        e.stop()
    assert max(sizes[:-2]) <= 256 and len(sizes) > 3 and set(kept) == {1}
    assert torch.allclose(states[0], alone[0], atol=1e-5) and torch.allclose(states[11], alone[1], atol=1e-5)
    assert [s.shape[0] for s in states] == [len(t) for t in jobs]


def test_standalone_steps_of_several_rows_give_each_rows_own_logits(paths):
    """Rows of different lengths and starts in one flat forward, prompt chunks beside decode rows: each row's
    logits are those of transformers' plain forward over its whole prompt, read from its own blocks."""
    from transformers import AutoModelForCausalLM

    from server.engine.runner import StandaloneRunner
    from server.engine.sequence import Sequence

    plain = AutoModelForCausalLM.from_pretrained(paths["phi3"], dtype=torch.float32).eval()
    runner = StandaloneRunner(AutoModelForCausalLM.from_pretrained(paths["phi3"], dtype=torch.float32).eval(),
                              max_batch=4, max_seq=128)
    runner.allocate()
    prompts = [list(range(40, 53)), [7, 8, 9], list(range(100, 109)), list(range(150, 230))]  # the last: 2 tiles
    seqs = [Sequence(str(i), p, greedy(), lambda e: None) for i, p in enumerate(prompts)]

    def forward(scheduled, decode_rows):
        for seq, n in scheduled:
            assert runner.pool.grow(seq.blocks, seq.computed + n)
        logits = runner._forward(scheduled, decode_rows, [seq for seq, _ in scheduled])
        for seq, n in scheduled:
            seq.computed += n
        return logits

    first = forward([(seqs[0], 6), (seqs[2], 2)], 0)  # two rows, unequal chunks
    rest = forward([(s, len(s.prompt) - s.computed) for s in seqs[:3]], 0)  # three rows, three starts
    with torch.inference_mode():
        want = [plain(torch.tensor([p])).logits[0] for p in prompts]
        torch.testing.assert_close(first, torch.stack([want[0][5], want[2][1]]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rest, torch.stack([w[-1] for w in want[:3]]), rtol=1e-4, atol=1e-4)
        for s in seqs[:3]:  # a decode step on top of the cache, beside the long prompt's first chunk
            s.output.append(5)
        step = forward([(s, 1) for s in seqs[:3]] + [(seqs[3], 70)], 3)
        for row, p in zip(step, prompts[:3]):
            torch.testing.assert_close(row, plain(torch.tensor([p + [5]])).logits[0, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step[3], want[3][69], rtol=1e-4, atol=1e-4)
        last = forward([(seqs[3], 10)], 0)  # its last chunk reads the blocks the first one wrote
        torch.testing.assert_close(last[0], want[3][-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["family", "standalone"])
def test_a_step_with_decode_rows_and_a_prompt_runs_one_forward(paths, kind):
    """Decode rows and a newcomer's prompt go through the model together: one forward, and both sampled."""
    from transformers import AutoModelForCausalLM

    from compression.artifact import Artifact
    from server.engine.model import FamilyModel
    from server.engine.runner import FamilyRunner, StandaloneRunner
    from server.engine.sequence import Sequence

    if kind == "family":
        runner = FamilyRunner(FamilyModel.from_artifact(Artifact(paths["artifact"])), max_batch=4, max_seq=64)
    else:
        runner = StandaloneRunner(AutoModelForCausalLM.from_pretrained(paths["phi3"], dtype=torch.float32).eval(),
                                  max_batch=4, max_seq=64)
    runner.allocate()
    old = [Sequence(f"old{i}", [3, 4, 5 + i], greedy(8), lambda e: None, branch=i) for i in range(2)]
    for seq in old:
        runner.add(seq)
    runner.step()  # both prefilled, each with its first token
    forward, calls = runner.step_forward, []
    runner.step_forward = lambda *a, **kw: (calls.append(1), forward(*a, **kw))[1]
    new = Sequence("new", [7, 8, 9, 10, 11], greedy(8), lambda e: None, branch=2 if kind == "family" else 0)
    runner.add(new)
    runner.step()
    assert len(calls) == 1  # one forward for the decode rows and the prompt
    assert [len(s.output) for s in old] == [2, 2] and len(new.output) == 1
