"""Names from a file, made safe to print.

A checkpoint chooses its own key names, storage locations, shard and entry names, and a
name may hold any character: an ESC sequence that retitles or clears the viewer's
terminal, a newline that forges the next line of a report (or a traceback), a
right-to-left override that shows a key as another. Every such name is escaped where it is
written into text for a person (a report, a table, an error message), never where it is
read: a schema, a snapshot and a JSON report keep the true names.
"""

from __future__ import annotations

import re

# What reads as an escape of :func:`printable`'s in a name that needs none: such a name is
# escaped too (its backslashes doubled), so that no two names print the same.
_ESCAPE_LIKE = re.compile(r"\\(?:[\\ntr]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(name: object) -> str:
    """``name`` as it may be printed: unchanged when every character prints as itself (any
    script's letters, CJK and accents included); else each control character (C0, DEL,
    C1), format character (bidi overrides, zero-width ones), line or paragraph separator,
    lone surrogate and unassigned code point as a Python escape (``\\x1b``, ``\\n``,
    ``\\u202e``) and each backslash doubled, as in a Python string literal without its
    quotes.

    Unambiguous: a name printed unchanged holds no backslash that starts such an escape
    (one that does is escaped like the others), so a Windows path or a regex in a name
    reads as it is, and no two names print the same. Not a ``repr``: a name with nothing
    to hide gets no quotes, and most names have nothing to hide.
    """
    text = name if isinstance(name, str) else str(name)
    if text.isprintable() and not ("\\" in text and _ESCAPE_LIKE.search(text)):
        return text
    return "".join(_escaped(char, backslash=True) for char in text)


def printable_message(text: str, *, lines: bool = False) -> str:
    """A message composed elsewhere, made safe for a terminal: each character that does
    not print as itself escaped as :func:`printable` escapes it, backslashes left as they
    are (the message may quote names already escaped, or a ``repr``); newlines kept where
    ``lines`` (a multi-line report), else escaped (a one-paragraph error stays one).

    For the text this package does not write itself, and for the messages that reach the
    terminal whole: torch's and a load hook's errors quote key names raw, as may a custom
    comparison's words and a reader's problem.
    """
    if (text.replace("\n", "") if lines else text).isprintable():
        return text
    return "".join(
        char if lines and char == "\n" else _escaped(char, backslash=False) for char in text
    )


def _escaped(char: str, *, backslash: bool) -> str:
    if char == "\\":
        return "\\\\" if backslash else char
    if char in _SHORT:
        return _SHORT[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
