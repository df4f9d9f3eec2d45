"""Decode steps over padded static inputs (limits.cuda_graphs, server/engine/graphs.py): the plans, padding rows
and units, the null block and the buckets are the same code on the CPU, where the step is called instead of
replayed; a CUDA machine also runs the capture itself."""

import logging
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compression.artifact import Artifact
from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.engine.core import Engine
from server.engine.graphs import Static, plan, row_buckets, unit_buckets, units_needed
from server.engine.kv_cache import (BLOCK_SIZE, NULL_BLOCK, SPLIT_BLOCKS, BlockPool, allocate, decode_attention,
                                    gathered_decode_attention)
from server.engine.model import FamilyModel
from server.engine.runner import FamilyRunner, StandaloneRunner
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence


@pytest.fixture(scope="module")
def paths(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "standalone": build_standalone(root / "standalone", seed=4)}


def test_buckets_cover_every_step_up_to_the_limits():
    assert row_buckets(1) == [1] and row_buckets(6) == [1, 2, 4, 6] and row_buckets(32) == [1, 2, 4, 8, 16, 32]
    # 8192 positions in blocks of 16: 512 blocks, 32 units of 16 blocks per row at most
    assert unit_buckets(4, 8192, 16) == [4, 8, 16, 32, 64, 128]
    assert unit_buckets(2, 100, 16) == [2]
    # a pool of 100 blocks holds at most 7 units' worth of keys (and a partial unit per row), whatever max_seq
    assert unit_buckets(4, 8192, 16, blocks=100) == [4, 8, 16]
    for rows in row_buckets(6):  # the largest bucket holds every row at the longest context, with padding rows
        assert units_needed([899] * rows, rows, BLOCK_SIZE) <= unit_buckets(rows, 900, BLOCK_SIZE)[-1]


@pytest.mark.parametrize("attend", ["gathered, cpu-flash", "gathered, reference", "compiled form, eagerly"])
def test_a_padded_plans_attention_equals_dense_attention_for_its_real_rows(attend, monkeypatch):
    """Rows of 1-700 keys in shuffled blocks, padded to 8 rows and 3 more units than they need: each real row's
    output is dense attention over its own keys; the padding rows' outputs are finite (they read the null
    block), whichever attention runs the plan."""
    import server.engine.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "FLASH_ON_CPU", attend != "gathered, reference")
    torch.manual_seed(2)
    heads, kv, hd = 6, 2, 16
    pool = BlockPool(300, reserved=1)
    random.Random(2).shuffle(pool.free)
    kc, vc = (t[0] for t in allocate(1, 300, kv, hd, torch.float32, "cpu"))
    kc[NULL_BLOCK].normal_(), vc[NULL_BLOCK].normal_()  # whatever padding rows wrote there
    lengths = [1, 5, 700, 17, 257, 256, 40]
    decode, want = [], []
    q = torch.randn(8, heads, hd)
    for i, n in enumerate(lengths):
        table = []
        assert pool.grow(table, n) and NULL_BLOCK not in table
        K, V = torch.randn(n, kv, hd), torch.randn(n, kv, hd)
        slots = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)])
        kc.view(-1, kv, hd)[slots], vc.view(-1, kv, hd)[slots] = K, V
        decode.append((table, n - 1, 0, 0))
        k, v = (t.repeat_interleave(heads // kv, 1).transpose(0, 1) for t in (K, V))
        want.append(torch.nn.functional.scaled_dot_product_attention(q[i][:, None], k, v).reshape(heads * hd))
    need = units_needed([d[1] for d in decode], 8, BLOCK_SIZE)
    static = Static(8, need + 3, torch.device("cpu"))
    p = plan(decode, 8, need + 3, BLOCK_SIZE)
    assert p.slots[7] // BLOCK_SIZE == NULL_BLOCK  # a padding row
    assert p.keys[-3:].tolist() == [0, 0, 0]  # padding units
    static.load(p)
    units = static.batch.units
    assert units.blocks.shape == (need + 3, SPLIT_BLOCKS)
    fn = decode_attention if attend == "compiled form, eagerly" else gathered_decode_attention
    got = fn(q, kc, vc, units, hd ** -0.5)
    torch.testing.assert_close(got[:7], torch.stack(want), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def _runner(kind, paths, graphs, **kw):
    from transformers import AutoModelForCausalLM

    if kind == "family":
        runner = FamilyRunner(FamilyModel.from_artifact(Artifact(paths["artifact"])), graphs=graphs, capture=False,
                              **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(paths["standalone"], dtype=torch.float32).eval()
        runner = StandaloneRunner(model, graphs=graphs, capture=False, **kw)
    runner.allocate()
    runner.warm_up()
    return runner


@pytest.mark.parametrize("kind", ["family", "standalone"])
def test_decode_steps_over_padded_static_inputs_give_the_same_tokens(paths, kind):
    """Seven sequences of 3-600 prompt tokens (up to 3 units of keys each), three branches mixed, at most 6 a
    step: greedy tokens through the padded buckets equal the eager steps'; the steps that decode went through
    buckets of several row and unit sizes; no sequence is ever given the null block."""
    lengths = [5, 300, 17, 600, 40, 3, 260]
    outputs, used = {}, set()
    for graphs in (False, True):
        runner = _runner(kind, paths, graphs, max_batch=6, max_seq=900, prefill_chunk=512)
        if graphs:
            assert runner.pool.reserved == 1 and runner.pool.capacity == (runner.pool.num_blocks - 1) * BLOCK_SIZE
            real = runner.graphs.run

            def run(decode, single):
                n = len(decode)
                rows = next(r for r in runner.graphs.rows if r >= n)
                need = units_needed([d[1] for d in decode], rows, BLOCK_SIZE)
                used.add((rows, next(u for u in runner.graphs.units[rows] if u >= need)))
                return real(decode, single)

            runner.graphs.run = run
        seqs = [Sequence(str(i), [(7 * i + j) % 90 + 3 for j in range(n)], SamplingParams(max_tokens=12,
                         temperature=0), lambda e: None, i % 3 if kind == "family" else 0)
                for i, n in enumerate(lengths)]
        for s in seqs:
            runner.add(s)
        while runner.has_work():
            runner.step()
            assert all(NULL_BLOCK not in s.blocks for s in seqs) or not graphs
        outputs[graphs] = [s.output for s in seqs]
        if graphs:
            assert runner.graphs.replays >= 11
    assert outputs[True] == outputs[False]
    assert len({r for r, _ in used}) >= 2 and any(u > r for r, u in used)


class HostWork(TorchDispatchMode):
    """What would break a CUDA graph's capture: reading a value back (item, bool, int: _local_scalar_dense;
    tolist, cpu: a copy), a tensor made from host data (torch.tensor: lift_fresh), an output whose shape depends on
    values (nonzero, masked_select, unique, indexing by a boolean mask)."""

    BAD = {"aten._local_scalar_dense", "aten.item", "aten.lift_fresh", "aten._to_copy", "aten.nonzero",
           "aten.masked_select", "aten._unique2", "aten.unique_consecutive", "aten.repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        indices = args[1] if name.startswith("aten.index") and len(args) > 1 and isinstance(args[1], (list, tuple)) \
            else []
        if name in self.BAD or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["family", "standalone"])
def test_the_step_a_graph_captures_never_waits_on_the_host(paths, kind, monkeypatch):
    """Every bucket's step (each branch alone and mixed; a transformers model's whole forward for a standalone
    one) reads nothing back, builds no tensor from host data and has no value-dependent shape: what a CUDA
    graph's capture would refuse, checked through the dispatcher (and at tolist/numpy, which it does not see)
    on the CPU."""
    runner = _runner(kind, paths, True, max_batch=4, max_seq=600)
    mixes = set()
    for (mix, rows, units), static in runner.graphs.static.items():
        with torch.inference_mode(), HostWork() as work:
            for name in ("tolist", "numpy"):
                real = getattr(torch.Tensor, name)
                monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: (
                    work.found.append(_n), _r(self, *a, **k))[1])
            runner.graphs.step(static.tokens, static.branch, static.batch, mix)
            monkeypatch.undo()
        assert work.found == [], ((mix, rows, units), work.found)
        mixes.add(mix)
    assert mixes == ({0, 1, 2, None} if kind == "family" else {0})


def test_compiled_decode_steps_over_padded_static_inputs_give_eagers_tokens(paths):
    """limits.compile with graphs: every bucket's step is compiled while the buckets are prepared, serving
    compiles nothing more, and the tokens are eager's (padding units of no keys give 0, not NaN, in the
    compiled attention)."""
    from torch._dynamo.utils import counters

    lengths = [5, 300, 17, 40, 3]
    outputs = {}
    for compiled in (False, True):
        runner = FamilyRunner(FamilyModel.from_artifact(Artifact(paths["artifact"])), max_batch=4, max_seq=400,
                              prefill_chunk=512, compile=compiled, graphs=compiled, capture=False)
        runner.allocate()
        runner.warm_up()
        made = dict(counters["stats"])
        seqs = [Sequence(str(i), [(5 * i + j) % 90 + 3 for j in range(n)], SamplingParams(max_tokens=10,
                         temperature=0), lambda e: None, i % 3) for i, n in enumerate(lengths)]
        for s in seqs:
            runner.add(s)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            while runner.has_work():
                runner.step()
        outputs[compiled] = [s.output for s in seqs]
        if compiled:
            assert runner.graphs.replays >= 9 and dict(counters["stats"]) == made
    assert outputs[True] == outputs[False]


def test_cuda_graphs_on_the_cpu_warn_and_steps_run_as_before(paths, caplog):
    engine = Engine()
    with caplog.at_level(logging.WARNING, logger="branchserve.engine"):
        runner = engine.add_family(paths["artifact"], cuda_graphs=True)
    assert runner.graphs is None
    assert "limits.cuda_graphs applies to models on CUDA; on cpu its steps run eagerly" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["family", "standalone"])
def test_decode_steps_replayed_from_cuda_graphs_give_the_same_tokens(paths, kind):
    from transformers import AutoModelForCausalLM

    outputs = {}
    for graphs in (False, True):
        if kind == "family":
            runner = FamilyRunner(FamilyModel.from_artifact(Artifact(paths["artifact"]), device="cuda"),
                                  max_batch=6, max_seq=900, prefill_chunk=512, graphs=graphs)
        else:
            model = AutoModelForCausalLM.from_pretrained(paths["standalone"], dtype=torch.float32).cuda().eval()
            runner = StandaloneRunner(model, max_batch=6, max_seq=900, prefill_chunk=512, graphs=graphs)
        runner.allocate()
        runner.warm_up()
        if graphs:
            assert runner.graphs.enabled and all(s.graph is not None for s in runner.graphs.static.values())
        seqs = [Sequence(str(i), [(7 * i + j) % 90 + 3 for j in range(n)], SamplingParams(max_tokens=12,
                         temperature=0), lambda e: None, i % 3 if kind == "family" else 0)
                for i, n in enumerate([5, 300, 17, 600, 40, 3, 260])]
        for s in seqs:
            runner.add(s)
        while runner.has_work():
            runner.step()
        outputs[graphs] = [s.output for s in seqs]
    assert outputs[True] == outputs[False]
