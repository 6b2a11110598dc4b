"""Which stop regexes are refused: a repeat inside a repeat (exponential backtracking in
Python's ``re``, which holds the GIL for the whole search); everything else is allowed."""

import re
import sys
import time

import pytest

from engine_core.requests.regex_safety import nested_repeat

REFUSED = [r"(a+)+$", r"(.+)+x", r"(\w+\s?)+$", r"(x+x+)+y", r"(?:x|(y+))*z", r"((a|b)c+)+"]
ALLOWED = [
    r"</answer>",
    r"\n\n",
    r"(foo|bar)+",
    r"(?:ab)+c",
    r".*done.*",
    r"[A-Z]+\d{3}",
    r"\d+\.\d+",
    r"(?:Answer|ANSWER):\s*\S+",
]


@pytest.mark.parametrize("pattern", REFUSED)
def test_a_repeat_inside_a_repeat_is_refused(pattern):
    assert nested_repeat(pattern)


@pytest.mark.parametrize("pattern", ALLOWED)
def test_other_patterns_are_allowed_and_search_fast(pattern):
    assert not nested_repeat(pattern)
    start = time.perf_counter()
    re.search(pattern, "word " * 2000 + "!")
    assert time.perf_counter() - start < 1.0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="possessive / atomic syntax is 3.11+")
def test_possessive_and_atomic_bodies_do_not_backtrack():
    assert not nested_repeat(r"(a++)+$") and not nested_repeat(r"(?>a+)+$")
