"""The family model against transformers on exported branches: logits must match."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compression.artifact import Artifact
from compression.compress import CompressOptions, compress
from compression.export import export_branch
from compression.synthetic import build_family
from server.engine.model import FamilyModel
from tests.conftest import run_rows

PROMPTS = [[5, 80, 17, 200, 33, 101, 7, 64, 250, 3, 99, 42], [9, 8, 7, 6, 5], [120, 121, 122, 123, 124, 125, 126]]


def run(model, ids, start, seqs, branches, head=True):
    return run_rows(model, ids, start, seqs, branches, head)


def hf_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=[0.0, 0.9], ids=["rate0", "rate0.9"])
def artifact(request, family, tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "art"
    compress(family, out, CompressOptions(rate=request.param, progress=False))
    return Artifact(out)


@pytest.mark.parametrize("rank_multiple", [1, 64])  # 64: ranks padded with zeros, as on CUDA
def test_each_branch_matches_its_export(artifact, rank_multiple, tmp_path):
    model = FamilyModel.from_artifact(artifact, rank_multiple=rank_multiple)
    for b, name in enumerate(model.branches):
        ref = hf_logits(export_branch(artifact.path, name, tmp_path / name, progress=False), PROMPTS[0])
        got = run(model, [PROMPTS[0]], [0], [b], [b])[0]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank_multiple", [1, 64])
def test_mixed_batch_and_incremental_decode_match(artifact, rank_multiple, tmp_path):
    """Rows of different branches at different positions in one step equal each branch alone."""
    model = FamilyModel.from_artifact(artifact, rank_multiple=rank_multiple)
    refs = {name: hf_logits(export_branch(artifact.path, name, tmp_path / name, progress=False), PROMPTS[i])
            for i, name in enumerate(model.branches)}
    # Prefill all but the last token of each prompt, one sequence each, then decode the last tokens together.
    for seq, ids in enumerate(PROMPTS):
        run(model, [ids[:-1]], [0], [seq], [seq])
    last = [[ids[-1]] for ids in PROMPTS]
    start = [len(ids) - 1 for ids in PROMPTS]
    got = run(model, last, start, [0, 1, 2], [0, 1, 2])[:, 0]  # a decode step: each row reads its own blocks
    for i, name in enumerate(model.branches):
        torch.testing.assert_close(got[i], refs[name][-1], rtol=1e-4, atol=1e-4)
    # Per-branch heads on last hidden states only: only the present heads.
    hidden = run(model, last, start, [0, 1, 2], [0, 1, 2], head=False)[:, 0]
    two = torch.tensor([2, 0])
    torch.testing.assert_close(model.project(hidden[[2, 0]], two, [2, 0]), got[[2, 0]], rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_and_tied_head(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    members = build_family(tmp_path / "fam", ["a", "b"], tied=True, seed=3, rope_parameters=rope)
    compress(members, tmp_path / "art", CompressOptions(rate=0.5, progress=False))
    art = Artifact(tmp_path / "art")
    model = FamilyModel.from_artifact(art)
    assert model.heads is None
    ids = list(range(40, 80))  # longer than the original context, so the scaling matters
    for b, name in enumerate(model.branches):
        ref = hf_logits(export_branch(art.path, name, tmp_path / name, progress=False), ids)
        got = run(model, [ids], [0], [0], [b])
        torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-4)


def test_hidden_states_match_transformers(artifact, tmp_path):
    model = FamilyModel.from_artifact(artifact)
    for b, name in enumerate(model.branches[:2]):
        hf = AutoModelForCausalLM.from_pretrained(export_branch(artifact.path, name, tmp_path / name, progress=False),
                                                  dtype=torch.float32)
        with torch.no_grad():
            ref = hf(torch.tensor([PROMPTS[0]]), output_hidden_states=True).hidden_states
        for layer in (1, -1):
            torch.testing.assert_close(model.hidden([PROMPTS[0]], [b], layer)[0], ref[layer][0], rtol=1e-4, atol=1e-4)
    # An embed job batch: right-padded sequences of several branches give each one's states alone.
    together = model.hidden([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [1, 0, 2], 1)
    for got, ids, b in zip(together, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [1, 0, 2]):
        torch.testing.assert_close(got, model.hidden([ids], [b], 1)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_on_the_cpu_stays_close_to_float32(artifact):
    ids = torch.tensor([PROMPTS[0]])
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = FamilyModel.from_artifact(artifact, dtype=dtype)
        outs[dtype] = run(model, ids.tolist(), [0], [0], [1])[0, -1].float()
        assert model.k_cache[0].dtype == dtype
    assert torch.isfinite(outs[torch.bfloat16]).all()
    assert (outs[torch.bfloat16] - outs[torch.float32]).abs().max() < 0.05 * outs[torch.float32].abs().max() + 0.05


@pytest.mark.parametrize("which", ["family", "tied_family"])
def test_compressed_embeddings_and_heads_match_their_export(which, request, tmp_path):
    members = request.getfixturevalue(which)
    out = tmp_path / "art"
    compress(members, out, CompressOptions(rate=0.5, compress_embeddings=True, progress=False))
    art = Artifact(out)
    assert art.is_compressed("model.embed_tokens.weight")
    model = FamilyModel.from_artifact(art)
    refs = {}
    for b, name in enumerate(model.branches):
        refs[name] = hf_logits(export_branch(out, name, tmp_path / name, progress=False), PROMPTS[0])
        got = run(model, [PROMPTS[0]], [0], [b], [b])[0]
        torch.testing.assert_close(got, refs[name], rtol=1e-4, atol=1e-4)
    # All branches in one batch: the masked path for the embedding lookup and the head.
    n = len(model.branches)
    ids = [PROMPTS[0]] * n
    got = run(model, ids, [0] * n, list(range(n)), list(range(n)))
    for b, name in enumerate(model.branches):
        torch.testing.assert_close(got[b], refs[name], rtol=1e-4, atol=1e-4)
    # The head alone on last hidden states, as a step uses it for the tokens it samples.
    hidden = run(model, ids, [0] * n, list(range(n)), list(range(n)), head=False)
    projected = model.project(hidden[:, -1], torch.arange(n), list(range(n)))
    torch.testing.assert_close(projected, got[:, -1], rtol=1e-5, atol=1e-5)


def test_step_read_bytes_count_the_trunk_once_and_only_the_residuals_in_use(family, tmp_path):
    """What `bench engine` divides by the step time: checked against the artifact's own tensors."""
    from server.bench.engine import step_read_bytes

    compress(family, tmp_path / "art", CompressOptions(rate=0.9, progress=False))
    artifact = Artifact(tmp_path / "art")
    model = FamilyModel.from_artifact(artifact)
    size = model.dtype.itemsize
    linears = [n for n in artifact.tensor_names if artifact.is_compressed(n) and ".layers." in n]
    trunk = sum(artifact.trunk(n).numel() for n in linears) * size

    def residual(b):
        factors = [artifact.residual(b, n) for n in linears]
        return sum(r.U.numel() + r.V.numel() for r in factors if r.kind == "lowrank") * size

    head = artifact.own(model.branches[0], "lm_head.weight").numel() * size
    cfg = model.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size
    assert residual(model.branches[1]) > 0
    # A decode step reads every row's cache over the step's span (row i is cache row i).
    assert step_read_bytes(model, [1], span=10) == trunk + residual(model.branches[1]) + head + 10 * kv
    mixed = trunk + sum(residual(b) for b in model.branches) + len(model.branches) * head + 3 * 30 * kv
    assert step_read_bytes(model, [0, 1, 2], span=30) == mixed


def test_a_rate_0_family_holds_each_branch_once(family, tmp_path):
    """Exact residuals are folded into per-branch weights at load: no trunk, no identity matrices."""
    from server.bench.engine import weight_bytes

    compress(family, tmp_path / "art", CompressOptions(rate=0.0, progress=False))
    model = FamilyModel.from_artifact(Artifact(tmp_path / "art"))
    members = sum(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).num_parameters() * 4
                  for p in family.values())
    assert weight_bytes(model) <= 1.05 * members


def test_every_weight_and_buffer_is_on_the_model_device(artifact):
    """A tensor left on the host breaks the CUDA path; the meta device shows it without a GPU."""
    model = FamilyModel.from_artifact(artifact, device="meta", rank_multiple=64)
    model.allocate_cache(4)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {name for name, t in tensors.items() if t.device.type != "meta"} == set()
    assert model.k_cache[0].device.type == "meta"


def test_a_step_runs_on_the_model_device(artifact):
    """A step's layers and heads on the meta device: no tensor made on the host inside the forward."""
    model = FamilyModel.from_artifact(artifact, device="meta", rank_multiple=64)
    for branches in ([1, 1, 1], [0, 1, 2]):
        if not model.row_grouped or len(set(branches)) == 1:
            hidden = run(model, [[1], [2], [3]], [5, 6, 7], [0, 1, 2], branches, head=False)
            assert hidden.device.type == "meta" and hidden.shape == (3, 1, model.cfg.hidden_size)


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (37, 19)])
def test_the_cpu_linear_layouts_give_the_linear_product(shape):
    """model.linear reorders the product for few rows on the CPU; every row count gives F.linear's numbers, and
    one row alone gives bitwise what it gives beside one or two others where w has 512 rows or more."""
    from server.engine.model import linear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen)
    x = torch.randn(70, shape[1], generator=gen)
    for rows in (1, 2, 3, 16, 64, 65, 70):
        torch.testing.assert_close(linear(x[:rows], w), torch.nn.functional.linear(x[:rows], w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(linear(x[:6].view(2, 3, -1), w), torch.nn.functional.linear(x[:6], w).view(2, 3, -1),
                               rtol=1e-5, atol=1e-4)
    if shape[0] >= 512:
        alone = linear(x[:1], w)[0]
        assert torch.equal(alone, linear(x[:2], w)[0]) and torch.equal(alone, linear(x[:3], w)[0])
