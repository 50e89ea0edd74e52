"""The browser test. A package, so that its conftest.py imports as ``browser.conftest``: ``tests/conftest.py`` must
be the only module named ``conftest``, since the grader tests import their helpers from it."""
