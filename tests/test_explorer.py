"""course_lib.notebook.explorer: controls with room for their labels, and the function's return value not displayed."""
from unittest import mock

import ipywidgets as widgets

from course_lib.notebook import explorer as explorer_module


def test_explorer_shows_controls_with_full_labels_and_hides_the_return_value():
    calls = []

    def f(max_num_batched_tokens=64, chunked=True, mode="recompute"):
        calls.append((max_num_batched_tokens, chunked, mode))
        return {"a": 1}

    shown = []
    with mock.patch.object(explorer_module, "display", shown.append):
        assert explorer_module.explorer(f, max_num_batched_tokens=(16, 512, 16), chunked=True,
                                        mode=["recompute", "swap"]) is None
    (w,) = shown
    assert isinstance(w, widgets.interactive)
    controls = w.children[:-1]
    assert [c.description for c in controls] == ["max_num_batched_tokens", "chunked", "mode"]
    assert all(c.style.description_width == "initial" for c in controls)
    assert calls == [(64, True, "recompute")]          # ran once with the defaults
    controls[0].value = 128                             # a slider change reruns f
    assert calls[-1] == (128, True, "recompute")
    assert w.result == {"a": 1} and not w.auto_display  # kept, not displayed under the plot
