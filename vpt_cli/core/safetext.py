"""Text from files and paths, made safe to show: never read as rich markup, control characters
(ANSI escapes, bidi overrides, NUL...) shown escaped instead of reaching the terminal raw."""
from __future__ import annotations

import unicodedata

from rich.markup import escape


def printable(text: object) -> str:
    """`text` with every control and format character replaced by its \\x.. / \\u.... escape."""
    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf") else ch.encode("unicode_escape").decode("ascii")
                   for ch in str(text))


def safe(text: object) -> str:
    """`printable(text)` escaped for rich markup, for interpolation into a markup string."""
    return escape(printable(text))
