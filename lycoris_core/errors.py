"""Errors that name the file, the key and what was expected, in one line.

Every failure a user can cause with a bad file goes through `AdapterFormatError`, so node
messages and command-line errors read the same and nothing surfaces as a bare traceback.
"""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """A file (adapter or model) that cannot be read as expected.

    `str(error)` is one line: ``<file>: <key>: <what was expected>`` (file and key left out
    when unknown).
    """

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.key = key
        super().__init__(self._line())

    def _line(self) -> str:
        parts = [p for p in (self.path, self.key) if p]
        text = " ".join(self.message.split())
        return ": ".join(parts + [text])

    def with_path(self, path) -> "AdapterFormatError":
        """The same error, naming `path` if it did not name a file yet."""
        if self.path is not None:
            return self
        return AdapterFormatError(self.message, path=path, key=self.key)
