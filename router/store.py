"""The exemplar store: a human-editable YAML file of routes and their exemplars.

    routes:
      math:
        target: llama-math          # a served model name (or a pipeline)
        threshold: 0.35             # optional: below it the default route is used
        description: arithmetic     # optional
        exemplars:
          - What is 17 times 23?    # a plain text gets a stable id derived from it
          - {id: ex-1f2e, text: Solve 3x + 7 = 22.}

Every edit is written atomically (temporary file, fsync, rename) under a lock,
so concurrent edits lose nothing and a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compression.errors import UserError

MAX_TEXT = 4000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StoreError(ValueError):
    """A bad edit (the API answers 400, or 404 when ``missing`` is set)."""

    def __init__(self, message: str, missing: bool = False, conflict: bool = False):
        super().__init__(message)
        self.missing, self.conflict = missing, conflict


@dataclass
class Exemplar:
    id: str
    text: str


@dataclass
class Route:
    name: str
    target: str
    threshold: float | None = None
    description: str | None = None
    exemplars: list[Exemplar] = field(default_factory=list)

    def to_yaml(self) -> dict:
        out: dict = {"target": self.target}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.description:
            out["description"] = self.description
        out["exemplars"] = [{"id": e.id, "text": e.text} for e in self.exemplars]
        return out


def exemplar_id(text: str) -> str:
    return "ex-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise StoreError("exemplar text must be a non-empty string")
    if len(text) > MAX_TEXT:
        raise StoreError(f"exemplar text is longer than {MAX_TEXT} characters")
    return text.strip()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(f"route name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


def _fail(path: Path, node, message: str):
    raise UserError(f"{path}:{node.start_mark.line + 1}: {message}")


def _scalar(path: Path, node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        _fail(path, node, f"{what} must be a single value")
    return node.value


def parse_routes(path: Path, text: str) -> dict[str, Route]:
    """Validate the YAML node by node, so an error can name the line it is on."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        _fail(path, root, "expected a mapping with a 'routes' key")
    routes: dict[str, Route] = {}
    for key, value in root.value:
        if key.value != "routes":
            _fail(path, key, f"unknown key {key.value!r} (expected 'routes')")
        if isinstance(value, yaml.ScalarNode) and value.value in ("", "null", "~"):
            continue
        if not isinstance(value, yaml.MappingNode):
            _fail(path, value, "'routes' must map route names to their settings")
        for name_node, spec in value.value:
            name = _scalar(path, name_node, "a route name")
            try:
                check_name(name)
            except StoreError as e:
                _fail(path, name_node, str(e))
            if name in routes:
                _fail(path, name_node, f"route {name!r} is defined twice")
            if not isinstance(spec, yaml.MappingNode):
                _fail(path, spec, f"route {name!r} must be a mapping with target and exemplars")
            route = Route(name, "")
            for k, v in spec.value:
                if k.value == "target":
                    route.target = _scalar(path, v, "target")
                elif k.value == "threshold":
                    try:
                        route.threshold = float(_scalar(path, v, "threshold"))
                    except ValueError:
                        _fail(path, v, "threshold must be a number")
                elif k.value == "description":
                    route.description = _scalar(path, v, "description")
                elif k.value == "exemplars":
                    if not isinstance(v, yaml.SequenceNode):
                        _fail(path, v, "exemplars must be a list")
                    seen = set()
                    for item in v.value:
                        if isinstance(item, yaml.ScalarNode):
                            text, ex_id = item.value, None
                        elif isinstance(item, yaml.MappingNode):
                            fields = {fk.value: _scalar(path, fv, fk.value) for fk, fv in item.value}
                            unknown = set(fields) - {"id", "text"}
                            if unknown or "text" not in fields:
                                _fail(path, item, "an exemplar is a text or {id, text}")
                            text, ex_id = fields["text"], fields.get("id")
                        else:
                            _fail(path, item, "an exemplar is a text or {id, text}")
                        try:
                            text = check_text(text)
                        except StoreError as e:
                            _fail(path, item, str(e))
                        if text in seen:
                            _fail(path, item, f"duplicate exemplar in route {name!r}")
                        seen.add(text)
                        route.exemplars.append(Exemplar(ex_id or exemplar_id(text), text))
                else:
                    _fail(path, k, f"unknown key {k.value!r} in route {name!r}")
            if not route.target:
                _fail(path, name_node, f"route {name!r} has no target")
            routes[name] = route
    return routes


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ExemplarStore:
    def __init__(self, path: str | Path, seed: str | Path | None = None):
        self.path = Path(path)
        self._lock = threading.RLock()
        if not self.path.exists():
            if seed is None:
                raise UserError(f"exemplar file not found: {self.path}")
            seed = Path(seed)
            write_atomically(self.path, seed.read_text())
        try:
            text = self.path.read_text()
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e.strerror or e}") from None
        self.routes: dict[str, Route] = parse_routes(self.path, text)
        self.version = 0  # bumped by every edit; readers rebuild what they derived from the routes

    def snapshot(self) -> tuple[int, list[Route]]:
        with self._lock:
            return self.version, [Route(r.name, r.target, r.threshold, r.description, list(r.exemplars))
                                  for r in self.routes.values()]

    def _save(self) -> None:
        body = {"routes": {name: r.to_yaml() for name, r in self.routes.items()}}
        write_atomically(self.path, yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100))
        self.version += 1

    def _route(self, name: str) -> Route:
        if name not in self.routes:
            raise StoreError(f"unknown route {name!r}", missing=True)
        return self.routes[name]

    def add_exemplar(self, route: str, text) -> Exemplar:
        text = check_text(text)
        with self._lock:
            r = self._route(route)
            if any(e.text == text for e in r.exemplars):
                raise StoreError(f"route {route!r} already has this exemplar", conflict=True)
            ex = Exemplar(exemplar_id(text), text)
            r.exemplars.append(ex)
            try:
                self._save()
            except BaseException:
                r.exemplars.remove(ex)
                raise
            return ex

    def remove_exemplar(self, route: str, ex_id: str) -> None:
        with self._lock:
            r = self._route(route)
            keep = [e for e in r.exemplars if e.id != ex_id]
            if len(keep) == len(r.exemplars):
                raise StoreError(f"route {route!r} has no exemplar {ex_id!r}", missing=True)
            old, r.exemplars = r.exemplars, keep
            try:
                self._save()
            except BaseException:
                r.exemplars = old
                raise

    def add_route(self, name: str, target: str, threshold: float | None = None, description: str | None = None,
                  exemplars: list[str] = ()) -> Route:
        check_name(name)
        if not isinstance(target, str) or not target:
            raise StoreError("a route needs a target")
        texts = [check_text(t) for t in exemplars]
        if len(set(texts)) != len(texts):
            raise StoreError("duplicate exemplar in the new route")
        with self._lock:
            if name in self.routes:
                raise StoreError(f"route {name!r} already exists", conflict=True)
            route = Route(name, target, threshold, description, [Exemplar(exemplar_id(t), t) for t in texts])
            self.routes[name] = route
            try:
                self._save()
            except BaseException:
                del self.routes[name]
                raise
            return route

    def remove_route(self, name: str) -> None:
        with self._lock:
            route = self._route(name)
            del self.routes[name]
            try:
                self._save()
            except BaseException:
                self.routes[name] = route
                raise

    def set_thresholds(self, thresholds: dict[str, float | None]) -> None:
        with self._lock:
            for name, t in thresholds.items():
                self._route(name).threshold = t
            self._save()
