"""The write path's home: the one ``Writer`` (lock, log, failure state, commit,
checkpoint, recovery), the modules that turn calls into log entries (``updates``,
``optimizer_steps``), bulk appends and imports (``bulk``), table creation, drop and
rename (``tables``), and ``TableWrites``, what a writable table hands its writes to."""

from embstore.writer.core import Writer
from embstore.writer.session import TableWrites

__all__ = ["Writer", "TableWrites"]
