"""Checkpoints that are data, never code.

A checkpoint is one file, ``checkpoint.npz`` in the run directory: an uncompressed ``.npz``
(a zip of ``.npy`` members) written with ``np.savez`` and read back with
``np.load(..., allow_pickle=False)``, so that reading a checkpoint can never run code. It is
written atomically (temporary file + fsync + ``os.replace``): a crash, or a full disk,
leaves the previous checkpoint as it was.

Members (all but the arrays are UTF-8 JSON text stored as ``uint8`` vectors):

``header``
    ``{"format": "stamen-checkpoint", "version": 2, "arrays": N, "sha256": HEX}``.
``tree``
    the state tree in the JSON encoding below, with every array replaced by a reference.
``a0`` … ``a<N-1>``
    the numpy arrays, numpy scalars (0-d arrays) and torch tensors of the tree, in the order
    the encoder met them.

``sha256`` is taken over ``tree``, ``a0``, … ``a<N-1>`` in that order; for each member it
hashes ``name``, ``dtype.str``, ``str(dtype)`` and the shape as a JSON list (each followed
by a NUL byte), then the member's bytes in C order. Loading checks the header, the set of members (exactly
those above, stored uncompressed), the checksum, then decodes the tree; any defect raises
:class:`CheckpointError` naming the file and what is wrong.

The tree encoding (JSON), chosen so that every supported value comes back with its type:

- ``null``, ``true``/``false``, JSON integers, JSON strings: ``None``, ``bool``, ``int``, ``str``;
- JSON numbers with a fraction or exponent: finite ``float`` (Python writes every float that
  way, ``1.0`` not ``1``);
- JSON arrays: ``list``;
- JSON objects are always tagged, ``{"$": TAG, ...}``:
  ``float`` (``"v"``: ``"nan"``, ``"inf"`` or ``"-inf"``), ``tuple`` (``"v"``: items),
  ``dict`` (``"v"``: ``[[key, value], ...]`` in insertion order; keys are scalars or tuples of
  scalars and keep their type, ``1`` and ``"1"`` stay apart), ``bytes`` (``"v"``: base64),
  ``ndarray`` / ``npscalar`` (``"ref"``: member name), ``tensor`` (``"ref"``, ``"dtype"``
  such as ``"torch.bfloat16"``, ``"shape"``, ``"raw"``: true when numpy has no such dtype and
  the member holds the tensor's bytes as ``uint8``).

What a tree may hold: dicts, lists, tuples, ``str``, ``int``, ``float`` (inf and nan too),
``bool``, ``None``, ``bytes``, numpy arrays and scalars of any dtype but ``object``, and torch
tensors (strided, not quantized; restored on the CPU as plain tensors, without autograd state).
Types are checked exactly — a ``defaultdict``, an ``IntEnum`` or an ``np.matrix`` is refused
— and anything else raises :class:`CheckpointError` naming its place in the tree, e.g.
``strategy.selector: cannot store object of type ClientCurriculum``.

Stamen before format 2 pickled the state into ``checkpoint.pkl``. Loading refuses such a file
(unpickling can run code); :func:`convert_legacy_checkpoint` (``stamen convert-checkpoint
DIR``) converts it once the user says they trust it, and even then unpickles with an
allow-list that admits only numpy arrays/scalars and torch tensors (the latter through
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from stamen.server.results import CheckpointError, atomic_write

CHECKPOINT_FILE = "checkpoint.npz"
LEGACY_CHECKPOINT_FILE = "checkpoint.pkl"
CONVERTED_SUFFIX = ".converted"
FORMAT = "stamen-checkpoint"
VERSION = 2  # format 1 was the pickle
LEGACY_VERSION = 1

_TAG = "$"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class LegacyCheckpointError(CheckpointError):
    """The run directory holds only a pickled checkpoint from an older Stamen."""


def legacy_message(legacy: Path) -> str:
    return (f"{legacy} is a pickle written by an older Stamen (before checkpoint format {VERSION}); "
            "loading a pickle can run arbitrary code, so Stamen no longer reads it. If you trust this file "
            f"(you or your team wrote it), convert it with `stamen convert-checkpoint {legacy.parent}`, "
            "then resume")


# -- writing -------------------------------------------------------------------------------


def write_checkpoint(path: str | Path, tree: Any) -> None:
    """Write ``tree`` to ``path`` in the format above, atomically.

    Raises :class:`CheckpointError` when the tree holds something that is not data (naming
    where), or when the file cannot be written (the previous file, if any, is left intact).
    """
    path = Path(path)
    members: dict[str, np.ndarray] = {}
    try:
        encoded = _Encoder(members).encode(tree, "")
    except RecursionError:
        raise CheckpointError(f"cannot write checkpoint {path}: the state is nested too deeply") from None
    tree_bytes = json.dumps(encoded, allow_nan=False, separators=(",", ":")).encode()
    members = {"tree": np.frombuffer(tree_bytes, dtype=np.uint8), **members}
    n_arrays = len(members) - 1
    header = {"format": FORMAT, "version": VERSION, "arrays": n_arrays, "sha256": _digest(members, n_arrays)}
    members["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    try:
        atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **members))
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        reason = reason[:1].lower() + reason[1:]
        kept = "the previous checkpoint is intact" if path.is_file() else "no checkpoint was written"
        hint = "; free some space, then continue the run with --resume" if err.errno == errno.ENOSPC else ""
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}{hint}") from err


def _path_join(path: str, key: Any) -> str:
    if isinstance(key, str) and _IDENTIFIER.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


class _Encoder:
    def __init__(self, members: dict[str, np.ndarray]):
        self.members = members
        self.active: set[int] = set()  # containers on the current path: a cycle is an error

    def _ref(self, arr: np.ndarray) -> str:
        name = f"a{len(self.members)}"
        self.members[name] = arr
        return name

    def encode(self, x: Any, path: str) -> Any:
        t = type(x)
        if x is None or t in (bool, int, str):
            return x
        if t is float:
            return x if math.isfinite(x) else {_TAG: "float", "v": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if t is bytes:
            return {_TAG: "bytes", "v": base64.b64encode(x).decode("ascii")}
        if t in (list, tuple, dict):
            if id(x) in self.active:
                raise CheckpointError(f"{path or '<root>'}: cannot store a {t.__name__} that contains itself")
            self.active.add(id(x))
            try:
                if t is list:
                    return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]
                if t is tuple:
                    return {_TAG: "tuple", "v": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(x)]}
                return {_TAG: "dict", "v": [[self.key(k, path), self.encode(v, _path_join(path, k))]
                                            for k, v in x.items()]}
            finally:
                self.active.discard(id(x))
        if t is np.ndarray:
            if x.dtype.hasobject:
                raise CheckpointError(f"{path or '<root>'}: cannot store a numpy array of dtype {x.dtype} "
                                      "(object arrays need pickle)")
            return {_TAG: "ndarray", "ref": self._ref(x)}
        if isinstance(x, np.generic):
            if x.dtype.hasobject:
                raise CheckpointError(f"{path or '<root>'}: cannot store a numpy scalar of dtype {x.dtype}")
            return {_TAG: "npscalar", "ref": self._ref(np.asarray(x))}
        torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
        if torch is not None and isinstance(x, torch.Tensor):
            return self.tensor(x, path, torch)
        raise CheckpointError(f"{path or '<root>'}: cannot store object of type {t.__name__} "
                              "(a checkpoint holds dicts, lists, tuples, scalars, bytes, numpy arrays and "
                              "torch tensors only)")

    def key(self, k: Any, path: str) -> Any:
        if type(k) is tuple:
            return {_TAG: "tuple", "v": [self.key(v, path) for v in k]}
        if k is None or type(k) in (bool, int, str, float, bytes) or (isinstance(k, np.generic)
                                                                        and not k.dtype.hasobject):
            return self.encode(k, path)
        raise CheckpointError(f"{path or '<root>'}: cannot store a dict key of type {type(k).__name__} "
                              "(keys must be scalars or tuples of scalars)")

    def tensor(self, x, path: str, torch) -> dict[str, Any]:
        odd = ("sparse or non-strided" if x.layout != torch.strided else "quantized" if x.is_quantized
               else "meta" if x.device.type == "meta" else None)
        if odd:
            raise CheckpointError(f"{path or '<root>'}: cannot store a {odd} tensor")
        t = x.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        entry = {_TAG: "tensor", "dtype": str(t.dtype), "shape": list(t.shape), "raw": False}
        try:
            arr = t.numpy().copy()
        except TypeError:  # bfloat16, float8, ... : numpy has no such dtype, store the bytes
            arr = t.reshape(-1).view(torch.uint8).numpy().copy()
            entry["raw"] = True
        entry["ref"] = self._ref(arr)
        return entry


def _digest(members: Mapping[str, np.ndarray], n_arrays: int) -> str:
    h = hashlib.sha256()
    for name in ["tree", *(f"a{i}" for i in range(n_arrays))]:
        a = members[name]
        a = a if a.flags.c_contiguous else a.copy(order="C")
        for part in (name, a.dtype.str, str(a.dtype), json.dumps(list(a.shape))):
            h.update(part.encode() + b"\0")
        h.update(a.reshape(-1).view(np.uint8).data if a.dtype.itemsize else b"")
    return h.hexdigest()


# -- reading -------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, *, layout: Any = None) -> Any:
    """Read a checkpoint written by :func:`write_checkpoint` and return its tree.

    ``layout``, when given, is what the model expects of ``tree["arrays"]``: an object with
    ``names`` and ``shapes`` (``stamen``'s ``Layout``) or a mapping ``{name: shape}``; the
    arrays must be exactly those names, with those shapes, in float32.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    members = _read_members(path)
    try:
        header = json.loads(_text(members, "header", path))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged: its header is not JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Stamen checkpoint (its header does not say format {FORMAT!r})")
    if header.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {header.get('version')!r}; this Stamen reads "
                              f"version {VERSION} (was it written by a newer Stamen?)")
    n = header.get("arrays")
    expected = {"header", "tree", *(f"a{i}" for i in range(n))} if type(n) is int and n == len(members) - 2 else None
    if expected is None or set(members) != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its members {sorted(members)} do not match its header")
    if header.get("sha256") != _digest(members, n):
        raise CheckpointError(f"checkpoint {path} is damaged: its checksum does not match its content "
                              "(the file was changed or corrupted after it was written)")
    try:
        tree = _decode(json.loads(_text(members, "tree", path), parse_constant=_no_constant), members, "")
    except _Malformed as err:
        raise CheckpointError(f"checkpoint {path} is malformed at {err.args[0] or '<root>'}: {err.args[1]}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path} is malformed: its tree is not valid JSON ({err})") from None
    if layout is not None:
        check_layout(tree, layout, path)
    return tree


def _read_members(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos):  # what we write; also: no zip bombs
            raise CheckpointError(f"checkpoint {path} is malformed: it has compressed members")
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path} is not a Stamen checkpoint (not an .npz archive)")
            members = {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated: not a readable .npz archive ({err})") from None
    except ValueError as err:
        if "allow_pickle" in str(err) or "pickled" in str(err):
            raise CheckpointError(f"checkpoint {path} contains pickled (object) data, which Stamen never writes and "
                                  "does not read") from None
        raise CheckpointError(f"checkpoint {path} is damaged: {err}") from None
    except Exception as err:  # OSError, EOFError, zlib/struct errors from a truncated member ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None
    odd = sorted(name for name, a in members.items() if type(a) is not np.ndarray)
    if odd:  # np.load hands back a member that is not .npy data as raw bytes
        raise CheckpointError(f"checkpoint {path} is malformed: members {odd} are not arrays")
    return members


def _text(members: Mapping[str, np.ndarray], name: str, path: Path) -> str:
    a = members.get(name)
    if a is None:
        raise CheckpointError(f"{path} is not a Stamen checkpoint (it has no {name!r} member)")
    if a.dtype != np.uint8 or a.ndim != 1:
        raise CheckpointError(f"checkpoint {path} is malformed: member {name!r} is not a byte string")
    return a.tobytes().decode("utf-8")


def _no_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


class _Malformed(Exception):
    """(path, what is wrong) inside the tree; turned into a CheckpointError with the file name."""


def _decode(x: Any, members: Mapping[str, np.ndarray], path: str, used: set[str] | None = None) -> Any:
    used = set() if used is None else used
    if x is None or type(x) in (bool, int, str, float):
        return x
    if type(x) is list:
        return [_decode(v, members, f"{path}[{i}]", used) for i, v in enumerate(x)]
    if type(x) is not dict or type(x.get(_TAG)) is not str:
        raise _Malformed(path, "an untagged JSON object")
    tag = x[_TAG]

    def field(name: str, kind: type) -> Any:
        v = x.get(name)
        if type(v) is not kind:
            raise _Malformed(path, f"{tag!r} entry without a valid {name!r}")
        return v

    if tag == "float":
        v = field("v", str)
        if v not in _NONFINITE:
            raise _Malformed(path, f"unknown float {v!r}")
        return _NONFINITE[v]
    if tag == "tuple":
        return tuple(_decode(v, members, f"{path}[{i}]", used) for i, v in enumerate(field("v", list)))
    if tag == "bytes":
        try:
            return base64.b64decode(field("v", str), validate=True)
        except ValueError:
            raise _Malformed(path, "invalid base64") from None
    if tag == "dict":
        out: dict[Any, Any] = {}
        for item in field("v", list):
            if type(item) is not list or len(item) != 2:
                raise _Malformed(path, "a dict item that is not a [key, value] pair")
            k = _decode(item[0], members, path, used)
            if not _valid_key(k):
                raise _Malformed(path, f"a dict key of type {type(k).__name__}")
            if k in out:
                raise _Malformed(path, f"dict key {k!r} twice")
            out[k] = _decode(item[1], members, _path_join(path, k), used)
        return out
    if tag in ("ndarray", "npscalar", "tensor"):
        ref = field("ref", str)
        if not re.fullmatch(r"a\d+", ref) or ref not in members:
            raise _Malformed(path, f"reference to a missing array {ref!r}")
        if ref in used:
            raise _Malformed(path, f"array {ref!r} referenced twice")
        used.add(ref)
        arr = members[ref]
        if tag == "ndarray":
            return arr
        if tag == "npscalar":
            if arr.ndim != 0:
                raise _Malformed(path, f"numpy scalar {ref!r} has shape {arr.shape}")
            return arr[()]
        return _tensor(x, arr, path, field)
    raise _Malformed(path, f"unknown tag {tag!r}")


def _valid_key(k: Any) -> bool:
    if type(k) is tuple:
        return all(_valid_key(v) for v in k)
    if isinstance(k, np.generic):  # a structured (void) scalar read back from a file is not hashable
        try:
            hash(k)
        except TypeError:
            return False
        return True
    return k is None or type(k) in (bool, int, str, float, bytes)


def _tensor(x: dict, arr: np.ndarray, path: str, field) -> Any:
    import torch

    dtypes = {str(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    dtype = dtypes.get(field("dtype", str))
    shape = field("shape", list)
    raw = field("raw", bool)
    if dtype is None or not all(type(s) is int and s >= 0 for s in shape):
        raise _Malformed(path, f"tensor with dtype {x['dtype']!r} and shape {shape}")
    try:
        if raw:
            if arr.dtype != np.uint8 or arr.ndim != 1:
                raise ValueError("raw tensor bytes must be a uint8 vector")
            t = torch.from_numpy(arr.copy()).view(dtype).reshape(shape)
        else:
            t = torch.from_numpy(np.array(arr))
            if t.dtype != dtype or list(t.shape) != shape:
                raise ValueError(f"stored as {arr.dtype}{list(arr.shape)}")
    except (TypeError, RuntimeError, ValueError) as err:
        raise _Malformed(path, f"tensor {x['ref']!r} ({x['dtype']}, shape {shape}) does not match its data: {err}") from None
    return t


def check_layout(tree: Any, layout: Any, path: str | Path = "checkpoint") -> None:
    """Check ``tree["arrays"]`` against the model's layout; raise one error naming every mismatch."""
    if isinstance(layout, Mapping):
        want = {str(k): tuple(int(s) for s in v) for k, v in layout.items()}
    else:
        want = {str(k): tuple(int(s) for s in v) for k, v in zip(layout.names, layout.shapes)}
    arrays = tree.get("arrays") if isinstance(tree, dict) else None
    if not isinstance(arrays, dict):
        raise CheckpointError(f"checkpoint {path} has no 'arrays' (the model's tensors)")
    problems = []
    missing, extra = [k for k in want if k not in arrays], [k for k in arrays if k not in want]
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    for name, shape in want.items():
        a = arrays.get(name)
        if name not in arrays:
            continue
        if type(a) is not np.ndarray:
            problems.append(f"{name!r} is a {type(a).__name__}, not a numpy array")
        elif a.shape != shape:
            problems.append(f"{name!r} has shape {a.shape}, the model expects {shape}")
        elif a.dtype != np.float32:
            problems.append(f"{name!r} has dtype {a.dtype}, expected float32")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(problems)} "
                              "(was it written for another task.model / task.hidden / dataset?)")


# -- converting the pickled checkpoints of older Stamen versions ----------------------------


def convert_legacy_checkpoint(run_dir: str | Path) -> Path:
    """Convert ``run_dir/checkpoint.pkl`` to ``checkpoint.npz``; keep the old file as ``.converted``.

    Call this only for a file the user trusts. Even so the pickle is read with an allow-list
    (numpy arrays and scalars, torch tensors via ``torch.load(weights_only=True)``); a pickle
    that names anything else is refused, as is a state that is not a tree. Returns the path of
    the new checkpoint.
    """
    run_dir = Path(run_dir)
    legacy, new = run_dir / LEGACY_CHECKPOINT_FILE, run_dir / CHECKPOINT_FILE
    if not legacy.is_file():
        raise CheckpointError(f"no {LEGACY_CHECKPOINT_FILE} in {run_dir}: nothing to convert")
    if new.exists():
        raise CheckpointError(f"{run_dir} already holds {CHECKPOINT_FILE}; not converting {legacy} over it "
                              f"(delete one of the two if you know which is right)")
    try:
        state = _LegacyUnpickler(io.BytesIO(legacy.read_bytes())).load()
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{legacy} is unreadable ({type(err).__name__}: {err}); not converted") from None
    if not isinstance(state, dict) or state.get("format") != LEGACY_VERSION:
        raise CheckpointError(f"{legacy} is not a Stamen checkpoint of format {LEGACY_VERSION}; not converted")
    state = {k: v for k, v in state.items() if k != "format"}
    try:
        write_checkpoint(new, state)
    except CheckpointError as err:
        raise CheckpointError(f"cannot convert {legacy}: {err}") from None
    read_checkpoint(new)  # what we wrote reads back
    os.replace(legacy, legacy.with_name(legacy.name + CONVERTED_SUFFIX))
    return new


def _torch_storage_from_bytes(b: bytes):
    import torch

    return torch.load(io.BytesIO(b), weights_only=True)


def _legacy_globals() -> dict[tuple[str, str], Any]:
    ok: dict[tuple[str, str], Any] = {}
    core = np._core if hasattr(np, "_core") else np.core
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        ok[(mod, "_reconstruct")] = core.multiarray._reconstruct
        ok[(mod, "scalar")] = core.multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        ok[(mod, "_frombuffer")] = core.numeric._frombuffer
    ok[("numpy", "ndarray")], ok[("numpy", "dtype")] = np.ndarray, np.dtype
    for name, cls in vars(np.dtypes).items() if hasattr(np, "dtypes") else ():
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            ok[("numpy.dtypes", name)] = cls
    import collections

    ok[("collections", "OrderedDict")] = collections.OrderedDict  # torch passes an empty one (hooks)
    try:
        import torch
        import torch._utils
    except ImportError:
        return ok
    ok[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
    ok[("torch._utils", "_rebuild_parameter")] = torch._utils._rebuild_parameter
    ok[("torch.storage", "_load_from_bytes")] = _torch_storage_from_bytes  # torch's own uses weights_only=False
    return ok


class _LegacyUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _LegacyUnpickler._allowed is None:
            _LegacyUnpickler._allowed = _legacy_globals()
        try:
            return _LegacyUnpickler._allowed[(module, name)]
        except KeyError:
            raise CheckpointError(f"the pickle refers to {module}.{name}, which is not a numpy array or torch "
                                  "tensor; a Stamen checkpoint has no reason to contain it; not converted") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("the pickle uses persistent ids, which Stamen never wrote; not converted")

