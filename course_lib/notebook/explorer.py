"""``explorer(f, **controls)``: the lessons' interactive explorers (ipywidgets), shown the same way everywhere.

Like ``ipywidgets.interact(f, **controls)``, with two differences that the browser test found worth having:
the function's return value is not printed under its plot (explorer functions return numbers so that a plain
cell can check them), and the controls' labels get the room they need (``max_num_batched_tokens`` would be cut
to ``max_num_b...`` at ipywidgets' default label width).
"""
from __future__ import annotations

import ipywidgets as widgets
from IPython.display import display


def explorer(f, **controls) -> None:
    """Show ``f``'s controls (ipywidgets' abbreviations: ``(lo, hi[, step])``, a list of choices, a bool, a widget)
    and its output, rerun on every change. Returns nothing, so that a cell ending with it shows the explorer once."""
    w = widgets.interactive(f, {"manual": False, "auto_display": False}, **controls)
    for control in w.children[:-1]:            # the last child is the output area
        if getattr(control, "description", ""):
            control.style.description_width = "initial"
    display(w)
