"""Grading: ``Checker`` and ``CheckResult`` (core.py) plus one check module per lesson (lessonNN.py).

Import checks from their lesson module, e.g. ``from course_lib.grading.lesson00 import check_arithmetic_intensity``.
"""
from course_lib.grading.core import Checker, CheckResult

__all__ = ["Checker", "CheckResult"]
