"""The router API's bodies: routes, exemplars and decisions."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from router.store import MAX_TEXT
from server.api.protocol.base import RequestBody
from server.api.protocol.chat import ChatMessage


class _Body(RequestBody):
    model_config = ConfigDict(extra="forbid", strict=True)


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, pattern=r"\S")]


class NewExemplar(_Body):
    text: Text


class NewRoute(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    target: str = Field(min_length=1, description="a served model or pipeline name")
    threshold: float | None = Field(None, ge=-1, le=1)
    description: str | None = Field(None, max_length=MAX_TEXT)
    exemplars: list[Text] = Field([], max_length=1000)


class DecideText(_Body):
    text: str = Field(min_length=1, pattern=r"\S")  # any length: the router embeds a bounded end of it


class DecideMessages(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class ExemplarOut(BaseModel):
    id: str
    text: str


class RouteOut(BaseModel):
    name: str
    target: str
    threshold: float | None
    description: str | None
    exemplars: list[ExemplarOut]


class RouteList(BaseModel):
    default_route: str
    margin: float | None  # best minus runner-up below this: the default route
    fitted_for: str | None  # what the thresholds and margin were fitted with
    scoring: str  # what this router scores with; thresholds fit it when it equals fitted_for
    routes: list[RouteOut]


class AddedExemplar(ExemplarOut):
    route: str


class DecisionOut(BaseModel):
    route: str
    target: str
    score: float | None
    runner_up: str | None
    runner_up_score: float | None
    fallback: bool
    scores: dict[str, float | None]
    truncated: bool
