"""Every OpenAI request and answer branchserve serves, and its own (router API, pipelines), in one place:

- base: what all share (Unicode-checked bodies, sampling fields, constraints' extras, usage, logprobs);
- chat: chat completions, their chunks, and a pipeline's answer;
- completions: text completions and embeddings;
- models: /v1/models and /health;
- router: the router API's bodies.

Errors have OpenAI's shape (server/api/errors.py: ErrorBody)."""

from server.api.errors import ErrorBody, ErrorDetail  # noqa: F401
from server.api.protocol.base import *  # noqa: F401,F403
from server.api.protocol.base import (  # noqa: F401
    MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS, SEED_END, SEED_MIN, check_stop, completion_id, lone_surrogate, now,
)
from server.api.protocol.chat import *  # noqa: F401,F403
from server.api.protocol.chat import UNSERVED  # noqa: F401
from server.api.protocol.completions import *  # noqa: F401,F403
from server.api.protocol.models import *  # noqa: F401,F403
from server.api.protocol.router import *  # noqa: F401,F403
