"""The supervisor's end of a worker pipe: framed messages, and it never blocks.

A worker whose job sits in C code holding the GIL stops reading its pipe; a worker stopped or
killed mid-write leaves half a message. Neither may stall the one supervisor thread, whose
timers are what kill such a worker. So the supervisor's end is non-blocking both ways: ``send``
queues frames and writes what the kernel takes now (the loop asks to be woken when the pipe
is writable again), and ``receive`` returns the whole frames that have arrived, keeping a
partial one for later.

Frames are ``multiprocessing.connection.Connection.send_bytes``'s: a big-endian int32 length
(or -1 and a uint64 length) followed by the bytes, so the worker's end stays a plain blocking
Connection. The channel does not own the descriptor: whoever made it closes it.
"""

from __future__ import annotations

import os
import struct

READ_SIZE = 256 * 1024  # bytes per read: many small frames at once, few calls for big ones
IOV_MAX = 512  # buffers per writev call (Linux allows 1024)
_HEAD = struct.Struct("!i")
_LONG_HEAD = struct.Struct("!iQ")
_SHORT_MAX = 0x7FFFFFFF


def frame_header(size: int) -> bytes:
    return _HEAD.pack(size) if size <= _SHORT_MAX else _LONG_HEAD.pack(-1, size)


def written(out: list[bytes | memoryview], n: int) -> None:
    """Drop from the front of ``out`` the ``n`` bytes a writev took."""
    i = 0
    while i < len(out) and n >= len(out[i]):
        n -= len(out[i])
        i += 1
    del out[:i]
    if n:
        out[0] = memoryview(out[0])[n:]


class Channel:
    __slots__ = ("fd", "_out", "_buf", "_body", "_got", "_eof")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._out: list[bytes | memoryview] = []  # frames not yet taken by the kernel
        self._buf = bytearray()  # received bytes not yet parsed into frames
        self._body: bytearray | None = None  # a big frame being filled in place
        self._got = 0  # bytes of _body filled
        self._eof = False

    def fileno(self) -> int:
        return self.fd

    # -- sending ---------------------------------------------------------------------------
    @property
    def wants_write(self) -> bool:
        """Frames wait for room in the pipe: wake the loop when it is writable."""
        return bool(self._out)

    def send(self, *blobs: bytes | memoryview) -> bool:
        """Queue one frame per blob and write what fits now. False once the pipe is broken
        (the worker is gone; its death is reported by its sentinel)."""
        out = self._out
        for blob in blobs:
            if len(blob) < 65536:  # one buffer: header and body in one piece
                out.append(frame_header(len(blob)) + blob)
            else:  # no copy of megabytes
                out.append(frame_header(len(blob)))
                out.append(memoryview(blob))
        return self.flush()

    def flush(self) -> bool:
        """Write queued frames until the pipe is full; False if it is broken."""
        out = self._out
        while out:
            try:
                n = os.writev(self.fd, out[:IOV_MAX])
            except BlockingIOError:
                return True
            except OSError:
                out.clear()
                return False
            written(out, n)
        return True

    # -- receiving -------------------------------------------------------------------------
    def receive(self) -> list[bytes | bytearray]:
        """The whole frames that have arrived (maybe none). EOFError once the other end has
        closed and every whole frame was returned; a frame cut short is dropped then."""
        frames: list[bytes | bytearray] = []
        while not self._eof:
            if self._body is not None:
                if not self._fill():
                    break
                frames.append(self._body)
                self._body = None
                continue
            try:
                chunk = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:  # ECONNRESET: a killed peer
                chunk = b""
            if not chunk:
                self._eof = True
                break
            self._buf += chunk
            self._parse(frames)
        if self._eof and not frames:
            raise EOFError("the worker's end of the pipe closed")
        return frames

    def _parse(self, frames: list[bytes | bytearray]) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _HEAD.unpack_from(buf, pos)
            start = pos + 4
            if size == -1:
                if end - pos < 12:
                    break
                (_, size) = _LONG_HEAD.unpack_from(buf, pos)
                start = pos + 12
            if end - start >= size:
                frames.append(buf[start : start + size])  # a bytearray: one copy
                pos = start + size
                continue
            if size > READ_SIZE:  # a big frame: the rest is read straight into place
                body = bytearray(size)
                have = end - start
                body[:have] = buf[start:end]
                self._body, self._got = body, have
                pos = end
            break
        del buf[:pos]

    def _fill(self) -> bool:
        """Read into the big frame under way; True once it is whole."""
        body = self._body
        assert body is not None
        view = memoryview(body)
        while self._got < len(body):
            try:
                n = os.readv(self.fd, [view[self._got :]])
            except BlockingIOError:
                return False
            except OSError:
                n = 0
            if n == 0:
                self._eof = True
                return False
            self._got += n
        return True
