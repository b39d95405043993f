"""embstore: a memory-mapped embedding store engine.

    import embstore
    with embstore.create("/data/store") as store:
        table = store.create_table("items", dim=64, data=vectors)
    with embstore.open("/data/store", cache_bytes=256 << 20) as store:
        rows = store["items"].gather(ids)

The core never imports TensorFlow; ``embstore.tensorflow`` holds the TF integration.
"""

from embstore import errors
from embstore._version import __version__
from embstore.errors import EmbstoreError, Fault
from embstore.format import FORMAT_MAJOR, FORMAT_MINOR
from embstore.store import Store, create, open
from embstore.table import Table

__all__ = [
    "EmbstoreError",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "Fault",
    "Store",
    "Table",
    "__version__",
    "create",
    "errors",
    "open",
]
