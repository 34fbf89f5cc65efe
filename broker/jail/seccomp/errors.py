"""The one error a policy can cause: PolicyError names file, line and column."""
from __future__ import annotations


class PolicyError(ValueError):
    """A seccomp policy could not be read, parsed or compiled.

    `file`, `line` and `column` (1-based; 0 when unknown) say where; `reason`
    says what was wrong and what was expected.  str() gives the usual
    ``file:line:column: reason`` form, followed by the offending source line
    and a caret when the line is known.
    """

    def __init__(self, reason: str, file: str = "<policy>", line: int = 0,
                 column: int = 0, source_line: str | None = None):
        self.reason = reason
        self.file = file
        self.line = line
        self.column = column
        self.source_line = source_line
        where = file
        if line:
            where += f":{line}"
            if column:
                where += f":{column}"
        text = f"{where}: {reason}"
        if source_line is not None and column:
            text += f"\n    {source_line}\n    {' ' * (column - 1)}^"
        super().__init__(text)
