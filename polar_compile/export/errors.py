"""The export's user-facing error, in a module of its own: the CLI reports it without importing transformers."""

__all__ = ["ExportError"]


class ExportError(ValueError):
    """A model, argument or example that cannot be exported as asked; the message says why and what to do."""
