"""Gzip data checked member by member, for readers that must know where a damaged file goes wrong.

`GzipMembers` is fed compressed bytes in pieces of any size and decompresses them, discarding the
output. zlib (wbits=31: a gzip wrapper) verifies each member's CRC-32 and length trailer and raises
zlib.error on damage; a member counts as ended only once its trailer has been read, so a file cut
anywhere (even just its 8-byte trailer) does not `finish()` complete. A file may hold several members (`cat
a.gz b.gz`), as multi-member files such as C4's consolidated ones do.
"""

from __future__ import annotations

import zlib

# Decompressed bytes per zlib call: highly compressible data (a member of zeros) cannot balloon memory.
OUTPUT_BLOCK = 1 << 22


class GzipMembers:
    def __init__(self) -> None:
        self.member = 0  # members started so far (1-based number of the current one)
        self.member_start = 0  # compressed byte offset where the current member starts
        self.offset = 0  # compressed bytes consumed: a zlib.error lies between here and the end of the piece fed
        self.decompressed = 0
        self.lines = 0  # newlines in the decompressed data
        self._d = None

    def finish(self) -> bool:
        """At the end of the data (nothing may be fed after): whether it ends exactly at the end of a
        member, trailer checked. False for no data at all."""
        if self._d is not None and not self._d.eof:
            self._count(self._d.flush())  # output held back for OUTPUT_BLOCK may still reach the member's end
        return self._d is not None and self._d.eof

    def feed(self, data: bytes) -> None:
        end = self.offset + len(data)
        while data:
            if self._d is None or self._d.eof:  # the next member starts
                self._d = zlib.decompressobj(wbits=31)
                self.member += 1
                self.member_start = self.offset
            self._count(self._d.decompress(data, OUTPUT_BLOCK))
            data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
            self.offset = end - len(data)

    def _count(self, out: bytes) -> None:
        self.decompressed += len(out)
        self.lines += out.count(b"\n")
