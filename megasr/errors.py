"""Errors that name the node (or command) and the input at fault, with what to do about it."""

from __future__ import annotations


class MegaSRInputError(ValueError):
    """A bad input. ``where`` is the node or command, ``name`` the input, ``problem`` what to do."""

    def __init__(self, where: str, name: str, problem: str) -> None:
        self.where = where
        self.name = name
        self.problem = problem
        super().__init__(f"{where}: input '{name}': {problem}")


class WeightFileError(ValueError):
    """A weight file that is not what the loader needs (wrong component/base, truncated, ...)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"weight file '{path}': {problem}")


class WeightFileMissingError(WeightFileError):
    """A weight file is not on disk and could not (or may not) be downloaded."""


class SeeSRError(ValueError):
    """A SeeSR folder that cannot be used; the message names the folder and what is wrong."""
