"""course_lib.grading.remote and wire: calls into the learner's namespace keep the semantics a check relies on
(in-place changes, identities, views, exceptions, stubs), and the grader's reader refuses what is not a value.

The kernel's side runs in this process here (a KernelServer over a dict namespace, requests executed directly);
tests/test_grade_cli.py covers the same path through a real Jupyter kernel."""
from __future__ import annotations

import io
import pickle
import textwrap

import numpy as np
import pytest
import torch

from course_lib.paging.block_manager import BlockAllocator, OutOfBlocksError
from course_lib.grading import wire
from course_lib.grading.core import Checker
from course_lib.grading.remote import KernelServer, RemoteError, RemoteObject, Session, run_beside, type_name
from course_lib.serving.sequence import Sequence

NOTEBOOK = '''
import numpy as np, torch
from course_lib.paging.block_manager import OutOfBlocksError
from course_lib.serving.sequence import Sequence

def append_two(xs):
    xs.append(len(xs))
    xs.append(len(xs))

def take_latest(running, waiting):
    victim = max(running, key=lambda s: s.arrival_time)
    running.remove(victim)
    waiting.insert(0, victim)
    return victim

def write_out(x, out):
    out.copy_(x * 2)          # a view of a longer buffer: its tail must stay untouched

def view_of(buf):
    return buf[:, :2]

class Counter:
    def __init__(self, start):
        self.n = start
    def bump(self):
        self.n += 1
        return self.n

def stub(x):
    raise NotImplementedError("Exercise: write this")

def raises_value_error(x):
    raise ValueError(f"bad x={x}")

class MyError(KeyError):
    pass

def raises_own(x):
    raise MyError("mine")

def raises_out_of_blocks():
    raise OutOfBlocksError("full")

def numpy_values():
    return np.float64(1.5), np.int64(3), np.arange(3, dtype=np.float32)

def new_sequence():
    return Sequence(7, 7, [1, 2, 3])
'''


@pytest.fixture
def session(tmp_path):
    namespace: dict = {}
    exec(textwrap.dedent(NOTEBOOK), namespace)
    namespace["__course_grader__"] = KernelServer(namespace)
    return Session(lambda code, timeout: exec(code, namespace), tmp_path, lambda: 60)


def test_plain_results_come_back_as_values(session):
    a, b, arr = session.eval("numpy_values")()
    assert (type(a), a, type(b), b) == (float, 1.5, int, 3)
    assert isinstance(arr, np.ndarray) and arr.tolist() == [0, 1, 2]
    assert session.eval("1 + 2") == 3


def test_in_place_changes_reach_the_graders_objects(session):
    xs = [10]
    session.eval("append_two")(xs)
    assert xs == [10, 1, 2]


def test_identities_survive_the_round_trip(session):
    running = [Sequence(i, i, [1], arrival_time=float(i)) for i in range(3)]
    want, waiting = running[2], []
    victim = session.eval("take_latest")(running, waiting)
    assert victim is want and want not in running and waiting[0] is want and len(running) == 2


def test_tensor_arguments_are_written_back_and_guard_regions_kept(session):
    buf = torch.full((6,), float("nan"))
    x = torch.arange(4.0)
    session.eval("write_out")(x, buf[:4])
    assert buf[:4].tolist() == [0, 2, 4, 6] and torch.isnan(buf[4:]).all()


def test_a_returned_view_shares_the_graders_storage(session):
    buf = torch.zeros(3, 4)
    view = session.eval("view_of")(buf)
    assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() and view.shape == (3, 2)


def test_the_learners_objects_stay_in_the_kernel(session):
    counter = session.eval("Counter")(5)
    assert isinstance(counter, RemoteObject) and type_name(counter) == "Counter"
    assert counter.bump() == 6 and counter.bump() == 7 and counter.n == 7
    assert "Counter object in your notebook" in repr(counter)


def test_library_values_travel_by_value(session):
    seq = session.eval("new_sequence")()
    assert isinstance(seq, Sequence) and seq.prompt_token_ids == [1, 2, 3]


def test_exceptions_keep_their_type_message_and_frames(session):
    with pytest.raises(ValueError, match="bad x=3") as info:
        session.eval("raises_value_error")(3)
    assert any("raises_value_error" == f.name for f in info.value.remote_frames)
    with pytest.raises(KeyError):       # the learner's own subclass: its first built-in base
        session.eval("raises_own")(1)
    with pytest.raises(OutOfBlocksError, match="full"):
        session.eval("raises_out_of_blocks")()


def test_a_stub_is_not_attempted_through_a_reference(session):
    with Checker("x", points=1) as c:
        session.eval("stub")(1)
    assert c.result.status == "not attempted"
    with Checker("y", points=1) as c:
        session.eval("raises_value_error")(1)
    assert c.result.status == "failed" and "your code raised ValueError: bad x=1" in c.result.message
    assert "in raises_value_error()" in c.result.message


def test_run_beside_runs_course_functions_next_to_the_object(session):
    remote = session.eval("append_two")
    assert run_beside(remote, "course_lib.grading.remote:type_name", remote) == "function"
    assert run_beside(len, "course_lib.grading.remote:type_name", [1]) == "list"
    with pytest.raises(ValueError, match="only course functions"):
        run_beside(remote, "os:system", "true")


def test_an_allocator_class_round_trip(session):
    allocator = BlockAllocator(4)
    session.eval("lambda a: [a.allocate() for _ in range(2)]")(allocator)
    assert allocator.num_free_blocks == 2 and sorted(allocator.ref_counts) == [0, 0, 1, 1]


# ---------------------------------------------------------------- the reader refuses what is not a value
class _Evil:
    def __reduce__(self):
        import os
        return os.system, ("echo pwned",)


def test_reader_refuses_globals_outside_the_allow_list():
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        wire.safe_loads(pickle.dumps(_Evil()), None)
    with pytest.raises(pickle.UnpicklingError):
        wire.safe_loads(pickle.dumps(Checker), None)   # a class the grader does not read


def test_reader_refuses_a_tensor_that_reaches_past_its_storage():
    storage = wire.rebuild_storage(bytes(16), "cpu")
    assert wire.rebuild_tensor(storage, "float32", (2, 2), (2, 1), 0).shape == (2, 2)
    with pytest.raises(pickle.UnpicklingError, match="past the end"):
        wire.rebuild_tensor(storage, "float32", (4, 4), (4, 1), 0)
    with pytest.raises(pickle.UnpicklingError, match="negative"):
        wire.rebuild_tensor(storage, "float32", (2,), (-1,), 1)


def test_reader_refuses_calls_back_into_the_kernel_while_reading(session):
    ref = session.eval("append_two")

    class CallsRef:
        def __reduce__(self):
            return ref, ([],)

    class Pickler(wire.WirePickler):
        def persistent_id(self, obj):
            return ("ref", ref._rid, "function") if obj is ref else None

    buf = io.BytesIO()
    Pickler(buf).dump(CallsRef())
    with pytest.raises(pickle.UnpicklingError, match="may not call back"):
        session._reading = True
        try:
            wire.safe_loads(buf.getvalue(), lambda pid: RemoteObject(session, pid[1], pid[2]))
        finally:
            session._reading = False


def test_a_malformed_reply_is_an_error_not_a_crash(session, tmp_path):
    namespace = {}
    namespace["__course_grader__"] = type("Fake", (), {"handle": staticmethod(
        lambda i, o: open(o, "wb").write(pickle.dumps({"result": 1})))})()
    fake = Session(lambda code, timeout: exec(code, namespace), tmp_path, lambda: 60)
    with pytest.raises(RemoteError, match="malformed"):
        fake.call(("op", "eval"), ("1",), {})


# ---------------------------------------------------------------- instruments watch the learner's code where it runs
INSTRUMENTED = '''
import torch
from course_lib.model.kv_cache import KVCache

def softmax_cheat(x, block_size):
    return torch.softmax(x, dim=-1)

def uncached_decode(model, prompt_ids, max_new_tokens):
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]

def no_all_reduce(x_shard, weight_shard, bias, all_reduce):
    y = x_shard @ weight_shard.T
    return y + bias if bias is not None else y
'''


@pytest.fixture
def instrumented(tmp_path):
    namespace: dict = {}
    exec(textwrap.dedent(INSTRUMENTED), namespace)
    namespace["__course_grader__"] = KernelServer(namespace)
    return Session(lambda code, timeout: exec(code, namespace), tmp_path, lambda: 60)


def test_instruments_run_beside_the_learners_code(instrumented):
    from course_lib.grading import lesson01, lesson03, lesson08
    from course_lib.grading.core import quiet

    with quiet():
        softmax = lesson03.check_online_softmax(instrumented.eval("softmax_cheat"))
        decode = lesson01.check_cached_greedy_decode(instrumented.eval("uncached_decode"))
        ranks = lesson08.check_row_parallel_forward(instrumented.eval("no_all_reduce"))
    assert softmax.status == "failed" and "torch.softmax / logsumexp are not allowed" in softmax.message
    assert decode.status == "failed" and "the first call (prefill)" in decode.message
    assert ranks.status == "failed" and "no all_reduce call" in ranks.message
