"""The compress job end to end: artifacts, math, export round trips, inspect."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compression.artifact import Artifact
from compression.checkpoint import Checkpoint
from compression.compress import CompressOptions, compress
from compression.export import export_branch
from compression.plan import is_compressed, rank_for_rate
from server.cli import main
from tests.conftest import member_args, run_rows

PROMPT = torch.tensor([[5, 80, 17, 200, 33, 101, 7, 64, 250, 3, 99, 42]])


def logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(PROMPT).logits


def weights(path):
    ck = Checkpoint(path)
    return {n: ck.read(n) for n in ck.tensors}


def test_rank_rule():
    assert rank_for_rate(4096, 4096, 0.95) == 102
    assert rank_for_rate(1024, 4096, 0.95) == 40
    assert rank_for_rate(14336, 4096, 0.95) == 159
    assert rank_for_rate(64, 64, 0.5) == 16


def test_classification():
    assert is_compressed("model.layers.0.self_attn.q_proj.weight", (8, 8))
    assert is_compressed("model.layers.11.mlp.down_proj.weight", (8, 16))
    assert not is_compressed("model.layers.0.input_layernorm.weight", (8,))
    assert not is_compressed("model.layers.0.self_attn.q_proj.bias", (8,))
    assert not is_compressed("model.embed_tokens.weight", (260, 8))
    assert not is_compressed("lm_head.weight", (260, 8))


@pytest.mark.parametrize("which", ["family", "tied_family"])
def test_rate0_export_reproduces_every_member(which, request, tmp_path, capsys):
    members = request.getfixturevalue(which)
    out = tmp_path / "art"
    assert main(["compress", "--out", str(out), "--rate", "0", "--quiet", *member_args(members)]) == 0
    summary = capsys.readouterr().out
    assert "artifact" in summary and "inputs" in summary
    for name, src in members.items():
        exported = tmp_path / f"export-{name}"
        assert main(["export", str(out), name, str(exported), "--quiet"]) == 0
        diff = (logits(exported) - logits(src)).abs().max().item()
        assert diff <= 1e-5, (name, diff)
        # The export is a complete checkpoint: its tokenizer renders the branch's chat template.
        tok = AutoTokenizer.from_pretrained(exported)
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")


def test_rate1_is_scaled_normalized_average(family, tmp_path):
    out = tmp_path / "art"
    compress(family, out, CompressOptions(rate=1, progress=False))
    art = Artifact(out)
    ws = {b: weights(p) for b, p in family.items()}
    for name in art.tensor_names:
        if not art.is_compressed(name):
            continue
        assert art.residual("math", name).kind == "none"
        expected_trunk = sum(w[name] / w[name].norm() for w in ws.values()) / len(ws)
        torch.testing.assert_close(art.trunk(name), expected_trunk, rtol=0, atol=1e-6)
        for b, w in ws.items():
            s = art.scale(b, name)
            assert math.isclose(s, w[name].double().norm().item(), rel_tol=1e-6)
            assert torch.equal(art.dense_weight(b, name), (art.trunk(name) * s).to(art.dtype))


def optimal_error(D, r):
    sv = torch.linalg.svdvals(D.double())
    return sv[r:].pow(2).sum().sqrt().item()


@pytest.fixture(scope="module")
def rate09(family, tmp_path_factory):
    arts = {}
    for backend in ("fbpca", "torch"):
        out = tmp_path_factory.mktemp("r09") / backend
        compress(family, out, CompressOptions(rate=0.9, backend=backend, progress=False))
        arts[backend] = Artifact(out)
    return arts


def test_intermediate_rate_is_near_optimal_for_both_backends(family, rate09):
    ws = {b: weights(p) for b, p in family.items()}
    checked = 0
    errs = {}
    for backend, art in rate09.items():
        for name in art.tensor_names:
            if not art.is_compressed(name):
                continue
            m, n = art.spec(name)["shape"]
            r = rank_for_rate(m, n, 0.9)
            T = art.trunk(name).float()
            for b, w in ws.items():
                res = art.residual(b, name)
                assert res.kind == "lowrank" and res.U.shape == (m, r) and res.V.shape == (r, n)
                D = w[name] / w[name].double().norm().float() - T
                err = (D - res.U @ res.V).norm().item()
                opt = optimal_error(D, r)
                assert err <= 1.1 * opt + 1e-6, (backend, name, b, err, opt)
                errs[(backend, name, b)] = (err, opt)
                checked += 1
    for (backend, name, b), (err, opt) in errs.items():
        if backend == "fbpca":
            assert abs(err - errs[("torch", name, b)][0]) <= 0.1 * opt + 1e-6
    assert checked == 2 * 3 * 14


def test_scale_multiplies_trunk_and_residual(family, rate09):
    """y = s (x T^T + x V^T U^T): the paper's form, s scaling only the residual, is far off."""
    art = rate09["torch"]
    w = weights(family["code"])
    name = "model.layers.1.mlp.up_proj.weight"
    T, s, res = art.trunk(name).float(), art.scale("code", name), art.residual("code", name)
    ours = s * (T + res.U @ res.V)
    paper = T + s * (res.U @ res.V)
    rel = lambda approx: ((approx - w[name]).norm() / w[name].norm()).item()  # noqa: E731
    assert rel(ours) < 0.2
    assert rel(paper) > 0.4 and rel(paper) > 3 * rel(ours)
    assert math.isclose(rel(ours), art.spec(name)["branches"]["code"]["error"], rel_tol=1e-3, abs_tol=1e-5)


def test_identical_tensors_are_stored_once(rate09):
    art = rate09["fbpca"]
    assert art.spec("model.layers.0.input_layernorm.weight")["kind"] == "shared"
    assert art.spec("model.embed_tokens.weight")["kind"] == "per_branch"
    assert art.spec("lm_head.weight")["kind"] == "per_branch"
    keys = art.manifest["weight_map"]
    assert sum("model.layers.0.input_layernorm.weight" in k for k in keys) == 1


def test_rank_override_and_determinism(family, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    compress(family, a, CompressOptions(rank=5, seed=3, backend="torch", progress=False))
    compress(family, b, CompressOptions(rank=5, seed=3, backend="torch", progress=False))
    compress(family, c, CompressOptions(rank=5, seed=4, backend="torch", progress=False))
    art = Artifact(a)
    for name in art.tensor_names:
        if art.is_compressed(name):
            assert art.spec(name)["rank"] == 5
            assert art.residual("chat", name).U.shape[1] == 5
    files = lambda d: {p.name: p.read_bytes() for p in d.glob("*.safetensors")}  # noqa: E731
    assert files(a) == files(b)
    assert files(a) != files(c)
    d, e = tmp_path / "d", tmp_path / "e"
    compress(family, d, CompressOptions(rate=0.9, seed=3, backend="fbpca", progress=False))
    compress(family, e, CompressOptions(rate=0.9, seed=3, backend="fbpca", progress=False))
    assert files(d) == files(e)


def test_bfloat16_artifact(family, tmp_path):
    out = tmp_path / "bf16"
    compress(family, out, CompressOptions(rate=0, dtype="bfloat16", progress=False))
    art = Artifact(out)
    assert art.trunk("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    exported = export_branch(out, "math", tmp_path / "exp", progress=False)
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(exported)
    w = weights(family["math"])["model.layers.1.mlp.down_proj.weight"]
    got = model.state_dict()["model.layers.1.mlp.down_proj.weight"].float()
    assert ((got - w).norm() / w.norm()).item() < 1e-2


def test_inspect_text_and_json(rate09, capsys):
    path = str(rate09["fbpca"].path)
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.gate_proj.weight" in text and "lowrank" in text
    for b in ("math", "code", "chat"):
        assert b in text
    assert main(["inspect", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in data["branches"]] == ["math", "code", "chat"]
    q = next(t for t in data["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["rank"] == rank_for_rate(64, 64, 0.9)
    assert 0 < data["ratio"] < 1
    assert all(0 < b["mean_error"] <= b["max_error"] < 1 for b in data["branches"])


def test_force_replaces_existing_artifact(family, tmp_path):
    out = tmp_path / "art"
    compress(family, out, CompressOptions(rate=1, progress=False))
    compress(family, out, CompressOptions(rate=0.5, force=True, progress=False))
    assert Artifact(out).manifest["compression"]["rate"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_gain_allocation_spends_the_same_budget_better(family, rate09, tmp_path):
    out = tmp_path / "gain"
    compress(family, out, CompressOptions(rate=0.9, allocation="gain", backend="torch", progress=False))
    gain, uniform = Artifact(out), rate09["torch"]
    for b in family:
        spent = {"gain": 0, "uniform": 0}
        sq_err = {"gain": 0.0, "uniform": 0.0}
        for label, art in (("gain", gain), ("uniform", uniform)):
            for name in art.tensor_names:
                if art.is_compressed(name):
                    m, n = art.spec(name)["shape"]
                    res = art.residual(b, name)
                    spent[label] += 0 if res.kind == "none" else res.U.shape[1] * (m + n)
                    sq_err[label] += art.spec(name)["branches"][b]["error"] ** 2
        assert spent["gain"] <= spent["uniform"]
        assert sq_err["gain"] < sq_err["uniform"]
    assert Artifact(out).manifest["sizes"]["artifact"] <= uniform.manifest["sizes"]["artifact"]
    ranks = {tuple(gain.spec(n)["branches"][b].get("rank", 0) for b in family) for n in gain.tensor_names
             if gain.is_compressed(n)}
    assert len(ranks) > 1  # ranks really differ between matrices


def test_gain_allocated_branches_serve_and_export_alike(family, tmp_path):
    from server.engine.model import FamilyModel

    out = tmp_path / "gain"
    compress(family, out, CompressOptions(rate=0.8, allocation="gain", progress=False))
    model = FamilyModel.from_artifact(Artifact(out))
    for b, name in enumerate(model.branches):
        ref = logits(export_branch(out, name, tmp_path / name, progress=False))
        got = run_rows(model, PROMPT.tolist(), [0], [0], [b])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
