"""The paged engine: attention over block tables, one forward per step, memory by tokens, preemption."""

import asyncio
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compression.artifact import Artifact
from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.engine.kv_cache import BLOCK_SIZE, BlockPool, StepBatch, allocate, paged_attention, parse_bytes, write
from server.engine.model import FamilyModel
from server.engine.runner import FamilyRunner, StandaloneRunner
from server.engine.sequence import Sequence
from server.engine.sampling import SamplingParams
from server.engine.core import Engine


@pytest.fixture(scope="module")
def paths(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4)}


def greedy(n=8, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def runner_of(kind, paths, **kw):
    from transformers import AutoModelForCausalLM

    if kind == "family":
        runner = FamilyRunner(FamilyModel.from_artifact(Artifact(paths["artifact"])), **kw)
    else:
        runner = StandaloneRunner(AutoModelForCausalLM.from_pretrained(paths["phi3"], dtype=torch.float32).eval(),
                                  **kw)
    runner.allocate()
    return runner


@pytest.mark.parametrize("q_layout", ["tokens-first", "heads-first"])  # heads-first: as transformers hands q over
@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "reference"])
def test_attention_over_shuffled_blocks_equals_dense_causal_attention(flash, q_layout, monkeypatch):
    """Decode rows and prompt chunks of many lengths (several chunks of keys, tiles straddling chunk edges),
    their blocks scattered over the pool: each query's output is dense causal attention over its own keys,
    with the CPU's fused kernel and with the reference path (CUDA's today)."""
    import server.engine.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "FLASH_ON_CPU", flash)
    torch.manual_seed(0)
    heads, kv, hd = 6, 2, 16
    pool = BlockPool(300)
    random.Random(0).shuffle(pool.free)
    kc, vc = (t[0] for t in allocate(1, 300, kv, hd, torch.float32, "cpu"))
    lengths = [5, 40, 300, 700, 17, 1]
    seqs = []
    for n in lengths:
        table = []
        assert pool.grow(table, n)
        seqs.append((table, torch.randn(n, kv, hd), torch.randn(n, kv, hd), torch.randn(n, heads, hd)))
    # (sequence, first position, tokens): decode rows first, then prompt chunks
    spec = [(0, 4, 1), (3, 699, 1), (5, 0, 1), (1, 0, 40), (2, 200, 100), (4, 3, 14), (3, 250, 70)]
    step = StepBatch([(seqs[i][0], s, n) for i, s, n in spec], 3, BLOCK_SIZE, heads, kv, torch.float32,
                     torch.device("cpu"))
    flat = kc.view(-1, kv, hd), vc.view(-1, kv, hd)
    for i, s, n in spec:  # what earlier steps wrote
        table, K, V, _ = seqs[i]
        for p in range(s):
            slot = table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            flat[0][slot], flat[1][slot] = K[p], V[p]
    write(kc, vc, torch.cat([seqs[i][1][s:s + n] for i, s, n in spec]),
          torch.cat([seqs[i][2][s:s + n] for i, s, n in spec]), step)
    q = torch.cat([seqs[i][3][s:s + n] for i, s, n in spec])
    if q_layout == "heads-first":
        q = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, (H, T, hd) in memory
    got = paged_attention(q, kc, vc, step)
    want = []
    for i, s, n in spec:
        _, K, V, Q = seqs[i]
        k, v = (t[:s + n].repeat_interleave(heads // kv, 1).transpose(0, 1) for t in (K, V))
        mask = torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(Q[s:s + n].transpose(0, 1), k, v, attn_mask=mask)
        want.append(out.transpose(0, 1).reshape(n, heads * hd))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_a_compiled_decode_steps_attention_equals_dense_causal_attention(how):
    """The attention of a compiled step whose rows all decode (server/engine/kv_cache.py: decode_attention):
    rows of 1 to 700 keys in shuffled blocks, the long ones split into several units, each row's output is
    dense attention over its own keys, eagerly and through torch.compile as the engine runs it."""
    from server.engine.compiled import tracing
    from server.engine.kv_cache import decode_attention

    torch.manual_seed(1)
    heads, kv, hd = 6, 2, 16
    pool = BlockPool(300)
    random.Random(1).shuffle(pool.free)
    kc, vc = (t[0] for t in allocate(1, 300, kv, hd, torch.float32, "cpu"))
    lengths = [1, 5, 700, 17, 257, 256, 40]
    rows, want = [], []
    q = torch.randn(len(lengths), heads, hd)
    for i, n in enumerate(lengths):
        table = []
        assert pool.grow(table, n)
        K, V = torch.randn(n, kv, hd), torch.randn(n, kv, hd)
        slots = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)])
        kc.view(-1, kv, hd)[slots], vc.view(-1, kv, hd)[slots] = K, V
        rows.append((table, n - 1, 1))
        k, v = (t.repeat_interleave(heads // kv, 1).transpose(0, 1) for t in (K, V))
        want.append(torch.nn.functional.scaled_dot_product_attention(q[i][:, None], k, v).reshape(heads * hd))
    step = StepBatch(rows, len(rows), BLOCK_SIZE, heads, kv, torch.float32, torch.device("cpu"), compiled=True)
    assert step.units.blocks.shape[0] > len(rows)  # the long rows are split
    attend = decode_attention
    if how == "compiled":
        attend = torch.compile(decode_attention, dynamic=True, fullgraph=True)
    with tracing():
        got = attend(q, kc, vc, step.units, hd ** -0.5)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["family", "standalone"])
def test_a_prompt_chunk_of_16_rows_makes_the_same_aten_calls_as_one_row(paths, kind):
    """No Python loop over rows anywhere in a step: the device work of 16 prompts of different lengths is the
    same list of aten calls as that of one prompt of as many tokens (192), and of three (mixed branches). The
    chunk is a prompt's middle: no lm_head, whose CPU GEMM layout follows the number of rows it reads (one,
    up to 64, more), as every linear's does."""
    runner = runner_of(kind, paths, max_batch=16, max_seq=256, prefill_chunk=512)

    def calls(rows, mixed=False):
        lengths = [192] if rows == 1 else [192 // rows + (i % 3) - 1 for i in range(rows)]
        seqs = [Sequence(str(i), [10 + (i + j) % 200 for j in range(n)], greedy(), lambda e: None,
                         i % 3 if mixed else 0) for i, n in enumerate(lengths)]
        for s in seqs:
            assert runner.pool.grow(s.blocks, s.length)
        with CountOps() as count:
            runner._forward([(s, s.length) for s in seqs], 0, [])
        for s in seqs:
            runner.pool.release(s.blocks)
        return count.calls

    one = calls(1)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in one and calls(16) == one
    if kind == "family":
        assert calls(16, mixed=True) == calls(3, mixed=True)


@pytest.mark.parametrize("kind", ["family", "standalone"])
def test_a_decode_step_syncs_with_the_host_once(paths, kind, monkeypatch):
    """The only blocking device-to-host transfer of a decode step is fetching the sampled tokens: counted through
    the dispatcher (_local_scalar_dense: item(), int(), bool()) and at tolist()/item()/numpy()/cpu()."""
    runner = runner_of(kind, paths, max_batch=4, max_seq=128)
    seqs = [Sequence(str(i), [5, 6, 7 + i], greedy(8) if i % 2 else SamplingParams(max_tokens=8, temperature=0.8,
                     top_p=0.9, seed=i), lambda e: None, i % 3 if kind == "family" else 0) for i in range(4)]
    for s in seqs:
        runner.add(s)
    runner.step()  # prefill; every row has its first token
    assert all(len(s.output) == 1 for s in seqs)
    syncs = []
    for name in ("tolist", "item", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: (syncs.append(_n),
                                                                                          _r(self, *a, **k))[1])

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) in ("aten._local_scalar_dense",):
                syncs.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Syncs():
        runner.step()  # a decode step of 4 rows
    assert all(len(s.output) == 2 for s in seqs)
    assert syncs == ["tolist"]


def test_sequences_are_preempted_when_blocks_run_out_and_resume_with_the_same_tokens(paths):
    """A KV budget of 6 blocks (96 tokens) for 4 sequences that grow to 48 tokens each: the newest are
    preempted (blocks freed, recomputed later) and every request gets the greedy tokens it gets alone."""
    probe = runner_of("family", paths, max_batch=1, max_seq=16)
    e = Engine(kv_cache_memory=6 * BLOCK_SIZE * probe.kv_bytes_per_token())
    runner = e.add_family(paths["artifact"], max_batch=4, max_seq=128, prefill_chunk=64)
    e.start()
    prompts = [[5, 80, 17, 200, 33, 101, 7, 64], [9, 8, 7, 6, 5, 4, 3], [120, 121, 122], [40, 41, 42, 43, 44]]
    names = ["math", "code", "chat", "math"]
    try:
        async def main():
            alone = [await collect(e.submit(m, p, greedy(40, ignore_eos=True))) for m, p in zip(names, prompts)]
            together = await asyncio.gather(*(collect(e.submit(m, p, greedy(40, ignore_eos=True))) for m, p in zip(names, prompts)))
            return alone, together

        alone, together = asyncio.run(main())
    finally:
        e.stop()
    assert runner.pool.num_blocks == 6
    assert runner.preemptions >= 1
    assert together == alone and all(len(t[0]) == 40 and t[1] == "length" for t in together)
    assert runner.pool.used == 0


async def collect(stream):
    tokens = []
    async for ev in stream:
        tokens += ev.token_ids
    return tokens, stream.finish_reason


def test_memory_goes_by_tokens_not_by_worst_case_slots(paths):
    """A budget that slots of max_seq positions would split into 4 sequences runs 12 short requests at once,
    and a prompt that fills most of the context still completes beside them with its tokens alone."""
    probe = runner_of("standalone", paths, max_batch=1, max_seq=16)
    max_seq = 256
    e = Engine(kv_cache_memory=4 * max_seq * probe.kv_bytes_per_token())
    runner = e.add_standalone("phi3", paths["phi3"], max_batch=16, max_seq=max_seq, prefill_chunk=64)
    e.start()
    long_prompt = [(7 * i) % 250 + 3 for i in range(200)]
    try:
        async def main():
            long_alone = await collect(e.submit("phi3", long_prompt, greedy(8)))
            short = [e.submit("phi3", [40 + i, 41, 42, 43, 44, 45], greedy(24, ignore_eos=True)) for i in range(12)]
            long = e.submit("phi3", long_prompt, greedy(8))
            return long_alone, await asyncio.gather(*(collect(s) for s in short)), await collect(long)

        long_alone, short, long = asyncio.run(main())
    finally:
        e.stop()
    assert runner.pool.capacity == 4 * max_seq
    assert runner.peak_batch >= 12
    assert all(len(t) == 24 for t, _ in short)
    assert long == long_alone


def test_ignore_eos_runs_past_the_models_end_of_turn(paths):
    runner = runner_of("standalone", paths, max_batch=2, max_seq=64)
    first = Sequence("probe", [5, 6, 7], greedy(1), lambda e: None)
    runner.add(first)
    while runner.has_work():
        runner.step()
    end = frozenset(first.output)  # pretend the model's first greedy token is its end of turn
    stopped = Sequence("stops", [5, 6, 7], greedy(6), lambda e: None, stop_ids=end)
    runs_on = Sequence("runs on", [5, 6, 7], greedy(6, ignore_eos=True), lambda e: None, stop_ids=end)
    for s in (stopped, runs_on):
        runner.add(s)
    while runner.has_work():
        runner.step()
    assert stopped.finished == "stop" and len(stopped.output) == 1
    assert runs_on.finished == "length" and len(runs_on.output) == 6


def test_kv_cache_memory_sizes():
    assert parse_bytes("9GB") == 9 * 2**30 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(1_000_000) == 1_000_000 and parse_bytes("1.5G") == 3 * 2**29
    from server.config import Limits

    assert Limits(kv_cache_memory="2GB").kv_cache_memory == 2 * 2**30
    with pytest.raises(ValueError, match="not a size"):
        Limits(kv_cache_memory="lots")

