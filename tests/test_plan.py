"""`branchserve plan`: bytes and KV capacity before loading, checked against what loading takes."""

import json

import pytest
import yaml

from compression.compress import CompressOptions, compress
from compression.synthetic import PHI3_SMALL_CONFIG, build_phi3small, build_standalone
from server.config import ServerConfig
from server.plan import loaded_bytes
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def models(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    compress(family, root / "art", CompressOptions(rate=0.7, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4),
            "small": build_phi3small(root / "small", seed=2)}


def config(models, **limits) -> dict:
    return {"families": [{"artifact": str(models["artifact"]), "branches": {"math": "math", "code": "code"}}],
            "standalone": [{"name": "phi3", "path": str(models["phi3"])},
                           {"name": "small", "path": str(models["small"])}],
            "limits": {"max_batch": 4, "max_context": 256, **limits}}


def test_planned_bytes_match_a_load_and_the_engines_cache(models):
    from server.plan import make_plan
    from server.serve import build_engine

    cfg = ServerConfig.model_validate(config(models, kv_cache_memory="3MiB"))
    plan = make_plan(cfg)
    engine = build_engine(cfg)
    engine.allocate_kv()
    runners = engine.runners
    assert len(plan.models) == len(runners) == 3
    for planned, runner in zip(plan.models, runners):
        loaded = loaded_bytes(runner.model)  # residual factors are buffers; rope tables and such are small
        assert abs(planned.weight_bytes - loaded) <= 0.02 * loaded, (planned.names, planned.weight_bytes, loaded)
        assert planned.kv_per_token == runner.kv_bytes_per_token()
        assert planned.kv_tokens == runner.pool.capacity  # the engine's own split of the budget
    assert sum(m.kv_tokens * m.kv_per_token for m in plan.models) <= 3 * 2**20


def test_plan_without_weights_reads_configs_only(tmp_path):
    from server.plan import make_plan

    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps(PHI3_SMALL_CONFIG))
    cfg = ServerConfig.model_validate({"standalone": [{"name": "small", "path": str(small), "device": "cuda"}],
                                       "limits": {"max_batch": 32, "max_context": 8192}})
    plan = make_plan(cfg, device_memory=48 * 2**30)
    (m,) = plan.models
    # Phi-3-small-8k: 7.39B parameters in bf16; 32 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes per token
    assert m.weight_bytes == 2 * 7_392_272_384
    assert m.kv_per_token == 131072
    # 90% of the card, less what CUDA holds beyond the tensors (832 MiB, measured on an H200), less the weights
    assert m.kv_tokens == (int(0.9 * 48 * 2**30) - 832 * 2**20 - m.weight_bytes) // (16 * 131072) * 16


def test_cli_table_json_and_a_shortfall(models, tmp_path):
    path = tmp_path / "serve.yaml"
    data = config(models)
    for entry in data["families"] + data["standalone"]:
        entry["device"] = "cuda"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    ok = run_cli("plan", "--config", path, "--device-memory", "1GB")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "kind", "device"] and len(lines) == 5
    assert lines[1].startswith("math, code") and "family" in lines[1] and lines[3].startswith("small")
    assert lines[4].startswith("cuda: weights")
    as_json = json.loads(run_cli("plan", "--config", path, "--device-memory", "1GB", "--json").stdout)
    assert [m["names"] for m in as_json["models"]] == ["math, code", "phi3", "small"]
    short = run_cli("plan", "--config", path, "--device-memory", "20MB")
    assert short.returncode == 2
    assert short.stderr.startswith("error: the models do not fit: cuda by ") and short.stderr.count("\n") == 1
    assert "DOES NOT FIT" in short.stdout
    bad = run_cli("plan", "--config", path, "--device-memory", "lots")
    assert bad.returncode == 2 and bad.stderr == "error: --device-memory 'lots' is not a size (say 48GB or 80GiB)\n"


def test_cli_names_what_it_cannot_read(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"format": "branchserve-artifact", "branches": {}}))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"families": [{"artifact": str(art)}]}))
    out = run_cli("plan", "--config", path)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {art / 'manifest.json'}: unreadable")
    assert out.stderr.count("\n") == 1


def test_cuda_graphs_null_block_is_planned_beside_every_sequences_place(models):
    """limits.cuda_graphs keeps one block per graphed model on CUDA for padding rows: on a card with room, every
    model still holds all its sequences at full context; on a tight budget the graphed models (not
    Phi-3-small, which runs eagerly) hold one block fewer than their share."""
    from server.plan import make_plan

    def plan(**limits):
        cfg = config(models, **limits)
        for m in cfg["families"] + cfg["standalone"]:
            m["device"] = "cuda"
        return make_plan(ServerConfig.model_validate(cfg), device_memory=8 * 2**30)

    roomy = plan(cuda_graphs=True)
    assert [m.kv_tokens for m in roomy.models] == [4 * 256] * 3
    assert [m.reserved_blocks for m in roomy.models] == [1, 1, 0]
    tight, eager = plan(cuda_graphs=True, kv_cache_memory="1MiB"), plan(kv_cache_memory="1MiB")
    assert [m.reserved_blocks for m in eager.models] == [0, 0, 0]
    assert sum(m.kv_tokens * m.kv_per_token for m in tight.models) <= 2**20
    assert tight.models[0].kv_tokens < eager.models[0].kv_tokens
