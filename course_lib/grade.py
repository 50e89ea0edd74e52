"""``python -m course_lib.grade [PATH ...]``: the grader's command line, kept at its short name.
The grader itself is ``course_lib.grading.cli``; its docstring says how it works and what it defends."""
import sys

from course_lib.grading.cli import main

if __name__ == "__main__":
    sys.exit(main())
