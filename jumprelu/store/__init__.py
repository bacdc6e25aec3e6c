"""The on-disk activation store: a directory of memory-mappable shards plus metadata.json."""

from jumprelu.store.format import FORMAT_VERSION
from jumprelu.store.reader import Store, open_store
from jumprelu.store.writer import StoreWriter

__all__ = ["FORMAT_VERSION", "Store", "StoreWriter", "open_store"]
