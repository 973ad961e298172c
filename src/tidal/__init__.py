"""Tidal: an elastic container platform.

Parts (one package each): ``image`` (block image format), ``blobs`` (where bytes come
from), ``blockdev`` (FUSE block device and mounts), ``engine`` (containers on an OCI
runtime), ``instance`` (elastic instances), ``sched`` (hybrid scheduler), ``qos`` (node
QoS agent), ``cli`` (the ``tidal`` command).
"""

__version__ = "0.1.0"
