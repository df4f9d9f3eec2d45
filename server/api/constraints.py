"""A request's constraint on its output (response_format, vLLM's guided_* extras, a forced tool call), checked
and compiled for the model that answers. Shared by chat and text completions."""

from __future__ import annotations

from server.api import errors
from server.engine.structured import Constraint, ConstraintError


def request_constraint(body, tools=None) -> tuple[Constraint | None, str | None]:
    """The request's one constraint, and the field that set it; a 400 for a bad one or for two."""
    found = []
    try:
        rf = getattr(body, "response_format", None)
        if rf is not None and rf.type == "json_schema":
            found.append((Constraint.json_schema(rf.json_schema.schema_ or {}), "response_format"))
        elif rf is not None and rf.type == "json_object":
            found.append((Constraint.json_schema({"type": "object"}), "response_format"))
        if body.guided_json is not None:
            found.append((Constraint.json_schema(body.guided_json), "guided_json"))
        if body.guided_regex is not None:
            found.append((Constraint.regex(body.guided_regex), "guided_regex"))
        if body.guided_choice is not None:
            found.append((Constraint.choice(body.guided_choice), "guided_choice"))
        if body.guided_grammar is not None:
            found.append((Constraint.grammar(body.guided_grammar), "guided_grammar"))
        if tools is not None and tools.forced:
            found.append((tools.constraint(), "tool_choice"))
    except ConstraintError as e:
        raise errors.bad_request(str(e), param=found[-1][1] if found else None) from None
    if len(found) > 1:
        raise errors.bad_request(f"one constraint per request: {found[0][1]} and {found[1][1]} both set one",
                                 param=found[1][1])
    return found[0] if found else (None, None)


async def compile_for(engine, model: str, constraint: Constraint | None, param: str | None):
    """The constraint compiled for ``model`` in a worker thread (None without one); a 400 when it cannot be."""
    if constraint is None:
        return None
    try:
        return await engine.compile(model, constraint)
    except ConstraintError as e:
        raise errors.bad_request(str(e), param=param, code="invalid_constraint") from None
