"""/v1/router: see and edit routes and exemplars while the server runs, and ask for a decision."""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

from router.router import request_text
from router.store import Route, StoreError
from server.api import errors
from server.api.protocol import ChatMessage


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewExemplar(_Body):
    text: str


class NewRoute(_Body):
    name: str
    target: str
    threshold: float | None = None
    description: str | None = None
    exemplars: list[str] = []


class DecideRequest(_Body):
    text: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


def route_json(route: Route) -> dict:
    return {"name": route.name, "target": route.target, "threshold": route.threshold,
            "description": route.description, "exemplars": [{"id": e.id, "text": e.text} for e in route.exemplars]}


async def _edit(fn, *args, **kw):
    try:
        return await asyncio.to_thread(fn, *args, **kw)
    except StoreError as e:
        raise errors.APIError(404 if e.missing else 400, str(e), param=None,
                              code="not_found" if e.missing else None) from None


def install_router_routes(app: FastAPI, router, admin) -> None:
    edits = [Depends(admin)]

    @app.get("/v1/router/routes", dependencies=edits)
    async def list_routes():
        r = router()
        _, routes = r.store.snapshot()
        return {"default_route": r.default_route, "routes": [route_json(x) for x in routes]}

    @app.post("/v1/router/routes", status_code=201, dependencies=edits)
    async def create_route(body: NewRoute):
        r = router()
        route = await _edit(r.add_route, body.name, body.target, threshold=body.threshold,
                            description=body.description, exemplars=body.exemplars)
        return route_json(route)

    @app.delete("/v1/router/routes/{route}", status_code=204, dependencies=edits)
    async def delete_route(route: str):
        await _edit(router().remove_route, route)
        return Response(status_code=204)

    @app.post("/v1/router/routes/{route}/exemplars", status_code=201, dependencies=edits)
    async def add_exemplar(route: str, body: NewExemplar):
        ex = await _edit(router().store.add_exemplar, route, body.text)
        return {"route": route, "id": ex.id, "text": ex.text}

    @app.delete("/v1/router/routes/{route}/exemplars/{exemplar_id}", status_code=204, dependencies=edits)
    async def delete_exemplar(route: str, exemplar_id: str):
        await _edit(router().store.remove_exemplar, route, exemplar_id)
        return Response(status_code=204)

    @app.post("/v1/router/decide", dependencies=edits)
    async def decide(body: DecideRequest):
        r = router()
        if (body.text is None) == (body.messages is None):
            raise errors.bad_request("give exactly one of 'text' or 'messages'")
        if body.text is not None:
            text = body.text
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = await _edit(request_text, messages, r.input)
        decision = await _edit(r.decide_text, text)
        return decision.to_json()
