"""Training's error classes, in one place.

:class:`ConfigError` / :class:`UsageError` / :class:`ConfigProblems` are what the CLI turns into one line per
problem and exit code 2; :class:`CheckpointError` and :class:`SeeSRError` are the two file readers' own
errors (the stage that reads them names the option at fault).
"""

from __future__ import annotations

# the SeeSR folder reader lives in megasr/seesr_weights.py (convert-seesr uses it too): one error class for both
from megasr.errors import SeeSRError

__all__ = ["CheckpointError", "ConfigError", "ConfigProblems", "SeeSRError", "UsageError", "raise_problems"]


class ConfigError(ValueError):
    """A bad configuration value. ``option`` is the dotted option name (or the CLI flag) at fault.

    ``expected`` (what would be right) and ``example`` (a value that works) are appended to the message.
    """

    def __init__(self, option: str, problem: str, *, expected: str | None = None, example: str | None = None) -> None:
        self.option = option
        self.problem = problem
        self.expected = expected
        self.example = example
        text = problem
        if expected:
            text += f"; expected {expected}"
        if example:
            text += f"; e.g. {example}"
        super().__init__(f"{option}: {text}")

    @property
    def problems(self) -> list["ConfigError"]:
        return [self]


class UsageError(ConfigError):
    """A bad command-line input (missing folder, existing output, ...); ``option`` names the flag or option."""


class ConfigProblems(ConfigError):
    """Several configuration problems, reported together (one line each) before anything is loaded."""

    def __init__(self, problems: list[ConfigError]) -> None:
        flat: list[ConfigError] = []
        for p in problems:
            flat.extend(p.problems)
        self._problems = flat
        lines = [str(p) for p in flat]
        ValueError.__init__(self, f"{len(flat)} problems in the configuration:\n  " + "\n  ".join(lines))
        self.option = flat[0].option if flat else "config"
        self.problem = str(self)
        self.expected = self.example = None

    @property
    def problems(self) -> list[ConfigError]:
        return list(self._problems)

    def __str__(self) -> str:
        return self.args[0]


def raise_problems(problems: list[ConfigError]) -> None:
    """Raise nothing (empty), the one problem, or all of them as :class:`ConfigProblems`."""
    flat = [q for p in problems for q in p.problems]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise ConfigProblems(flat)


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be read back (truncated, foreign or corrupt), naming the folder."""
