"""/v1/router: see and edit routes and exemplars while the server runs, and ask for a decision."""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Response

from router.router import route_input
from router.store import Route, StoreError
from server.api import errors
from server.api.common import within
from server.api.protocol.router import (AddedExemplar, DecideMessages, DecideText, DecisionOut, NewExemplar, NewRoute,
                                        RouteList, RouteOut)


def route_json(route: Route) -> dict:
    return {"name": route.name, "target": route.target, "threshold": route.threshold,
            "description": route.description, "exemplars": [{"id": e.id, "text": e.text} for e in route.exemplars]}



async def _edit(fn, *args, **kw):
    return await _answered(asyncio.to_thread(fn, *args, **kw))


async def _answered(work):
    try:
        return await work
    except StoreError as e:
        if e.unavailable:
            raise errors.APIError(503, str(e), type="server_error", code="store_unavailable",
                                  headers={"Retry-After": "5"}) from None
        status = 404 if e.missing else 409 if e.conflict else 400
        raise errors.APIError(status, str(e), param=None,
                              code="not_found" if e.missing else "conflict" if e.conflict else None) from None


def install_router_routes(app: FastAPI, router, admin, timeout_s) -> None:
    """``timeout_s()``: limits.request_timeout_s, which bounds a decision as it bounds `auto`'s."""
    edits = [Depends(admin)]
    common = (401, 403, 404, 503)

    # OpenAPI links: what a created route or exemplar can be used for next (schemathesis follows them).
    route_links = {"AddExemplar": {"operationId": "addExemplar", "parameters": {"route": "$response.body#/name"}},
                   "DeleteRoute": {"operationId": "deleteRoute", "parameters": {"route": "$response.body#/name"}}}
    exemplar_links = {"DeleteExemplar": {"operationId": "deleteExemplar", "parameters": {
        "route": "$response.body#/route", "exemplar_id": "$response.body#/id"}}}

    @app.get("/v1/router/routes", dependencies=edits, response_model=RouteList, operation_id="listRoutes",
             responses=errors.documented(*common))
    async def list_routes():
        r = router()
        _, routes, calibration = r.store.snapshot_all()
        return {"default_route": r.default_route, "margin": calibration.margin, "fitted_for": calibration.fitted_for,
                "scoring": r.scoring, "routes": [route_json(x) for x in routes]}

    @app.post("/v1/router/routes", status_code=201, dependencies=edits, response_model=RouteOut,
              operation_id="createRoute",
              responses={201: {"links": route_links}, **errors.documented(400, 409, *common)})
    async def create_route(body: NewRoute):
        r = router()
        route = await _edit(r.add_route, body.name, body.target, threshold=body.threshold,
                            description=body.description, exemplars=body.exemplars)
        return route_json(route)

    @app.delete("/v1/router/routes/{route}", status_code=204, dependencies=edits, response_class=Response,
                operation_id="deleteRoute", responses=errors.documented(400, *common))
    async def delete_route(route: str):
        await _edit(router().remove_route, route)
        return Response(status_code=204)

    @app.post("/v1/router/routes/{route}/exemplars", status_code=201, dependencies=edits,
              response_model=AddedExemplar, operation_id="addExemplar",
              responses={201: {"links": exemplar_links}, **errors.documented(400, 409, *common)})
    async def add_exemplar(route: str, body: NewExemplar):
        ex = await _edit(router().store.add_exemplar, route, body.text)
        return {"route": route, "id": ex.id, "text": ex.text}

    @app.delete("/v1/router/routes/{route}/exemplars/{exemplar_id}", status_code=204, dependencies=edits,
                response_class=Response, operation_id="deleteExemplar", responses=errors.documented(*common))
    async def delete_exemplar(route: str, exemplar_id: str):
        await _edit(router().store.remove_exemplar, route, exemplar_id)
        return Response(status_code=204)

    @app.post("/v1/router/decide", dependencies=edits, response_model=DecisionOut, operation_id="decide",
              responses=errors.documented(400, *common, 504))
    async def decide(body: DecideText | DecideMessages):
        r = router()
        if isinstance(body, DecideText):
            text, context = body.text, ""
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text, context = await _edit(route_input, messages, r.input)
        # as `auto` decides: concurrent ones batched, within the same time limit
        decision = await _answered(within(r.adecide_text(text, context), timeout_s()))
        return decision.to_json()
