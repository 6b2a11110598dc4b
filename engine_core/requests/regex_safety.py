"""Refuse stop regexes whose search can take exponential time.

``stop_regex`` is searched after every token on the engine loop's thread, and Python's ``re``
holds the GIL for a whole search: one pattern that backtracks catastrophically on the
output, such as ``(.+)+x`` or ``(\\w+\\s?)+$``, freezes every request of the engine (and an
HTTP server's event loop with it). Those patterns share a shape -- a repeated group whose
body repeats again (star height two) -- which the parsed pattern shows, so such a pattern is
refused when the request is built. Possessive repeats and atomic groups never backtrack into
their body and are allowed. Other slow shapes (e.g. polynomial ones such as ``\\d+\\d+\\d+z``)
stay within a polynomial of the output's length.
"""

from __future__ import annotations

try:
    from re import _constants as C  # noqa: N812
    from re import _parser
except ImportError:  # Python 3.10: the same modules under their old names
    import sre_constants as C  # noqa: N812
    import sre_parse as _parser

_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT)


def nested_repeat(pattern: str) -> bool:
    """Whether ``pattern`` (which must compile) repeats a subpattern that itself repeats."""
    return _nested(_parser.parse(pattern), inside=False)


def _nested(items, inside: bool) -> bool:
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            repeats = high is C.MAXREPEAT or high > 1
            if (repeats and inside) or _nested(body, inside or repeats):
                return True
        elif op is C.SUBPATTERN:
            if _nested(av[-1], inside):
                return True
        elif op is C.BRANCH:
            if any(_nested(alt, inside) for alt in av[1]):
                return True
        elif op in (C.ASSERT, C.ASSERT_NOT):
            if _nested(av[1], inside):
                return True
        elif op is C.GROUPREF_EXISTS:
            if _nested(av[1], inside) or (av[2] is not None and _nested(av[2], inside)):
                return True
        # literals, sets, possessive repeats, atomic groups: nothing backtracks inside them
    return False
