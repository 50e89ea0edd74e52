"""What lessons use to show things: ``explorer`` (interactive sliders that also run headless), ``source`` (show a
library function whole), ``timing`` (timings with their spread, observations instead of asserts)."""
