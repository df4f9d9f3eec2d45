"""A request's constraint on its output (response_format, vLLM's guided_* extras, a forced tool call), checked
and compiled for the model that answers. Shared by chat and text completions."""

from __future__ import annotations

from server.api import errors
from server.engine.structured import CompilerBusy, Constraint, ConstraintError


def request_constraint(body, tools=None) -> tuple[Constraint | None, str | None]:
    """The request's one constraint, and the field that set it; a 400 naming the field for a bad one or for two."""
    rf = getattr(body, "response_format", None)
    asked = []  # (field, how to build its constraint)
    if rf is not None and rf.type == "json_schema":
        asked.append(("response_format", lambda: Constraint.json_schema(rf.json_schema.schema_ or {})))
    elif rf is not None and rf.type == "json_object":
        asked.append(("response_format", lambda: Constraint.json_schema({"type": "object"})))
    for name, build in (("guided_json", Constraint.json_schema), ("guided_regex", Constraint.regex),
                        ("guided_choice", Constraint.choice), ("guided_grammar", Constraint.grammar)):
        value = getattr(body, name)
        if value is not None:
            asked.append((name, lambda build=build, value=value: build(value)))
    if tools is not None and tools.forced:
        asked.append(("tool_choice", tools.constraint))
    if len(asked) > 1:
        raise errors.bad_request(f"one constraint per request: {asked[0][0]} and {asked[1][0]} both set one",
                                 param=asked[1][0])
    if not asked:
        return None, None
    field, build = asked[0]
    try:
        return build(), field
    except ConstraintError as e:
        raise errors.bad_request(str(e), param=field) from None


async def compile_for(engine, model: str, constraint: Constraint | None, param: str | None):
    """The constraint compiled for ``model`` in a worker thread (None without one); a 400 when it cannot be."""
    if constraint is None:
        return None
    try:
        return await engine.compile(model, constraint)
    except ConstraintError as e:
        raise errors.bad_request(str(e), param=param, code="invalid_constraint") from None
    except CompilerBusy as e:
        raise errors.queue_full(str(e)) from None
