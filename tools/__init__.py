"""The course's maintenance scripts, run from the repository root (``python tools/make_exercises.py``, ...); a package
so that the tests import them (``from tools import make_exercises``)."""
