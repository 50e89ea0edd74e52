"""A numeric quiz (lesson 11): questions whose answers are computed, a pure grading function, a widget.

    q = Question("KV cache per token of LLaMA-2-13B in fp16?", kv_cache_bytes(PRESETS["llama-2-13b"], 1) / 2**10,
                 0.05, "KiB", "2 (K, V) x 40 layers x 40 kv heads x 128 x 2 bytes")
    grade_answer(q, "800 KiB")   # (True, "✅ correct ...")
    grade_answer(q, "0.82 MB")   # (True, ...): an answer may carry its own unit, converted (SI and binary prefixes)
    grade_answer(q, 400)         # (False, "❌ ... too low by 50% ... off by a factor of 2 ...")
    grade_answer(q, "lots")      # ValueError: not a number

An answer is accepted when |value - answer| <= max(rel_tol * |answer|, abs_tol), in the question's unit.
``quiz_widget(questions)`` shows the same check in ipywidgets: a text box, a Check button and feedback per
question, a score, and a button that reveals every answer with its explanation.
"""
from __future__ import annotations

import html
import math
import numbers
import re
from dataclasses import dataclass

#: Units an answer may carry, with their spellings. Dimensionless: "" = "x" (a ratio), "%" = 0.01.
_ALIASES = {"B": "B", "byte": "B", "bytes": "B", "s": "s", "sec": "s", "FLOP": "FLOP", "FLOPs": "FLOP",
            "FLOP/s": "FLOP/s", "FLOPS": "FLOP/s", "B/s": "B/s", "FLOP/B": "FLOP/B", "FLOP/byte": "FLOP/B",
            "token": "tokens", "tokens": "tokens", "block": "blocks", "blocks": "blocks",
            "sequence": "sequences", "sequences": "sequences", "x": "", "×": "", "%": ""}
_PREFIXABLE = {"B", "s", "FLOP", "FLOP/s", "B/s", "tokens"}
_PREFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
             "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
             "m": 1e-3, "u": 1e-6, "µ": 1e-6, "μ": 1e-6, "n": 1e-9}
_MULTIPLIERS = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}     # "32k" with no unit: 32,000
_NUMBER = re.compile(r"^\s*([-+]?(?:\d[\d,_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(.*?)\s*$")


def unit_scale(unit: str) -> tuple[float, str]:
    """``"MiB" -> (1048576.0, "B")``, ``"ms" -> (0.001, "s")``, ``"%" -> (0.01, "")``: the factor to the base unit
    and the base unit ("" for a plain number or ratio). Raises ValueError for a unit it does not know."""
    unit = unit.strip()
    if unit == "":
        return 1.0, ""
    if unit == "%":
        return 0.01, ""
    for spelling in sorted(_ALIASES, key=len, reverse=True):     # longest first: "FLOP/s" before "s"
        if unit.endswith(spelling):
            prefix, base = unit[: -len(spelling)], _ALIASES[spelling]
            if prefix == "":
                return 1.0, base
            if prefix in _PREFIXES and base in _PREFIXABLE:
                return _PREFIXES[prefix], base
    raise ValueError(f"unknown unit {unit!r}; use e.g. B, KiB, MB, GB, s, ms, µs, FLOP/B, TFLOP/s, TB/s, tokens, "
                     "x or %")


def parse_value(value, unit: str = "") -> float:
    """The number ``value`` stands for, in ``unit``: a number (already in ``unit``), or a string such as
    ``"1.6 GB"``, ``"800 KiB"``, ``"3.2e-3 s"``, ``"42 %"``, ``"32k"`` or ``"1,677,721,600"``.
    A string without a unit is read in ``unit``. Raises ValueError (TypeError for a non-number, non-string)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(f"an answer must be a number or a string like '1.6 GB', got {type(value).__name__}")
    q_scale, q_base = unit_scale(unit)
    if isinstance(value, str):
        match = _NUMBER.match(value)
        if not match:
            raise ValueError(f"could not read a number in {value!r}; write e.g. '1.6 GB' or '0.5'")
        number, suffix = float(match.group(1).replace(",", "").replace("_", "")), match.group(2).replace(" ", "")
        if suffix in _MULTIPLIERS:                      # "32k": a plain multiplier of the question's unit
            number, suffix = number * _MULTIPLIERS[suffix], ""
        if suffix:
            scale, base = unit_scale(suffix)
            if base != q_base:
                raise ValueError(f"{value!r} is in {base or 'a plain number'}, but this answer is in "
                                 f"{unit or 'a plain number'}")
            number = number * scale / q_scale
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"the answer must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class Question:
    """A question with a numeric answer (in ``unit``), accepted within ``rel_tol`` (relative) or ``abs_tol``."""

    prompt: str
    answer: float
    rel_tol: float = 0.05
    unit: str = ""
    explanation: str = ""
    hint: str = ""
    lesson: str = ""              # where the course answers it, e.g. "01"
    abs_tol: float = 0.0

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("Question.prompt must be a non-empty string")
        if isinstance(self.answer, bool) or not isinstance(self.answer, numbers.Real) or not math.isfinite(self.answer):
            raise ValueError(f"Question.answer must be a finite number, got {self.answer!r}")
        for name in ("rel_tol", "abs_tol"):
            tol = getattr(self, name)
            if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 <= tol < math.inf):
                raise ValueError(f"Question.{name} must be a finite number >= 0, got {tol!r}")
        unit_scale(self.unit)                           # raises for an unknown unit

    def tolerance(self) -> float:
        return max(self.rel_tol * abs(self.answer), self.abs_tol)


def format_value(x: float) -> str:
    """4 significant digits; large whole numbers in full with thousands separators."""
    a = abs(x)
    if a == 0 or 1e-3 <= a < 1e4:
        return f"{x:.4g}"
    if a < 1e15 and float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.4g}"


def _with_unit(x: float, unit: str) -> str:
    return format_value(x) + ("" if not unit else "%" if unit == "%" else f" {unit}")


def _factor_hint(value: float, answer: float) -> str:
    """A hint when the answer is off by a telltale factor (unit prefixes, K and V, a percentage)."""
    if value == 0 or answer == 0 or (value > 0) != (answer > 0):
        return ""
    ratio = value / answer
    telltale = [(100, "a percentage vs a fraction?"), (2**10 / 1e3, "KiB vs KB (1024 vs 1000)?"),
                (2**20 / 1e6, "MiB vs MB?"), (2**30 / 1e9, "GiB vs GB?"), (2, "K and V both, or bytes per element?")]
    telltale += [(base**k, "a unit prefix (k, M, G or Ki, Mi, Gi)?") for base in (1000, 1024) for k in (1, 2, 3, 4)]
    for factor, why in telltale:
        for f in (factor, 1 / factor):
            if abs(ratio / f - 1) < 0.005:
                return f" Off by a factor of {format_value(max(f, 1 / f))}: {why}"
    return ""


def grade_answer(question: Question, value) -> tuple[bool, str]:
    """``(ok, feedback)`` for ``value`` (a number in the question's unit, or a string with its own unit).
    Pure: no state, no printing. Raises ValueError / TypeError for input that is not a number."""
    if not isinstance(question, Question):
        raise TypeError(f"grade_answer expects a Question, got {type(question).__name__}")
    got = parse_value(value, question.unit)
    answer, unit = question.answer, question.unit
    where = f" (lesson {question.lesson})" if question.lesson else ""
    if abs(got - answer) <= question.tolerance():
        return True, f"✅ Correct: {_with_unit(answer, unit)}. {question.explanation}".rstrip()
    direction = "too high" if got > answer else "too low"
    ratio = got / answer if answer else 0.0
    off = (f" by {abs(ratio - 1):.0%}" if 0.5 <= ratio <= 2 else f": {format_value(ratio)}x the answer" if ratio > 2
           else f": 1/{format_value(1 / ratio)} of the answer" if ratio > 0 else "")
    tol = (f"±{question.rel_tol:.0%}" if question.tolerance() == question.rel_tol * abs(answer) and question.rel_tol
           else f"±{_with_unit(question.tolerance(), unit)}")
    hint = f" Hint: {question.hint}" if question.hint else ""
    return False, (f"❌ Not yet: {_with_unit(got, unit)} is {direction}{off} (tolerance {tol})."
                   f"{_factor_hint(got, answer)}{hint} See the course{where}.")


def quiz_widget(questions: list[Question]):
    """An ipywidgets quiz: per question a prompt, a text box (a number, optionally with a unit), a Check button and
    feedback; below, the score and a button revealing every answer with its explanation. Returns the VBox:
    ``box.children[i]`` is question i's VBox (prompt HTML, HBox(text, button), feedback HTML), then the score and
    the reveal button."""
    import ipywidgets as widgets

    if not questions or not all(isinstance(q, Question) for q in questions):
        raise ValueError("quiz_widget needs a non-empty list of Question")
    correct: set[int] = set()
    score = widgets.HTML()

    def update_score():
        score.value = f"<b>Score: {len(correct)} / {len(questions)}</b>"

    def style(ok: bool | None, text: str) -> str:
        color = {True: "#1a7f37", False: "#b35900", None: "#555"}[ok]
        return f'<span style="color:{color}">{html.escape(text)}</span>'

    rows = []
    for i, q in enumerate(questions):
        text = widgets.Text(placeholder=f"a number{f', in {q.unit}' if q.unit else ''}",
                            layout=widgets.Layout(width="220px"))
        button = widgets.Button(description="Check", layout=widgets.Layout(width="80px"))
        feedback = widgets.HTML()

        def check(_, i=i, q=q, text=text, feedback=feedback):
            try:
                ok, message = grade_answer(q, text.value)
            except (ValueError, TypeError) as err:
                ok, message = None, f"⚠️ {err}"
            (correct.add if ok else correct.discard)(i)
            feedback.value = style(ok, message)
            update_score()

        button.on_click(check)
        unit = f" <i>[{html.escape(q.unit)}]</i>" if q.unit else ""
        lesson = f" <small>(lesson {html.escape(q.lesson)})</small>" if q.lesson else ""
        prompt = widgets.HTML(f"<b>{i + 1}.</b> {html.escape(q.prompt)}{unit}{lesson}")
        rows.append(widgets.VBox([prompt, widgets.HBox([text, button]), feedback]))

    reveal = widgets.Button(description="Show all answers", layout=widgets.Layout(width="160px"))

    def show_all(_):
        for q, row in zip(questions, rows):
            row.children[2].value = style(None, f"Answer: {_with_unit(q.answer, q.unit)}. {q.explanation}")

    reveal.on_click(show_all)
    update_score()
    return widgets.VBox(rows + [score, reveal])
