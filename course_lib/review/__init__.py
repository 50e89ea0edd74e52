"""Lesson 11, the interview review: ``review`` (answers from recorded results), ``quiz``, ``glossary``
(English / 中文)."""
