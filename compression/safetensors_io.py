"""Streaming safetensors I/O: a lazy per-tensor reader and a sharded writer.

Both use plain positional file I/O rather than mmap, so a job that walks every
tensor of a checkpoint keeps only the tensors it holds in memory (pages of a
mapping would stay in the process's resident set until the mapping closes).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024
# Room reserved for each output shard's JSON header; a shard rolls over before it
# would overflow. The unused part is padded with spaces, which the format allows.
HEADER_RESERVE = 64 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header without reading its data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: corrupt or truncated safetensors header")
            header_bytes = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end < begin or end - begin != numel * itemsize:
            raise UserError(f"{path}: corrupt safetensors entry for tensor {name!r}")
        if end > data_len:
            raise UserError(f"{path}: truncated safetensors file (tensor {name!r} runs past the end)")
        end_max = max(end_max, end)
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    if end_max != data_len:
        raise UserError(f"{path}: corrupt safetensors file ({data_len - end_max} unexpected trailing bytes)")
    return infos, metadata


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes == 0:
        return out
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(info.path, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [buf[done:]], info.offset + done)
            if got == 0:
                raise UserError(f"{info.path}: truncated while reading tensor {info.name!r}")
            done += got
    except OSError as e:
        raise UserError(f"cannot read {info.path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return out


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; '512MiB' -> 536870912; plain integers are bytes."""
    t = text.strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for suffix, mult in units.items():
        if t.endswith(suffix):
            number = t[: -len(suffix)].strip()
            break
    else:
        number, mult = t, 1
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise UserError(f"not a size: {text!r} (use e.g. 2GB, 512MiB)") from None
    if value <= 0:
        raise UserError(f"size must be positive: {text!r}")
    return value


class ShardedWriter:
    """Writes tensors one at a time into size-bounded safetensors shards.

    Each tensor's bytes go to disk as soon as it is added; only the header is
    kept until its shard closes. ``finish()`` names the shards the Hugging Face
    way (``{prefix}.safetensors`` or ``{prefix}-0000i-of-0000n.safetensors``) and
    writes ``{prefix}.safetensors.index.json`` when there are several.
    """

    def __init__(self, directory: Path, prefix: str = "model", max_shard_bytes: int = 2 * 10**9):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[Path] = []  # temporary names
        self._keys: list[list[str]] = []
        self._file = None
        self._header: dict[str, dict] = {}
        self._header_len = 0
        self._data_len = 0
        self.total_bytes = 0
        self.weight_map: dict[str, str] = {}

    def _open_shard(self) -> None:
        path = self.directory / f".{self.prefix}-{len(self._shards) + 1:05d}.part"
        self._file = open(path, "wb")
        self._file.seek(8 + HEADER_RESERVE)
        self._shards.append(path)
        self._keys.append([])
        self._header = {"__metadata__": {"format": "pt"}}
        self._header_len = len(json.dumps(self._header, separators=(",", ":")))
        self._data_len = 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        header = json.dumps(self._header, separators=(",", ":")).encode()
        assert len(header) <= HEADER_RESERVE
        self._file.seek(0)
        self._file.write(struct.pack("<Q", HEADER_RESERVE))
        self._file.write(header + b" " * (HEADER_RESERVE - len(header)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.weight_map:
            raise ValueError(f"duplicate tensor key {key!r}")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        entry = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [0, 0],
        }
        entry_len = len(json.dumps({key: entry}, separators=(",", ":"))) + 24  # offsets' digits
        if self._file is None or (
            self._keys[-1]
            and (
                self._data_len + nbytes > self.max_shard_bytes
                or self._header_len + entry_len > HEADER_RESERVE
            )
        ):
            self._close_shard()
            self._open_shard()
        entry["data_offsets"] = [self._data_len, self._data_len + nbytes]
        if nbytes:
            self._file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._header[key] = entry
        self._header_len += entry_len
        self._data_len += nbytes
        self.total_bytes += nbytes
        self._keys[-1].append(key)
        self.weight_map[key] = ""  # named in finish()

    def finish(self) -> list[str]:
        """Close the last shard and give every shard its final name; returns the file names."""
        if self._file is None and not self._shards:
            self._open_shard()  # an empty checkpoint is still a valid file
        self._close_shard()
        n = len(self._shards)
        names = []
        for i, (tmp, keys) in enumerate(zip(self._shards, self._keys), start=1):
            name = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.directory / name)
            names.append(name)
            for k in keys:
                self.weight_map[k] = name
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            write_json(self.directory / f"{self.prefix}.safetensors.index.json", index)
        return names

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
