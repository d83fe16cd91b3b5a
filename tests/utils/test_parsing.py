"""Tests for detres.utils.parsing: finite numbers from text, ints where integral, errors naming the place."""

from __future__ import annotations

import pytest

from detres.utils.parsing import parse_finite_number


def test_integral_values_become_ints_and_others_stay_floats():
    assert parse_finite_number("12", "f") == 12 and isinstance(parse_finite_number("12.0", "f"), int)
    assert parse_finite_number(" -3.5 ", "f") == -3.5


@pytest.mark.parametrize(
    "text, message",
    [("abc", "expected a number"), ("nan", "expected a finite number"), ("-inf", "expected a finite number")],
)
def test_bad_text_names_the_place(text, message):
    with pytest.raises(ValueError, match=rf"^a\.txt:3: {message}.*{text!r}"):
        parse_finite_number(text, "a.txt:3")
