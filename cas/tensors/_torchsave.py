"""torch.save files, read by their pickle's opcodes: never unpickled, nothing imported or run.

A torch.save file (the zip format, torch 1.6 and later) is a zip whose
``<dir>/data.pkl`` is a pickle of the saved object and whose ``<dir>/data/N``
records hold the raw bytes of storage ``N``. The pickle names each storage
(a persistent id ``('storage', torch.FloatStorage, 'N', 'cpu', numel)``)
inside ``torch._utils._rebuild_tensor_v2`` calls, nested in the dicts and
lists of a state dict, an optimizer state or a Lightning checkpoint.

This module walks the opcodes (:func:`pickletools.genops`) with a small
stack machine that knows only plain data (dicts, lists, tuples, strings,
numbers), ``collections.OrderedDict`` and torch's tensor-rebuilding
functions and storage types. Anything else (another global, a call of
something else, an object built from a class) makes the file plain bytes:
the walk never imports, never calls, and so never runs what a file says.

Each storage record gets the dotted path of the first tensor that uses it
(``model.layer.0.weight``, ``state.3.exp_avg``,
``optimizer_states.0.state.3.exp_avg_sq``), a name that stays the same from
one version of a checkpoint to the next, whatever record number torch gave it.
"""

from __future__ import annotations

import math
import pickletools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from ._safetensors import DTYPES, Header, TensorInfo
from ._zip import MAX_READ, Record, records

#: torch storage type -> safetensors dtype name.
STORAGES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_REBUILD_PARAMETER = {
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
_ORDERED_DICT = ("collections", "OrderedDict")
# Opcodes that push a plain value given as their argument.
_CONSTANTS = {
    "BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
    "BINSTRING", "STRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
}  # fmt: skip
_FIXED = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


@dataclass(frozen=True, slots=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


class _Mark:
    """The MARK opcode's place on the stack."""


_MARK = _Mark()


def _unsupported(what: str) -> InvalidInputError:
    return InvalidInputError(f"the pickle holds {what}, which is not a plain tensor state")


class _Machine:
    """Just enough of the pickle machine for state dicts; raises on anything else."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}

    def run(self, data: bytes) -> Any:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name == "STOP":
                if len(self.stack) != 1:
                    raise _unsupported("a malformed stack")
                return self.stack[0]
            self.step(name, arg)
        raise _unsupported("no STOP")

    def step(self, name: str, arg: Any) -> None:
        stack = self.stack
        if name in _CONSTANTS:
            stack.append(arg)
        elif name in _FIXED:
            stack.append(_FIXED[name])
        elif name in ("PROTO", "FRAME"):
            if name == "PROTO" and not 2 <= arg <= 5:
                raise _unsupported(f"pickle protocol {arg}")
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            self.memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(self.memo[int(arg)])
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
            stack.append({"EMPTY_DICT": {}, "EMPTY_LIST": [], "EMPTY_TUPLE": ()}[name])
        else:
            self.build(name, arg)

    def build(self, name: str, arg: Any) -> None:
        stack = self.stack
        if name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            last = tuple(stack[-count:])
            del stack[-count:]
            if len(last) != count or any(item is _MARK for item in last):
                raise _unsupported("a malformed tuple")
            stack.append(last)
        elif name in ("TUPLE", "LIST", "DICT"):
            items = self.pop_mark()
            if name == "DICT":
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            else:
                stack.append(tuple(items) if name == "TUPLE" else items)
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else self.pop_mark()
            self.top(list).extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else self.pop_mark()
            if name == "SETITEM":
                del stack[-2:]
            self.top(dict).update(zip(items[::2], items[1::2], strict=True))
        elif name == "GLOBAL":
            module, _, attribute = str(arg).partition(" ")
            stack.append(_global(module, attribute))
        elif name == "STACK_GLOBAL":
            attribute, module = stack.pop(), stack.pop()
            stack.append(_global(module, attribute))
        elif name == "BINPERSID":
            stack.append(_storage(stack.pop()))
        elif name == "REDUCE":
            args, function = stack.pop(), stack.pop()
            stack.append(_reduce(function, args))
        elif name == "BUILD":
            stack.pop()  # the state of an OrderedDict (a state dict's ``_metadata``)
            self.top(dict)
        else:
            raise _unsupported(f"the opcode {name}")

    def pop_mark(self) -> list[Any]:
        stack = self.stack
        for index in range(len(stack) - 1, -1, -1):
            if stack[index] is _MARK:
                items = stack[index + 1 :]
                del stack[index:]
                return items
        raise _unsupported("a malformed mark")

    def top(self, kind: type) -> Any:
        if not self.stack or not isinstance(self.stack[-1], kind):
            raise _unsupported(f"an operation on something not a {kind.__name__}")
        return self.stack[-1]


def _global(module: Any, name: Any) -> _Global:
    key = (module, name)
    if key in (_ORDERED_DICT, _REBUILD_TENSOR) or key in _REBUILD_PARAMETER:
        return _Global(module, name)
    if module == "torch" and name in STORAGES:
        return _Global(module, name)
    raise _unsupported(f"the global {module}.{name}")


def _storage(pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise _unsupported("a persistent id that is not a storage")
    _, kind, key, _, numel = pid
    if not isinstance(kind, _Global) or kind.name not in STORAGES:
        raise _unsupported("a storage of an unknown type")
    if not isinstance(key, str) or not _is_int(numel) or numel < 0:
        raise _unsupported("a malformed storage")
    return _Storage(key, STORAGES[kind.name], numel)


def _reduce(function: Any, args: Any) -> Any:
    if not isinstance(function, _Global) or not isinstance(args, tuple):
        raise _unsupported("a call of something not a known function")
    key = (function.module, function.name)
    if key == _ORDERED_DICT and args == ():
        return {}
    if key == _REBUILD_TENSOR and len(args) in (6, 7):
        storage, offset, shape, strides = args[:4]
        plain = isinstance(storage, _Storage) and _is_int(offset) and offset >= 0
        if plain and _ints(shape) and _ints(strides) and len(shape) == len(strides):
            return _Tensor(storage, offset, shape, strides)
    if key in _REBUILD_PARAMETER and len(args) in (3, 4) and isinstance(args[0], _Tensor):
        return args[0]
    raise _unsupported(f"a call of {function.module}.{function.name} with unexpected arguments")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(values: Any) -> bool:
    return isinstance(values, tuple) and all(_is_int(v) and v >= 0 for v in values)


def _tensors(root: Any) -> Iterator[tuple[str, _Tensor]]:
    """(dotted path, tensor) of every tensor, depth first in pickle order, each container once."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", root)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, _Tensor):
            yield path or "tensor", value
            continue
        if isinstance(value, dict):
            children = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(str(i), v) for i, v in enumerate(value)]
        else:
            continue
        if id(value) in seen:  # shared or cyclic: a DAG must not cost exponential time
            continue
        seen.add(id(value))
        prefix = f"{path}." if path else ""
        todo.extend((prefix + key, child) for key, child in reversed(children))


def parse(read: Callable[[int, int], bytes], size: int) -> Header:
    """The storage records of a torch.save file, named by state-dict path.

    Raises InvalidInputError when the file is not one, or not a plain one.
    """
    found = records(read, size)
    pickles = [r for r in found if r.name.endswith("/data.pkl") and r.name.count("/") == 1]
    if len(pickles) != 1:
        raise InvalidInputError("no torch data.pkl record")
    prefix = pickles[0].name[: -len("data.pkl")]
    by_name = {r.name: r for r in found}
    order = by_name.get(prefix + "byteorder")
    if order is not None and read(order.start, order.end - order.start) != b"little":
        raise InvalidInputError("a big-endian torch.save file")
    pickle = pickles[0]
    if pickle.end - pickle.start > MAX_READ:
        raise InvalidInputError("a pickle larger than the reading limit")
    try:
        root = _Machine().run(read(pickle.start, pickle.end - pickle.start))
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as err:
        raise InvalidInputError(f"not a plain torch pickle ({err})") from None
    return _header(root, prefix, by_name)


def _header(root: Any, prefix: str, by_name: dict[str, Record]) -> Header:
    storages: dict[str, TensorInfo] = {}
    views: dict[str, TensorInfo] = {}
    for path, tensor in _tensors(root):
        storage = tensor.storage
        record = by_name.get(f"{prefix}data/{storage.key}")
        itemsize = DTYPES[storage.dtype][0]
        if record is None or record.end - record.start != storage.numel * itemsize:
            raise InvalidInputError(f"tensor {path!r}: its storage record is missing or misfit")
        whole = storages.get(storage.key)
        if whole is None:
            whole = TensorInfo(path, storage.dtype, (storage.numel,), record.start, record.end)
            storages[storage.key] = whole
        views.setdefault(path, _view(path, tensor, whole, itemsize))
    tensors = sorted(storages.values(), key=lambda t: t.start)
    return Header(0, tuple(tensors), None, views=tuple(views.values()), format="torch")


def _view(path: str, tensor: _Tensor, whole: TensorInfo, itemsize: int) -> TensorInfo:
    """The tensor as a strided view of its storage record; its byte range spans what it reads."""
    numel = math.prod(tensor.shape)
    reach = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides, strict=True))
    start = whole.start + tensor.offset * itemsize
    end = start + (reach if numel else 0) * itemsize
    if end > whole.end:
        raise InvalidInputError(f"tensor {path!r} reaches past its storage")
    contiguous = tensor.strides == _contiguous_strides(tensor.shape) and reach == numel
    strides = None if contiguous or numel == 0 else tensor.strides
    return TensorInfo(path, whole.dtype, tensor.shape, start, end, strides)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
