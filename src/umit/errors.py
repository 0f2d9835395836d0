"""Exceptions raised at the boundary, each naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class UmitError(Exception):
    """Base class for every error UMIT raises on purpose."""


class InputError(UmitError, ValueError):
    """A user-supplied input (file, folder, value) is unusable.

    The message always names the offending path (when there is one) and what is wrong with it,
    so a batch job can store it verbatim as the failure reason.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self) -> tuple:
        """Pickle by the constructor's arguments, so the error crosses process boundaries (a
        worker pool re-raises it in the parent) instead of failing to unpickle and hiding the
        message. Subclasses with more arguments override this."""
        return (type(self), (self.path, self.problem), self.__dict__)


class GeometryError(InputError):
    """Voxel geometry is inconsistent (non-uniform slices, missing slices, mismatched label)."""
