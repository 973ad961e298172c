"""A P2P peer that serves forged chunks: the attacker of the trust tests.

It holds the cluster token (an insider, or a stolen token), joins each layer's tree first, so
later nodes take it as their parent, and answers every range with the real bytes of the layer
blob except that each whole chunk in the range starts with ``FORGED!`` and has four bytes
adjusted so that its crc32 still matches the chunk table: what fooled crc32-only readers.

    python -m tidal.testing.forging_peer --root URL --token-file F --image DIR --listen HOST
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import zlib
from pathlib import Path

from tidal.image.manifest import Image, blob_path
from tidal.image.source import FileSource
from tidal.image.zfile import ZFileReader

MARK = b"FORGED!"


def forge_keeping_crc32(stored: bytes, mark: bytes = MARK) -> bytes:
    """``stored`` with ``mark`` at its start and its last four bytes chosen so that the crc32 is
    unchanged (crc32 is linear over GF(2): a 32x32 system)."""
    if len(stored) < len(mark) + 4:
        return stored
    want = zlib.crc32(stored)
    base = bytearray(stored)
    base[: len(mark)] = mark
    base[-4:] = b"\0\0\0\0"
    c0 = zlib.crc32(bytes(base))
    cols = []
    for bit in range(32):
        trial = bytearray(base)
        trial[-4 + bit // 8] ^= 1 << (bit % 8)
        cols.append(zlib.crc32(bytes(trial)) ^ c0)
    basis: list[tuple[int, int]] = []
    for bit, col in enumerate(cols):
        v, m = col, 1 << bit
        for bv, bm in basis:
            if v ^ bv < v:
                v, m = v ^ bv, m ^ bm
        if v:
            basis.append((v, m))
            basis.sort(reverse=True)
    v, m = want ^ c0, 0
    for bv, bm in basis:
        if v ^ bv < v:
            v, m = v ^ bv, m ^ bm
    if v:
        return stored  # no solution (cannot happen for crc32 over 32 free bits)
    for bit in range(32):
        if m >> bit & 1:
            base[-4 + bit // 8] ^= 1 << (bit % 8)
    return bytes(base)


def main(argv: list[str] | None = None) -> int:
    from tidal.blobs.p2p import RootClient, RootRing
    from tidal.ids import Digest
    from tidal.service.auth import ClusterToken
    from tidal.service.server import Request, Response, Route, Service, TcpServiceServer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True)
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--listen", required=True)
    args = ap.parse_args(argv)
    token = ClusterToken.from_file(args.token_file)
    image = Image.open(args.image)
    blobs = {rec.digest: blob_path(image.path, rec.digest) for rec in image.manifest.data_layers}
    readers = {d: ZFileReader(FileSource(p)) for d, p in blobs.items()}
    forged_chunks = [0]

    def get(req: Request) -> Response:
        digest = Digest(req.params["digest"])
        m = re.match(r"bytes=(\d+)-(\d+)", req.headers.get("Range") or "")
        assert m is not None
        start, end = int(m.group(1)), int(m.group(2)) + 1
        data = bytearray(blobs[digest].read_bytes()[start:end])
        r = readers[digest]
        for i in range(r.chunk_count):
            sp = r.span(i)
            lo, hi = sp.stored_offset - start, sp.stored_offset - start + sp.stored_size
            if lo >= 0 and hi <= len(data):
                data[lo:hi] = forge_keeping_crc32(bytes(data[lo:hi]))
                forged_chunks[0] += 1
        size = blobs[digest].stat().st_size
        return Response(
            bytes(data),
            206,
            "application/octet-stream",
            {"Content-Range": f"bytes {start}-{end - 1}/{size}"},
        )

    def head(req: Request) -> Response:
        size = blobs[Digest(req.params["digest"])].stat().st_size
        return Response(b"", 200, "application/octet-stream", {"Content-Length": str(size)})

    service = Service(
        "forging peer",
        [
            Route("GET", "/v1/blobs/{digest}", get, "blobs"),
            Route("HEAD", "/v1/blobs/{digest}", head, "blobs"),
        ],
        auth=token,
    )
    server = TcpServiceServer(args.listen, 0, service)
    url = f"http://{args.listen}:{server.port()}"
    roots = RootClient(RootRing([args.root]), token=token)
    for digest in blobs:
        roots.join(digest, url)
    print(f"forging peer {url} joined {len(blobs)} tree(s)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        print(f"forged {forged_chunks[0]} chunk(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
