"""``show_source(obj)``: a lesson shows a whole function, method or class of the library (a Triton kernel too),
syntax-highlighted, under a caption naming its file and lines.

Lessons show the code they teach, and always a *whole* function: a slice of source text cut at a string offset
(``getsource(f)[a:b]``) shows the wrong lines, or fails, after the next rename. A lesson that wants to show part
of a function gets the library to split it into functions that each say one thing (``Scheduler.schedule`` and
its three phases). ``tests/test_source.py`` fails if a notebook calls ``inspect.getsource`` itself.

``show_interface(obj, exercise)`` shows what a lesson may show of a function that is an exercise's answer: its
signature and docstring (a class: those of each method), the bodies replaced by ``...``. The whole code is shown
in the exercise notebook, after the exercise (``tests/test_no_answers_before_exercises.py``).

In Jupyter the listing is HTML highlighted by Pygments (which IPython depends on), with the file's line numbers;
elsewhere (a script, a terminal) it is printed as plain text.
"""
from __future__ import annotations

import ast
import html
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the course's root: captions name files relative to it


@dataclass(frozen=True)
class SourceListing:
    """The source of one function, method or class: its qualified name, file, line range and code (dedented)."""

    name: str
    path: str
    first_line: int
    last_line: int
    code: str
    note: str = ""          # after the caption, e.g. "interface only: its body is exercise 1 of ..."

    @property
    def caption(self) -> str:
        return f"{self.name}  ({self.path}, lines {self.first_line}-{self.last_line})" + \
            (f": {self.note}" if self.note else "")

    def text(self) -> str:
        """Plain text: the caption, then the code."""
        return f"# {self.caption}\n{self.code}"

    def html(self) -> str:
        """HTML: the caption, then the code highlighted with its line numbers in the file."""
        try:
            from pygments import highlight
            from pygments.formatters import HtmlFormatter
            from pygments.lexers import PythonLexer
        except ImportError:                          # IPython brings Pygments; without it, plain <pre>
            body = f"<pre>{html.escape(self.code)}</pre>"
        else:
            numbers = dict(linenos="inline", linenostart=self.first_line) if not self.note else {}
            body = highlight(self.code, PythonLexer(), HtmlFormatter(noclasses=True, nobackground=True, **numbers))
        note = f" · <b>{html.escape(self.note)}</b>" if self.note else ""
        caption = (f"<div style='font-size: 0.85em; color: #555'><code>{html.escape(self.name)}</code> · "
                   f"{html.escape(self.path)}, lines {self.first_line}-{self.last_line}{note}</div>")
        # its own colors, so that the listing reads the same under a light and a dark JupyterLab theme
        return (f"<div class='course-source' style='background: #f8f8f8; color: #1f1f1f; padding: 4px 8px; "
                f"border-radius: 4px; overflow-x: auto'>{caption}{body}</div>")


def _unwrap(obj):
    """The Python function behind a Triton kernel (``JITFunction.fn``, through autotuners and heuristics) or a
    property's getter; anything else as it is."""
    while not (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj)) and hasattr(obj, "fn"):
        obj = obj.fn
    if isinstance(obj, property):
        obj = obj.fget
    return obj


def get_source(obj) -> SourceListing:
    """The whole source of a function, method, class or Triton kernel, with where it lives."""
    target = _unwrap(obj)
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isclass(target)):
        raise TypeError(f"show_source shows a function, method, class or Triton kernel, got {type(obj).__name__}: "
                        "pass the function itself (show_source(Scheduler.schedule)), not its result")
    lines, first = inspect.getsourcelines(target)
    file = Path(inspect.getsourcefile(target)).resolve()
    path = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
    name = getattr(inspect.unwrap(target), "__qualname__", getattr(target, "__name__", repr(target)))
    return SourceListing(name, path, first, first + len(lines) - 1, textwrap.dedent("".join(lines)).rstrip("\n"))


def _hide_bodies(code: str) -> str:
    """The code of a function or class with every function body replaced by its docstring and ``...``."""
    tree = ast.parse(code)

    def hide(fn):
        doc = ast.get_docstring(fn, clean=False)
        fn.body = ([ast.Expr(ast.Constant(doc))] if doc is not None else []) + [ast.Expr(ast.Constant(...))]

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            hide(node)
    return ast.unparse(tree)


def get_interface(obj, exercise: str) -> SourceListing:
    """What ``show_interface`` shows: the listing of ``obj`` with its bodies hidden."""
    listing = get_source(obj)
    return SourceListing(listing.name, listing.path, listing.first_line, listing.last_line,
                         _hide_bodies(listing.code), note=f"interface only: its body is {exercise}, and the "
                         "exercise notebook shows it after the exercise")


def show_source(obj) -> None:
    """Show the whole source of ``obj`` (a function, method, class or Triton kernel of the library): highlighted
    HTML with its file and line numbers in Jupyter, plain text elsewhere. Returns nothing, so that a cell ending
    with it shows the listing once."""
    _display(get_source(obj))


def show_interface(obj, exercise: str) -> None:
    """Show the signature and docstring of ``obj`` (a class: of each of its methods), not its code: in a lesson,
    for a function whose code is the answer to ``exercise`` (e.g. "exercise 1 of exercises/02_paged_attention")."""
    _display(get_interface(obj, exercise))


def _display(listing: SourceListing) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(listing.text())
        return
    display({"text/plain": listing.text(), "text/html": listing.html()}, raw=True)
