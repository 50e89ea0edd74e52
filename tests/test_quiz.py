"""The quiz of lesson 11 (course_lib.review.quiz): right answers accepted within tolerance, with or without units; wrong
ones rejected with feedback that says why; bad input raises; the widget grades headless (its buttons clicked)."""
from __future__ import annotations

import math

import pytest

from course_lib.review.quiz import Question, format_value, grade_answer, parse_value, quiz_widget, unit_scale

KV13 = Question("KV cache per token of LLaMA-2-13B in fp16?", 800.0, 0.05, "KiB", "2 x 40 x 40 x 128 x 2 B",
                hint="K and V, every layer, every kv head", lesson="01")


# ---------------------------------------------------------------- accepted
@pytest.mark.parametrize("value", [800, 800.0, 780, 839.9, "800", "800 KiB", "800KiB", "819200 B", "819,200 bytes",
                                   "0.82 MB", "0.78125 MiB", "8.192e5 B", "  800  "])
def test_right_answers_within_tolerance_are_accepted(value):
    ok, feedback = grade_answer(KV13, value)
    assert ok, feedback
    assert feedback.startswith("✅") and "800 KiB" in feedback and KV13.explanation in feedback


def test_the_tolerance_edge():
    assert grade_answer(KV13, 800 * 1.0499)[0] and grade_answer(KV13, 800 * 0.9501)[0]
    assert not grade_answer(KV13, 800 * 1.0501)[0] and not grade_answer(KV13, 800 * 0.9499)[0]
    exact = Question("All-reduces per layer (forward)?", 2, rel_tol=0)
    assert grade_answer(exact, 2)[0] and not grade_answer(exact, 2.001)[0]
    zero = Question("Extra FLOPs?", 0.0, rel_tol=0.1, abs_tol=0.5)
    assert grade_answer(zero, 0.4)[0] and not grade_answer(zero, 0.6)[0]


# ---------------------------------------------------------------- rejected, with feedback
def test_wrong_answers_say_how_far_and_which_way():
    ok, feedback = grade_answer(KV13, "1 MB")              # the popular "~1 MB per token"
    assert not ok and feedback.startswith("❌")
    assert "too high by 22%" in feedback and "±5%" in feedback and "lesson 01" in feedback
    assert "800" not in feedback                           # the answer is not given away
    assert KV13.hint in feedback
    ok, feedback = grade_answer(KV13, 100)
    assert not ok and "too low" in feedback and "1/8 of the answer" in feedback


@pytest.mark.parametrize("value, telltale", [(400, "K and V both"), (1600, "K and V both"),
                                             (819_200, "unit prefix"), ("0.0008", "unit prefix"),
                                             (819.2, "KiB vs KB"), ("800 MiB", "unit prefix")])
def test_telltale_factors_get_a_hint(value, telltale):
    strict = Question(KV13.prompt, KV13.answer, 0.01, KV13.unit)   # 1%: a KiB/KB mix-up (2.4%) is caught too
    ok, feedback = grade_answer(strict, value)
    assert not ok and telltale in feedback, feedback


def test_percent_and_ratio_units():
    bubble = Question("Pipeline bubble, p = 4, m = 4?", 100 * 3 / 7, 0.02, "%")
    assert grade_answer(bubble, "42.9%")[0] and grade_answer(bubble, 43)[0] and grade_answer(bubble, "0.4286x")[0]
    ok, feedback = grade_answer(bubble, 0.43)                 # a fraction where a percentage was asked
    assert not ok and "a percentage vs a fraction" in feedback
    ratio = Question("INT8 / FP16 bytes?", 0.508, 0.02, "x")
    assert grade_answer(ratio, "50.8%")[0] and grade_answer(ratio, 0.51)[0] and not grade_answer(ratio, 0.6)[0]


# ---------------------------------------------------------------- units
@pytest.mark.parametrize("unit, scale, base", [("", 1, ""), ("x", 1, ""), ("%", 0.01, ""), ("B", 1, "B"),
                                               ("KiB", 1024, "B"), ("GB", 1e9, "B"), ("ms", 1e-3, "s"),
                                               ("µs", 1e-6, "s"), ("TFLOP/s", 1e12, "FLOP/s"), ("TB/s", 1e12, "B/s"),
                                               ("FLOP/B", 1, "FLOP/B"), ("FLOP/byte", 1, "FLOP/B"),
                                               ("tokens", 1, "tokens"), ("GiB", 2**30, "B"),
                                               ("TFLOPS", 1e12, "FLOP/s")])
def test_unit_scale(unit, scale, base):
    got_scale, got_base = unit_scale(unit)
    assert math.isclose(got_scale, scale) and got_base == base


@pytest.mark.parametrize("text, unit, expected", [("4 ms", "s", 4e-3), ("4000 µs", "ms", 4.0),
                                                  ("3.35 TB/s", "GB/s", 3350),
                                                  ("32k", "tokens", 32_000), ("32k tokens", "tokens", 32_000),
                                                  ("1.68e9", "GB", 1.68e9), ("1.68 GB", "GiB", 1.68e9 / 2**30),
                                                  ("-2.5", "", -2.5), (".5", "", 0.5)])
def test_parse_value(text, unit, expected):
    assert math.isclose(parse_value(text, unit), expected)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", ["", "lots", "GB", "1.6 parsecs", "nan", "inf", "1.6 GB/s", "4 s", "1 e"])
def test_bad_answers_raise_value_error(value):
    with pytest.raises(ValueError):
        grade_answer(KV13, value)


@pytest.mark.parametrize("value", [None, True, [800], {"v": 800}])
def test_non_numbers_raise_type_error(value):
    with pytest.raises(TypeError):
        grade_answer(KV13, value)


def test_float_nan_and_wrong_question_type():
    with pytest.raises(ValueError):
        grade_answer(KV13, float("nan"))
    with pytest.raises(TypeError):
        grade_answer("KV13", 800)


@pytest.mark.parametrize("kwargs", [dict(prompt="", answer=1), dict(prompt="q", answer=float("inf")),
                                    dict(prompt="q", answer="1"), dict(prompt="q", answer=True),
                                    dict(prompt="q", answer=1, rel_tol=-0.1),
                                    dict(prompt="q", answer=1, abs_tol=math.nan),
                                    dict(prompt="q", answer=1, unit="furlongs")])
def test_invalid_questions_are_refused(kwargs):
    with pytest.raises(ValueError):
        Question(**kwargs)


def test_format_value():
    assert format_value(819200.0) == "819,200" and format_value(3.3614) == "3.361" and format_value(0.0) == "0"
    assert format_value(1.5e-6) == "1.5e-06" and format_value(2.5e20) == "2.5e+20"


# ---------------------------------------------------------------- the widget, headless
def test_widget_grades_when_its_buttons_are_clicked():
    bubble = Question("Pipeline bubble, p = 4, m = 4?", 100 * 3 / 7, 0.02, "%", "(p - 1) / (m + p - 1)")
    box = quiz_widget([KV13, bubble])
    rows, score, reveal = box.children[:2], box.children[2], box.children[3]
    assert "0 / 2" in score.value

    def answer(row, text):
        (field, button), feedback = row.children[1].children, row.children[2]
        field.value = text
        button.click()
        return feedback.value

    assert "✅" in answer(rows[0], "800 KiB") and "1 / 2" in score.value
    assert "❌" in answer(rows[1], "0.43") and "1 / 2" in score.value
    assert "⚠️" in answer(rows[1], "lots") and "could not read a number" in rows[1].children[2].value
    assert "✅" in answer(rows[1], "42.86") and "2 / 2" in score.value
    assert "❌" in answer(rows[0], "1 MB") and "1 / 2" in score.value        # a right answer changed to a wrong one
    reveal.click()
    assert "Answer: 800 KiB" in rows[0].children[2].value and "(p - 1) / (m + p - 1)" in rows[1].children[2].value
    assert "lesson 01" in rows[0].children[0].value and "[KiB]" in rows[0].children[0].value


def test_widget_refuses_an_empty_or_wrong_list():
    with pytest.raises(ValueError):
        quiz_widget([])
    with pytest.raises(ValueError):
        quiz_widget([KV13, "not a question"])
