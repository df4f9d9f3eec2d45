"""The exemplar store: a human-editable YAML file of routes and their exemplars.

    margin: 0.02                    # optional: a best route this close to the runner-up falls to the default
    fitted_for: minilm-...          # optional: the embedder the thresholds and margin were fitted with
    routes:
      math:
        target: llama-math          # a served model name (or a pipeline)
        threshold: 0.35             # optional: below it the default route is used
        description: arithmetic     # optional
        exemplars:
          - What is 17 times 23?    # a plain text gets a stable id derived from it
          - {id: ex-1f2e, text: Solve 3x + 7 = 22.}

Every edit is written atomically (temporary file, fsync, rename) under a file
lock, after a re-read of whatever another process wrote, so concurrent edits
lose nothing and a crash never leaves half a file. Edits keep the file's
comments and layout.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.util import load_yaml_guess_indent

from compression.errors import UserError

MAX_TEXT = 4000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StoreError(ValueError):
    """A bad edit (the API answers 400, or 404 when ``missing`` is set, 409 when ``conflict``, 503 when the store
    cannot be written now: ``unavailable``)."""

    def __init__(self, message: str, missing: bool = False, conflict: bool = False, unavailable: bool = False):
        super().__init__(message)
        self.missing, self.conflict, self.unavailable = missing, conflict, unavailable


LOCK_TIMEOUT_S = 10.0  # how long an edit waits for another process's lock on the file


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


def check_threshold(value) -> float | None:
    """A threshold is a cosine similarity: a number in [-1, 1], or none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not -1 <= value <= 1:
        raise StoreError(f"threshold must be a number in [-1, 1], got {value!r}")
    return float(value)


def _fail(path: Path, node, message: str):
    raise UserError(f"{path}:{node.start_mark.line + 1}: {message}")


def _scalar(path: Path, node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        _fail(path, node, f"{what} must be a single value")
    return node.value


@dataclass
class Calibration:
    """Store-wide settings that ``router fit`` writes next to the per-route thresholds."""
    margin: float | None = None  # best minus runner-up below this: the default route is used
    fitted_for: str | None = None  # the router (embedder and scoring) the thresholds and margin were fitted with


def check_margin(value) -> float | None:
    """A margin is a difference of cosines: a number in [0, 2], or none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 2:
        raise StoreError(f"margin must be a number in [0, 2], got {value!r}")
    return float(value)


def parse_routes(path: Path, text: str) -> dict[str, Route]:
    return parse_store(path, text)[0]


def parse_store(path: Path, text: str) -> tuple[dict[str, Route], Calibration]:
    """Validate the YAML node by node, so an error can name the line it is on."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    calibration = Calibration()
    if root is None:
        return {}, calibration
    if not isinstance(root, yaml.MappingNode):
        _fail(path, root, "expected a mapping with a 'routes' key")
    routes: dict[str, Route] = {}
    for key, value in root.value:
        if key.value == "margin":
            try:
                calibration.margin = check_margin(float(_scalar(path, value, "margin")))
            except ValueError as e:
                _fail(path, value, str(e) if isinstance(e, StoreError) else "margin must be a number")
            continue
        if key.value == "fitted_for":
            calibration.fitted_for = _scalar(path, value, "fitted_for")
            continue
        if key.value != "routes":
            _fail(path, key, f"unknown key {key.value!r} (expected routes, margin or fitted_for)")
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
                        route.threshold = check_threshold(float(_scalar(path, v, "threshold")))
                    except ValueError as e:
                        _fail(path, v, str(e) if isinstance(e, StoreError) else "threshold must be a number")
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
    return routes, calibration


def write_atomically(path: Path, text: str) -> None:
    """Temporary file, fsync, rename, fsync of the directory: a crash leaves the old file or the new one. An
    existing file keeps its mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _layout(text: str) -> dict:
    """The file's indentation, for ruamel to write it back the same: mappings indent by the first indented
    key's indentation; ruamel guesses a sequence's (its items' text) and offset (its dashes')."""
    mapping = next((len(line) - len(line.lstrip(" ")) for line in text.splitlines()
                    if line.startswith(" ") and not line.lstrip(" ").startswith(("-", "#"))), 2)
    sequence, offset = 4, 2
    if text.strip():
        _, guessed, dash = load_yaml_guess_indent(text)
        if guessed is not None:
            sequence, offset = guessed, dash or 0
    return {"mapping": mapping or 2, "sequence": sequence, "offset": offset}


def _round_trip() -> YAML:
    y = YAML(typ="rt")
    y.width = 100
    y.preserve_quotes = True
    return y


class ExemplarStore:
    """The routes of one YAML file, safe across threads and processes.

    Every edit takes a file lock (``.<name>.lock`` beside the file), re-reads the file if anything changed it,
    applies the change to the file's own YAML (comments, order and style are kept), and writes it atomically
    before it returns. ``refresh()`` picks up an outside change (another server, ``branchserve exemplars
    --file``, a hand edit); ``version`` changes whenever the routes may have.

    A missing file with a ``seed`` is served from the seed and written at the first edit or ``materialize()``,
    so a server that fails to start leaves nothing behind.
    """

    def __init__(self, path: str | Path, seed: str | Path | None = None):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._file_lock = FileLock(str(self.path.parent / f".{self.path.name}.lock"), timeout=LOCK_TIMEOUT_S)
        self.version = 0
        self._key = None  # (inode, size, mtime) of the file the routes came from; None: from the seed
        if self.path.exists():
            self._text, self._key = self._read()
        elif seed is not None:
            try:
                self._text = Path(seed).read_text()
            except OSError as e:
                raise UserError(f"cannot read {seed}: {e.strerror or e}") from None
        else:
            raise UserError(f"exemplar file not found: {self.path}")
        self.routes, self.calibration = parse_store(self.path, self._text)

    # -- reading
    def _read(self) -> tuple[str, tuple]:
        try:
            with open(self.path, encoding="utf-8") as f:
                st = os.fstat(f.fileno())
                return f.read(), (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            raise UserError(f"cannot read {self.path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: not UTF-8 text") from None

    def _stat(self):
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def refresh(self) -> bool:
        """Re-read the file if something else changed it. True when the routes were reloaded; UserError
        (naming the line) when the file is no longer valid, and the routes stay as they were."""
        if self._stat() == self._key:
            return False
        with self._lock:
            key = self._stat()
            if key == self._key or key is None:  # a seeded store whose file is still absent
                return False
            text, key = self._read()
            routes, calibration = parse_store(self.path, text)
            self._text, self._key, self.routes, self.calibration = text, key, routes, calibration
            self.version += 1
            return True

    def snapshot(self) -> tuple[int, list[Route]]:
        """The current routes (re-read first if another process changed the file and it is still valid)."""
        return self.snapshot_all()[:2]

    def snapshot_all(self) -> tuple[int, list[Route], Calibration]:
        """As ``snapshot``, with the store-wide calibration of the same version."""
        with self._lock:
            try:
                self.refresh()
            except UserError:
                pass  # the file is broken now: the last valid routes stand (the router logs why)
            routes = [Route(r.name, r.target, r.threshold, r.description, list(r.exemplars))
                      for r in self.routes.values()]
            return self.version, routes, Calibration(self.calibration.margin, self.calibration.fitted_for)

    # -- writing
    def materialize(self) -> None:
        """Write a seeded store's file, if it does not exist yet."""
        with self._lock, self._file_lock:
            if not self.path.exists():
                write_atomically(self.path, self._text)
                self._key = self._stat()

    def _edit(self, change, whole: bool = False):
        """Run ``change(routes)`` (``change(routes, doc)`` when ``whole``) on the file's current YAML under both
        locks; write it; return what it returned. A lock held elsewhere past LOCK_TIMEOUT_S, or a file that
        cannot be written (a full disk), is a StoreError with ``unavailable``: nothing changed."""
        from filelock import Timeout

        try:
            return self._locked_edit(change, whole)
        except Timeout:
            raise StoreError(f"the exemplar file is locked by another process ({self._file_lock.lock_file}) for "
                             f"more than {LOCK_TIMEOUT_S:g} s; nothing was changed, try again", unavailable=True) \
                from None
        except OSError as e:
            raise StoreError(f"the exemplar file cannot be written ({e.strerror or e}); nothing was changed",
                             unavailable=True) from None

    def _locked_edit(self, change, whole: bool):
        with self._lock, self._file_lock:
            try:
                self.refresh()
            except UserError as e:
                raise StoreError(f"the exemplar file is not valid now, fix it first: {e}") from None
            yaml_rt = _round_trip()
            yaml_rt.indent(**_layout(self._text))
            doc = yaml_rt.load(self._text) or CommentedMap()
            if doc.get("routes") is None:
                doc["routes"] = CommentedMap()
            result = change(doc["routes"], doc) if whole else change(doc["routes"])
            out = io.StringIO()
            yaml_rt.dump(doc, out)
            text = out.getvalue()
            routes, calibration = parse_store(self.path, text)  # what is written must read back
            write_atomically(self.path, text)
            self._text, self._key, self.routes, self.calibration = text, self._stat(), routes, calibration
            self.version += 1
            return result

    def _route(self, name: str) -> Route:
        if name not in self.routes:
            raise StoreError(f"unknown route {name!r}", missing=True)
        return self.routes[name]

    def add_exemplar(self, route: str, text) -> Exemplar:
        text = check_text(text)

        def change(routes):
            r = self._route(route)
            if any(e.text == text for e in r.exemplars):
                raise StoreError(f"route {route!r} already has this exemplar", conflict=True)
            spec = routes[route]
            if spec.get("exemplars") is None:
                spec["exemplars"] = CommentedSeq()
            spec["exemplars"].append(text)  # a plain text: its id is derived from it
            return Exemplar(exemplar_id(text), text)

        return self._edit(change)

    def remove_exemplar(self, route: str, ex_id: str) -> None:
        def change(routes):
            r = self._route(route)
            ids = [e.id for e in r.exemplars]  # in the file's order
            if ex_id not in ids:
                raise StoreError(f"route {route!r} has no exemplar {ex_id!r}", missing=True)
            del routes[route]["exemplars"][ids.index(ex_id)]

        self._edit(change)

    def add_route(self, name: str, target: str, threshold: float | None = None, description: str | None = None,
                  exemplars: list[str] = ()) -> Route:
        check_name(name)
        if not isinstance(target, str) or not target.strip():
            raise StoreError("a route needs a target")
        check_threshold(threshold)
        texts = [check_text(t) for t in exemplars]
        if len(set(texts)) != len(texts):
            raise StoreError("duplicate exemplar in the new route", conflict=True)

        def change(routes):
            if name in self.routes:
                raise StoreError(f"route {name!r} already exists", conflict=True)
            spec = CommentedMap(target=target)
            if threshold is not None:
                spec["threshold"] = threshold
            if description:
                spec["description"] = description
            spec["exemplars"] = CommentedSeq(texts)
            routes[name] = spec

        self._edit(change)
        return self.routes[name]

    def remove_route(self, name: str) -> None:
        def change(routes):
            self._route(name)
            del routes[name]

        self._edit(change)

    def set_thresholds(self, thresholds: dict[str, float | None], margin: float | None = None,
                       fitted_for: str | None = None) -> None:
        """Write fitted thresholds, and the margin and what they were fitted for (both at the top of the file,
        before ``routes``; None removes them)."""
        for t in thresholds.values():
            check_threshold(t)
        check_margin(margin)

        def change(routes, doc):
            for name, t in thresholds.items():
                self._route(name)
                if t is None:
                    routes[name].pop("threshold", None)
                else:
                    routes[name]["threshold"] = t
            for key, value in (("fitted_for", fitted_for), ("margin", margin)):
                if value is None:
                    doc.pop(key, None)
                elif key in doc:
                    doc[key] = value
                else:
                    doc.insert(0, key, value)

        self._edit(change, whole=True)
