"""Unit tests of course_lib.grading.core: statuses, messages, timeouts, GPU-only checks, reports."""
import time

import pytest
import torch

from course_lib.grading import core
from course_lib.grading.core import Checker, CheckResult


def check_double(student_fn, **checker_kwargs) -> CheckResult:
    """A toy check in the style of the lesson modules: student_fn(n) == 2 * n."""
    with Checker("double", points=2, **checker_kwargs) as c:
        for n in [1, 2, 3]:
            c.check_close(student_fn(n), 2.0 * n, case=f"n={n}", hint="multiply by two")
    return c.result


def stub(n):
    raise NotImplementedError("Exercise: double n")


def crashes(n):
    table = [0, 2]
    return table[n]  # IndexError for n=2


def test_passing_function_gets_full_points(capsys):
    result = check_double(lambda n: 2 * n)
    assert (result.status, result.points, result.max_points) == ("passed", 2, 2)
    assert capsys.readouterr().out.strip() == "✅ double: passed (2/2 points)"


def test_stub_is_not_attempted(capsys):
    result = check_double(stub)
    assert (result.status, result.points) == ("not attempted", 0)
    out = capsys.readouterr().out
    assert out.startswith("⏭ double: not attempted (0/2 points): the stub still raises NotImplementedError")
    assert "Exercise: double n" in out


def test_bare_stub_without_message_is_not_attempted():
    def bare(n):
        raise NotImplementedError

    assert check_double(bare).status == "not attempted"


def test_library_not_implemented_error_is_a_failure():
    def uses_unsupported_op(n):
        err = NotImplementedError("operator not supported on this backend")  # as torch raises it
        raise err  # neither a stub line nor an "Exercise: ..." message

    assert check_double(uses_unsupported_op).status == "failed"


def test_wrong_answer_shows_case_expected_got_and_hint(capsys):
    result = check_double(lambda n: 2 * n if n < 2 else n)  # wrong from n=2 on
    assert (result.status, result.points) == ("failed", 0)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "❌ double: failed (0/2 points)"
    for text in ["case: n=2", "expected: 4.0", "got: 2", "hint: multiply by two"]:
        assert text in out
    assert "n=3" not in out  # stops at the first failing case


def test_student_exception_shows_type_message_and_own_line_without_grader_frames():
    result = check_double(crashes)
    assert result.status == "failed"
    assert "IndexError: list index out of range" in result.message
    assert "return table[n]" in result.message and "crashes()" in result.message
    assert "after 1 passing comparison(s)" in result.message
    for grader_text in ["Traceback", "grading/core.py", "__exit__", "check_close"]:
        assert grader_text not in result.message


def test_student_exception_shows_the_case_it_raised_in():
    with Checker("double", points=2) as c:
        for n in [1, 2, 3]:
            c.case = f"n={n}"
            c.check_close(crashes(n), 2.0 * n, hint="multiply by two")
    result = c.result
    assert result.status == "failed" and result.message.splitlines()[0] == "case: n=2", result.message
    assert "IndexError" in result.message.splitlines()[1]


def test_a_check_without_case_text_names_the_case_set_before_the_call():
    with Checker("double", points=2) as c:
        for n in [1, 2, 3]:
            c.case = f"n={n}"
            c.check_close(n, 2.0 * n, hint="multiply by two")
    assert "case: n=1" in c.result.message


def test_timeout_fails_the_check_and_cannot_be_swallowed():
    def slow(n):
        try:
            time.sleep(30)
        except Exception:  # a learner's broad except must not hide the timeout
            return 2 * n

    start = time.perf_counter()
    result = check_double(slow, timeout_s=0.3)
    assert time.perf_counter() - start < 5
    assert result.status == "failed" and "timed out after 0.3 s" in result.message


def test_keyboard_interrupt_propagates():
    def interrupted(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_double(interrupted)


def gpu_check(student_fn, idiom: str) -> CheckResult:
    with Checker("gpu_only", points=3, needs_gpu=True) as c:
        if idiom == "require_gpu":
            c.require_gpu()
        elif c.skipped:
            return c.result
        c.check_equal(student_fn(), 1, case="once")
    return c.result


@pytest.mark.parametrize("idiom", ["require_gpu", "skipped"])
def test_needs_gpu_on_cpu_is_skipped_not_failed(monkeypatch, capsys, idiom):
    monkeypatch.setattr(core, "HAS_GPU", False)
    calls = []
    result = gpu_check(lambda: calls.append(1) or 1, idiom)
    assert (result.status, result.points, result.max_points) == ("needs a GPU", 0, 3)
    assert calls == []  # the body did not run
    out = capsys.readouterr().out
    assert out.startswith("🖥 gpu_only: needs a GPU (0/3 points)") and out.count("gpu_only") == 1


def test_needs_gpu_runs_with_a_gpu(monkeypatch):
    monkeypatch.setattr(core, "HAS_GPU", True)  # pretend: the body itself uses no CUDA
    assert gpu_check(lambda: 1, "require_gpu").status == "passed"
    assert gpu_check(lambda: 2, "skipped").status == "failed"


def tensor_failure(got, want, **kw) -> str:
    with Checker("tensors", points=1) as c:
        c.check_close(got, want, case="x of shape [2, 3]", **kw)
    assert c.result.status == "failed"
    return c.result.message


def test_tensor_shape_mismatch():
    assert "shape mismatch: expected (2, 3), got (3, 2)" in tensor_failure(torch.zeros(3, 2), torch.zeros(2, 3))


def test_tensor_dtype_mismatch():
    msg = tensor_failure(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, 3))
    assert "dtype mismatch: expected torch.float32, got torch.float16" in msg


def test_tensor_value_summary_has_count_first_index_and_errors():
    want = torch.zeros(2, 3)
    got = want.clone()
    got[1, 0], got[1, 2] = 0.5, -2.0
    msg = tensor_failure(got, want, rtol=1e-3, atol=1e-3)
    assert "case: x of shape [2, 3]" in msg
    assert "2 of 6 elements differ; first at index [1, 0]: expected 0, got 0.5" in msg
    assert "max abs error 2" in msg and "rtol=0.001, atol=0.001" in msg


def test_tensor_not_a_tensor():
    got = tensor_failure([[0.0] * 3] * 2, torch.zeros(2, 3))
    assert "expected a torch.Tensor (2, 3) torch.float32, got list" in got


def test_close_within_tolerance_passes_and_nan_equals_nan():
    with Checker("close", points=1) as c:
        c.check_close(torch.tensor([1.0, float("nan")]) + 1e-7, torch.tensor([1.0, float("nan")]), rtol=1e-5)
        c.check_close([1.0, 2.0], (1.0, 2.0 + 1e-9))
        c.check_close(torch.tensor(3.0), 3)
    assert c.result.status == "passed"


def test_check_equal_on_lists_names_the_first_difference():
    with Checker("tokens", points=1) as c:
        c.check_equal([5, 6, 7, 8], [5, 6, 9, 8], case="prompt [5, 6]", hint="greedy decoding")
    assert "at [2]: expected 9, got 7" in c.result.message and "hint: greedy decoding" in c.result.message
    with Checker("tokens", points=1) as c:
        c.check_equal([5, 6], [5, 6, 9], case="prompt [5, 6]")
    assert "length mismatch: expected 3 items, got 2" in c.result.message


def test_free_form_check():
    with Checker("free", points=1) as c:
        c.check(1 + 1 == 3, case="arithmetic", expected="3", got="2", hint="it is a toy")
    assert c.result.message == "case: arithmetic\nexpected: 3\ngot: 2\nhint: it is a toy"


def test_quiet_checks_print_nothing(capsys):
    from course_lib.grading.core import quiet

    with quiet():
        result = check_double(lambda n: 2 * n)
    assert result.status == "passed" and capsys.readouterr().out == ""
    check_double(lambda n: 2 * n)
    assert "double: passed" in capsys.readouterr().out


def test_check_equal_on_a_tensor_against_a_number_still_shows_both():
    with Checker("mixed", points=1) as c:
        c.check_equal(torch.tensor([1, 2]), 3, case="mixed types")
    assert "expected: 3" in c.result.message and "got: tensor([1, 2])" in c.result.message


def test_an_outer_alarm_survives_a_checker():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.4)
        check_double(lambda n: 2 * n, timeout_s=5)
        time.sleep(1)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
