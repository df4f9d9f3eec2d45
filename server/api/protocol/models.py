"""/v1/models and /health."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "branchserve"
    # branchserve's own field: what serves this name (an embedding model answers /v1/embeddings only)
    kind: Literal["branch", "standalone", "pipeline", "router", "embedding"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthBody(BaseModel):
    status: str
    detail: str | None = None
