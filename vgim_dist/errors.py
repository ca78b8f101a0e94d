"""Errors a user can fix. The CLI prints them as one line, ``vgim: <what> (<where>); <what to do>``."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing resource: what went wrong, where (a key, file or URI), and what to do."""

    def __init__(self, what: str, where: str = "", fix: str = ""):
        super().__init__(what, where, fix)
        self.what, self.where, self.fix = what, where, fix

    def __str__(self) -> str:
        return self.what + (f" ({self.where})" if self.where else "") + (f"; {self.fix}" if self.fix else "")
