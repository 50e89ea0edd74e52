"""Lesson 11's crosswalk of the Q&A document: every cell it names exists (by id, in the notebook files), the
questions keep the document's order, every summary formats with the values the lesson computes, and a missing
cell id fails loudly."""
from __future__ import annotations

import pytest

from course_lib.review.crosswalk import DOCUMENT, crosswalk_html, crosswalk_rows, locate

VALUES = dict(kv13_gb=1.0, kv13_gib=1.0, layers_for_983=1.0)


def test_every_named_cell_exists_and_the_order_is_the_documents():
    rows = crosswalk_rows(VALUES)
    assert len(rows) == len(DOCUMENT) and all(row[2] for row in rows)
    main = [q.key for q in DOCUMENT if " " not in q.key]
    assert main == [f"Q{i}" for i in range(1, 13)]
    for q in DOCUMENT:                                  # a follow-up comes right after its question
        if q.key.endswith("追问"):
            i = [d.key for d in DOCUMENT].index(q.key)
            assert DOCUMENT[i - 1].key == q.key.split()[0]
    assert "<table>" in crosswalk_html(VALUES)


def test_a_missing_cell_id_fails_naming_it():
    with pytest.raises(KeyError, match="no-such-id"):
        locate("04", "no-such-id")
    with pytest.raises(KeyError, match="lesson"):
        locate("99", "c00")
