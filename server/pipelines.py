"""Pipelines: stage 1 reasons freely, stage 2 rewrites its answer in the required format.

A stage renders its user message from a Jinja2 template that sees the original
``messages``, the last user ``question``, the previous stage's text as
``draft`` (from stage 2 on) and the stage's ``domain``. Every template is loaded
and checked when the server starts: a missing file or an unknown variable stops
the start, never a request.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import jinja2
from jinja2 import meta

from compression.errors import UserError
from server.config import PipelineConfig, StageConfig
from server.engine.sequence import Event
from server.engine.core import Engine
from server.engine.structured import Constraint, ConstraintError

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


def prompts_dir() -> Path:
    return Path(str(resources.files("prompts")))


def template_source(ref: str, where: str) -> tuple[Path, str]:
    path = Path(ref) if ref.endswith(".jinja") else prompts_dir() / "pipelines" / f"{ref}.jinja"
    try:
        return path, path.read_text()
    except OSError:
        raise UserError(f"{where}: template not found: {path}") from None


def load_template(ref: str, allowed: set[str], where: str) -> jinja2.Template:
    """``ref``: a name under prompts/pipelines/ (without .jinja) or a path to a .jinja file."""
    path, source = template_source(ref, where)
    try:
        ast = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: {path}:{e.lineno}: {e.message}") from None
    unknown = sorted(meta.find_undeclared_variables(ast) - allowed)
    if unknown:
        raise UserError(f"{where}: {path} uses unknown variable(s) {', '.join(unknown)} "
                        f"(available: {', '.join(sorted(allowed))})")
    return _ENV.from_string(source)


@functools.lru_cache(maxsize=1)
def _expert_template() -> jinja2.Template:
    return load_template(str(prompts_dir() / "system" / "expert.jinja"), {"domain"}, "expert prompt")


def expert_prompt(domain: str) -> str:
    return _expert_template().render(domain=domain).strip()


def with_system(messages: list[dict], text: str) -> list[dict]:
    """Put ``text`` at the head of the system message (adding one when there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{text}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def with_expert(messages: list[dict], domain: str | None) -> list[dict]:
    """Put the domain-expert sentence at the head of the system message."""
    return with_system(messages, expert_prompt(domain)) if domain else messages


@dataclass
class Stage:
    config: StageConfig
    template: jinja2.Template
    constraint: Constraint | None = None  # from the stage config, else from the template's header
    grammar: object | None = None  # the constraint compiled for the stage's model (Pipeline.prepare)


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]

    @property
    def final_model(self) -> str:
        return self.stages[-1].config.model

    @property
    def stage_models(self) -> str:
        """Its stages' models in order, as the metrics' ``stages`` label: "phi3,math"."""
        return ",".join(st.config.model for st in self.stages)

    def prepare(self, engine: Engine) -> None:
        """Compile each stage's constraint for its model (at start: a bad one stops the start, not a request)."""
        for i, stage in enumerate(self.stages):
            if stage.constraint is not None:
                try:
                    stage.grammar = engine.compile_now(stage.config.model, stage.constraint)
                except ConstraintError as e:
                    raise UserError(f"pipeline {self.name!r} stage {i + 1}: {e}") from None


def stage_constraint(sc: StageConfig, template_source: str, where: str) -> Constraint | None:
    """The stage config's constraint, else the one its template declares in a first-line comment:
    ``{# constraint: {"choice": ["A", "B"]} #}`` (json_schema, regex or choice)."""
    spec = {k: v for k, v in (("json_schema", sc.json_schema), ("regex", sc.regex), ("choice", sc.choice))
            if v is not None}
    if not spec:
        m = re.match(r"\s*\{#-?\s*constraint:(.*?)-?#\}", template_source, re.S)
        if m is None:
            return None
        try:
            spec = json.loads(m.group(1))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: the template's constraint header is not JSON: {e.msg}") from None
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("json_schema", "regex", "choice"):
            raise UserError(f"{where}: the template's constraint header takes one of json_schema, regex, choice")
    kind, value = next(iter(spec.items()))
    try:
        return {"json_schema": Constraint.json_schema, "regex": Constraint.regex, "choice": Constraint.choice}[kind](
            value)
    except ConstraintError as e:
        raise UserError(f"{where}: {e}") from None


def load_pipelines(configs: list[PipelineConfig], served: set[str]) -> dict[str, Pipeline]:
    pipelines: dict[str, Pipeline] = {}
    for pc in configs:
        if pc.name in served or pc.name in pipelines or pc.name == "auto":
            raise UserError(f"pipeline name {pc.name!r} is already taken")
        stages = []
        for i, sc in enumerate(pc.stages):
            where = f"pipeline {pc.name!r} stage {i + 1}"
            if sc.model not in served:
                raise UserError(f"{where}: model {sc.model!r} is not served (served: {', '.join(sorted(served))})")
            allowed = {"messages", "question", "domain"} | ({"draft"} if i > 0 else set())
            template = load_template(sc.template, allowed, where)
            stages.append(Stage(sc, template, stage_constraint(sc, template_source(sc.template, where)[1], where)))
        pipelines[pc.name] = Pipeline(pc.name, stages)
    if pipelines:
        expert_prompt("check")  # the shared system template must load too
    return pipelines


@dataclass
class StageResult:
    model: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class PipelineResult:
    stages: list[StageResult] = field(default_factory=list)

    @property
    def content(self) -> str:
        return self.stages[-1].text if self.stages else ""

    @property
    def reasoning(self) -> str | None:
        return self.stages[0].text if len(self.stages) > 1 else None


class StageFailed(RuntimeError):
    pass


async def run_pipeline(engine: Engine, inputs, pipeline: Pipeline, messages: list[dict], question: str,
                       final_max_tokens: int | None, seed: int | None,
                       on_event: Callable[[int, Event], None] | None = None, final_grammar=None,
                       reservation=None) -> PipelineResult:
    """Run the stages in order, each prepared by ``inputs`` (the API's InputProcessor: its template, the chat
    template, its sampling); ``on_event(stage_index, event)`` sees every stage's deltas. The caller admits
    the request (``reservation``, from ``Engine.reserve``: one place for all its stages, released by the
    caller when the pipeline ends); its stages are not counted or refused on their own.
    ``final_grammar``: the request's own constraint, compiled for the last stage's model; it replaces that
    stage's.

    Cancelling the task that awaits this cancels whichever stage is running.
    """
    result = PipelineResult()
    draft = None
    for i, stage in enumerate(pipeline.stages):
        prompt, params = await inputs.stage(pipeline, i, messages, question, draft, final_max_tokens, seed,
                                            final_grammar)
        stream = engine.submit(stage.config.model, prompt, params, reservation=reservation)  # admitted once
        parts, error = [], None
        try:
            async for ev in stream:
                parts.append(ev.text)
                error = ev.error or error
                if on_event is not None:
                    on_event(i, ev)
        finally:
            stream.cancel()  # no-op when it finished; frees its blocks when we were cancelled
        if stream.finish_reason == "error":
            raise StageFailed(f"stage {i + 1} ({stage.config.model}) failed: {error}")
        draft = "".join(parts)
        result.stages.append(StageResult(stage.config.model, draft, stream.finish_reason, len(prompt),
                                         stream.completion_tokens))
    return result


def get_question(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""

