"""Coded values that carry their words for people: one pattern for every enum a page shows."""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class LabelledEnum(StrEnum):
    """A coded value with its label (and, optionally, a longer description).

    Members are written ``MEMBER = "code", "Label"`` or ``MEMBER = "code", "Label", "What it
    means"``; the value stays the code (what is stored, sent and compared), so the words live next
    to the code instead of in a dictionary inside a property that must be kept in step with it.
    """

    label: str
    description: str

    def __new__(cls, value: str, label: str = "", description: str = "") -> Self:
        member = str.__new__(cls, value)
        member._value_ = value
        member.label = label or value
        member.description = description
        return member

    @property
    def display(self) -> str:
        """The label (templates and cards read ``display``)."""
        return self.label
