"""User-facing errors.

Every failure that a user can fix (a missing file, a corrupt raster, a bad band list, an unreadable
model directory, unparseable model output) is raised as a subclass of `GeoChatError` with a message
that says what went wrong and what to do. The faces (CLI, app, HTTP API) print that message as one
line; they never show a traceback for these.
"""

from __future__ import annotations


class GeoChatError(Exception):
    """Base class for errors whose message is meant for the user."""


class ImageryError(GeoChatError):
    """The image could not be read or does not fit the request (bands, size, format)."""


class BandSelectionError(ImageryError):
    """The requested bands do not exist in the raster or cannot form an RGB view. `option` is what the user
    changes to fix it ("bands", "sensor", or None), so that each face can name its own control for it."""

    def __init__(self, message: str, option: str | None = "bands") -> None:
        super().__init__(message)
        self.option = option


class GroundingParseError(GeoChatError):
    """Text that was supposed to hold a box could not be parsed."""


class PromptTooLongError(GeoChatError):
    """The conversation and the answer's room would not fit the model's context window."""


class ModelLoadError(GeoChatError):
    """A model directory, file or hub id could not be loaded."""
