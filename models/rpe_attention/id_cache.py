"""A cache of bucket-id tables bounded in bytes per device: multi-scale training meets a new map
size at nearly every batch, and a COCO-size table has about a million ids, so a cache bounded by
entry count would hold gigabytes on the GPU."""
import threading
from collections import OrderedDict

import torch

DEFAULT_MAX_BYTES = 64 * 2 ** 20  # per device: ~14 tables of the largest COCO map (1050 tokens, int32)


class DeviceBoundedCache:
    """{key: tensor} with at most `max_bytes` of tensors per device, least recently used evicted.
    Keys must include the device of `get`. A table larger than the budget is not kept."""

    def __init__(self, max_bytes=DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries = OrderedDict()  # key -> (device, tensor)
        self._bytes = {}               # device -> bytes held
        self._lock = threading.Lock()

    def get(self, key, device, make):
        """The tensor cached under `key`, else `make()`'s (on `device`), kept if it fits."""
        device = torch.device(device)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[1]
        value = make()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return value
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (device, value)
                self._bytes[device] = self._bytes.get(device, 0) + size
                self._evict(device)
        return value

    def _evict(self, device):
        for key in list(self._entries):
            if self._bytes[device] <= self.max_bytes:
                break
            entry_device, value = self._entries[key]
            if entry_device == device:
                del self._entries[key]
                self._bytes[device] -= value.numel() * value.element_size()

    def bytes_on(self, device):
        """Bytes of the tables kept for `device`."""
        return self._bytes.get(torch.device(device), 0)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._bytes.clear()

    def __len__(self):
        return len(self._entries)
