"""Calling the learner's code in their own kernel, from the grader: references, copies and the sync back.

The grader runs every check in its own process. What a check receives for an exercise is a ``RemoteObject``: a
reference to the learner's function, class or kernel, which lives in the notebook's kernel. Calling it sends the
arguments there (pickled), runs the learner's code there, and reads back the result with ``wire.safe_loads``
(values only). Arguments the call changes in place (a block table the learner appends to, an allocator, a tree
of nodes, the ``out`` tensor of a Triton kernel) are copied back into the grader's own objects, so a check reads
them exactly as if the learner's code had run in the grader: same objects, same identities (``victim is want``).

What the learner's code can influence is therefore what it returns and what it does to its arguments, never the
verdict, which the check computes in the grader. Each object the learner's code creates that is not a plain value
(an instance of their own class, a bound method, a Triton launcher) stays in the kernel as a reference.

``run_beside(obj, "module:function", ...)`` runs a course function next to ``obj``: in the kernel when ``obj`` is
a ``RemoteObject``, here otherwise. Checks use it for instruments that must watch the learner's code as it runs
(a spy on ``torch.softmax``, the simulated ranks of lesson 08, the recorded decode loop of lesson 01); what the
instrument reports is again read as values.

The kernel's side is ``KernelServer``: the grader starts it in the kernel's namespace after the notebook ran.
"""
from __future__ import annotations

import builtins
import collections
import importlib
import io
import operator
import os
import pickle
import re
import traceback
import types
from pathlib import Path

import torch

from course_lib.grading import wire
from course_lib.grading.runner import KernelDied

_THIS_FILE = str(Path(__file__).resolve())
_OPS = {"getattr": getattr, "setattr": setattr, "getitem": operator.getitem, "setitem": operator.setitem,
        "len": len, "list": list, "hasattr": hasattr, "eval": None}


class RemoteError(Exception):
    """An exception of a type the grader does not re-create (the learner's own class): its name and message."""


# ---------------------------------------------------------------- what is copied back after a call
def _kind(obj) -> str | None:
    """How a call's argument is tracked: its state is copied back by kind; None: not tracked at all."""
    if isinstance(obj, (RemoteObject, type, types.ModuleType, torch.nn.Module)):
        return None
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, collections.deque):
        return "deque"
    if isinstance(obj, list):
        return "list"
    if isinstance(obj, dict):
        return "dict"
    if isinstance(obj, set):
        return "set"
    if hasattr(obj, "__dict__") and not callable(obj):
        return "object"
    return None


def _collect(root) -> list:
    """Every mutable object reachable from ``root`` (lists, dicts, sets, objects, tensors), each once."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, tuple):
            stack.extend(reversed(obj))
            continue
        kind = _kind(obj)
        if kind is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if kind in ("list", "deque", "set"):
            stack.extend(reversed(list(obj)))
        elif kind == "dict":
            stack.extend(reversed([x for kv in obj.items() for x in kv]))
        elif kind == "object":
            stack.extend(reversed(list(vars(obj).values())))
    return found


def _state(obj, kind: str):
    if kind in ("list", "deque", "set"):
        return list(obj)
    if kind == "dict":
        return list(obj.items())
    if kind == "object":
        return dict(vars(obj))
    return None


def _apply(obj, kind: str, state) -> None:
    """Puts the kernel's version of a tracked argument into the grader's object (wrong shapes of state: ignored)."""
    if state is None:
        return
    if kind in ("list", "deque", "set", "dict") and not isinstance(state, list):
        return
    if kind == "list":
        obj[:] = state
    elif kind == "deque":
        obj.clear()
        obj.extend(state)
    elif kind == "set":
        obj.clear()
        obj.update(state)
    elif kind == "dict" and all(isinstance(kv, tuple) and len(kv) == 2 for kv in state):
        obj.clear()
        obj.update(state)
    elif kind == "object" and isinstance(state, dict) and all(isinstance(k, str) for k in state) and wire.is_plain(obj):
        vars(obj).clear()
        vars(obj).update(state)


# ---------------------------------------------------------------- the grader's side
class RemoteObject:
    """A reference to an object in the learner's kernel. Its Python type is named after the object's type."""

    __slots__ = ("_session", "_rid", "_type_name")
    _classes: dict[str, type] = {}

    def __new__(cls, session, rid: int, type_name: str):
        name = re.sub(r"\W", "_", type_name.rsplit(".", 1)[-1])[:60] or "object"
        sub = cls._classes.get(name)
        if sub is None:
            sub = cls._classes[name] = type(name, (RemoteObject,), {"__slots__": ()})
        self = object.__new__(sub)
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_rid", rid)
        object.__setattr__(self, "_type_name", type_name)
        return self

    def __call__(self, *args, **kwargs):
        return self._session.call(self, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._session.call(("op", "getattr"), (self, name), {})

    def __setattr__(self, name, value):
        self._session.call(("op", "setattr"), (self, name, value), {})

    def __getitem__(self, key):
        return self._session.call(("op", "getitem"), (self, key), {})

    def __setitem__(self, key, value):
        self._session.call(("op", "setitem"), (self, key, value), {})

    def __len__(self):
        return self._session.call(("op", "len"), (self,), {})

    def __iter__(self):
        return iter(self._session.call(("op", "list"), (self,), {}))

    def __repr__(self):
        return f"<{self._type_name} object in your notebook>"


def is_remote(obj) -> bool:
    return isinstance(obj, RemoteObject)


def type_name(obj) -> str:
    """The type's name of a value or of the learner's object behind a reference."""
    return obj._type_name.rsplit(".", 1)[-1] if isinstance(obj, RemoteObject) else type(obj).__name__


def run_beside(obj, spec: str, *args, **kwargs):
    """``module:function(*args, **kwargs)``, run in the process where ``obj`` lives (the kernel, or here)."""
    if isinstance(obj, RemoteObject):
        return obj._session.call(("lib", spec), args, kwargs)
    return _library_function(spec)(*args, **kwargs)


def _library_function(spec: str):
    module, _, name = spec.partition(":")
    if not module.startswith(("course_lib.", "kernels")):
        raise ValueError(f"{spec}: only course functions run beside the learner's code")
    return getattr(importlib.import_module(module), name)


class _GraderPickler(wire.WirePickler):
    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, RemoteObject):
            return ("ref", obj._rid)
        return None


class Session:
    """Remote calls over one kernel. ``execute(code, timeout)`` runs code there; ``deadline()`` gives seconds left."""

    def __init__(self, execute, workdir: Path, time_left):
        self._execute, self._dir, self._time_left = execute, Path(workdir), time_left
        self._calls, self._reading = 0, False
        self.broken = False  # a call did not complete: the kernel may still run the learner's code

    def eval(self, expression: str):
        """The value (or a reference) of an expression in the notebook's namespace."""
        return self.call(("op", "eval"), (expression,), {})

    def call(self, fn, args: tuple, kwargs: dict):
        if self._reading:
            raise pickle.UnpicklingError("a reply may not call back into the notebook while the grader reads it")
        if self.broken:
            raise KernelDied("the kernel is gone: an earlier call crashed it or ran out of time")
        self._calls += 1
        request, response = self._dir / f"call{self._calls}.in", self._dir / f"call{self._calls}.out"
        tracked = _collect((args, kwargs))
        storages: dict = {}  # the storages of the tracked tensors, in order: the kernel copies back each one
        for t in (t for t in tracked if isinstance(t, torch.Tensor)):
            s = t.untyped_storage()
            storages.setdefault((str(s.device), s.data_ptr(), s.nbytes()), wire._Storage(s))
        originals = [s.storage for s in storages.values()]
        buf = io.BytesIO()
        _GraderPickler(buf, dict(storages)).dump({"storages": list(storages.values()), "fn": fn, "args": args,
                                                  "kwargs": kwargs, "tracked": tracked})
        request.write_bytes(buf.getvalue())
        self.broken = True
        try:
            self._execute(f"__course_grader__.handle({str(request)!r}, {str(response)!r})", self._time_left())
        finally:
            request.unlink(missing_ok=True)
        self.broken = False
        try:
            data = response.read_bytes()
        except OSError:
            raise RemoteError("the call returned nothing (did your code replace the grader's helper in the "
                              "notebook?)") from None
        finally:
            response.unlink(missing_ok=True)
        self._reading = True
        try:
            reply = wire.safe_loads(data, lambda pid: self._persistent_load(pid, tracked, originals))
        finally:
            self._reading = False
        if not (isinstance(reply, dict)
                and isinstance(reply.get("states"), list) and len(reply["states"]) == len(tracked)
                and isinstance(reply.get("storages"), list) and len(reply["storages"]) == len(originals)):
            raise RemoteError("the kernel's reply is malformed")
        for original, data in zip(originals, reply["storages"]):
            if isinstance(data, bytes) and len(data) == original.nbytes() and data:
                src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                torch.empty(0, dtype=torch.uint8, device=original.device).set_(original).copy_(src)
        for obj, state in zip(tracked, reply["states"]):
            _apply(obj, _kind(obj), state)
        if reply.get("error") is not None:
            raise _exception(reply["error"])
        return reply.get("result")

    def _persistent_load(self, pid, tracked: list, storages: list):
        if (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "tracked" and type(pid[1]) is int
                and 0 <= pid[1] < len(tracked)):
            return tracked[pid[1]]
        if (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "storage" and type(pid[1]) is int
                and 0 <= pid[1] < len(storages)):
            return storages[pid[1]]
        if (isinstance(pid, tuple) and len(pid) == 3 and pid[0] == "ref" and type(pid[1]) is int
                and isinstance(pid[2], str)):
            return RemoteObject(self, pid[1], pid[2][:200])
        raise pickle.UnpicklingError(f"unknown reference {str(pid)[:80]}")


def _exception(info) -> Exception:
    """The learner's exception, re-created as a built-in type (or the course's) where one of its bases is one."""
    if not isinstance(info, dict) or not isinstance(info.get("mro"), list) or not info["mro"]:
        return RemoteError("an error of an unknown kind")
    mro = [e for e in info["mro"] if isinstance(e, tuple) and len(e) == 2 and all(isinstance(x, str) for x in e)]
    cls = next((_RAISABLE[e] for e in mro if e in _RAISABLE), None)
    if cls is None:  # the learner's own exception class: keep its name for the message
        name = re.sub(r"\W", "_", mro[0][1] if mro else "Error")[:60] or "Error"
        cls = _REMOTE_ERRORS.setdefault(name, type(name, (RemoteError,), {}))
    exc = cls.__new__(cls)
    args = info.get("args")
    plain = (str, int, float, bool, type(None))
    exc.args = tuple(a for a in args if isinstance(a, plain))[:4] if isinstance(args, tuple) else ()
    frames = info.get("frames") if isinstance(info.get("frames"), list) else []
    exc.remote_frames = [traceback.FrameSummary(f[0], f[1], f[2], line=f[3]) for f in frames
                         if isinstance(f, tuple) and len(f) == 4 and isinstance(f[0], str) and type(f[1]) is int
                         and isinstance(f[2], str) and isinstance(f[3], (str, type(None)))][-40:]
    return exc


_REMOTE_ERRORS: dict[str, type] = {}


def _raisable() -> dict:
    from course_lib.grading.core import OutOfBounds
    from course_lib.paging.block_manager import OutOfBlocksError

    found = {("builtins", name): obj for name, obj in vars(builtins).items()
             if isinstance(obj, type) and issubclass(obj, Exception)}
    for cls in (OutOfBlocksError, OutOfBounds):
        found[(cls.__module__, cls.__qualname__)] = cls
    return found


_RAISABLE = _raisable()


# ---------------------------------------------------------------- the kernel's side
class _TrackedStorage:
    def __init__(self, index: int):
        self.index = index


class _KernelPickler(wire.WirePickler):
    def __init__(self, file, server: KernelServer, tracked_ids: dict, storage_index: dict):
        super().__init__(file)
        self._server, self._tracked, self._storage_index = server, tracked_ids, storage_index

    def storage_ref(self, key):
        j = self._storage_index.get(key)
        return None if j is None else _TrackedStorage(j)

    def persistent_id(self, obj):
        if isinstance(obj, _TrackedStorage):
            return ("storage", obj.index)
        i = self._tracked.get(id(obj))
        if i is not None:
            return ("tracked", i)
        if wire.is_plain(obj):
            return None
        return ("ref", self._server.keep(obj), f"{type(obj).__module__}.{type(obj).__qualname__}")


class KernelServer:
    """Runs the grader's calls in the notebook's namespace. Started by the grader as ``__course_grader__``."""

    def __init__(self, namespace: dict):
        self.namespace, self.objects = namespace, {}

    def keep(self, obj) -> int:
        rid = id(obj)
        self.objects[rid] = obj
        return rid

    def _load(self, pid):
        if isinstance(pid, tuple) and pid[0] == "ref" and pid[1] in self.objects:
            return self.objects[pid[1]]
        raise pickle.UnpicklingError(f"unknown reference {pid!r}")

    def handle(self, request_path: str, response_path: str) -> None:
        with open(request_path, "rb") as f:
            unpickler = pickle.Unpickler(f)
            unpickler.persistent_load = self._load
            request = unpickler.load()
        storages = request["storages"]
        tracked = request["tracked"]
        result = error = None
        try:
            result = self._run(request["fn"], request["args"], request["kwargs"])
        except BaseException as exc:  # reported to the grader, which decides
            error = _error_info(exc)
        tracked_ids = {id(obj): i for i, obj in enumerate(tracked)}
        storage_index = {(str(s.device), s.data_ptr(), s.nbytes()): j for j, s in enumerate(storages)}
        reply = {"result": result, "error": error, "states": [_state(o, _kind(o)) for o in tracked],
                 "storages": [bytes(torch.empty(0, dtype=torch.uint8, device=s.device).set_(s).cpu().numpy().tobytes())
                              for s in storages]}
        buf = io.BytesIO()
        try:
            _KernelPickler(buf, self, tracked_ids, storage_index).dump(reply)
        except Exception as exc:  # a result that cannot travel: say so instead
            buf = io.BytesIO()
            unsent = TypeError(f"your result could not be sent to the grader: {exc}")
            reply.update(result=None, error=_error_info(unsent))
            _KernelPickler(buf, self, tracked_ids, storage_index).dump(reply)
        tmp = response_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, response_path)

    def _run(self, fn, args, kwargs):
        if isinstance(fn, tuple) and fn[0] == "op":
            if fn[1] == "eval":
                return eval(args[0], self.namespace)  # the grader's own expression, from its manifest
            return _OPS[fn[1]](*args, **kwargs)
        if isinstance(fn, tuple) and fn[0] == "lib":
            return _library_function(fn[1])(*args, **kwargs)
        return fn(*args, **kwargs)


def _error_info(exc: BaseException) -> dict:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != _THIS_FILE]
    args = exc.args if all(isinstance(a, (str, int, float, bool, type(None))) for a in exc.args) else (str(exc),)
    return {"mro": [(c.__module__, c.__qualname__) for c in type(exc).__mro__],
            "args": tuple(a[:4000] if isinstance(a, str) else a for a in args[:4]),
            "frames": [(f.filename, f.lineno or 0, f.name, f.line) for f in frames][-40:]}
