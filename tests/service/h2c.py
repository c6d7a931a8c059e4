"""A bare HTTP/2 client (h2c, prior knowledge) for gRPC tests: it opens streams and sends DATA frames by hand within
the windows the server grants, so a test sees how much of a message the server lets in, which no gRPC client shows."""
from __future__ import annotations

import socket
import struct
import threading
import time

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 4
CANCEL = 8  # RST_STREAM error code
MAX_FRAME_BYTES = 16384  # HTTP/2's default SETTINGS_MAX_FRAME_SIZE
RECEIVE_WINDOW_BYTES = 1 << 30


def grpc_frame(message: bytes, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, the length (`declared`, default the message's), the bytes."""
    return b"\0" + struct.pack(">I", len(message) if declared is None else declared) + message


def _literal(name: str, value: str) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman coding (names and values < 127 bytes)."""
    return b"\0" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


class H2Connection:
    """One connection; a reader thread answers SETTINGS and PING and tracks the windows the server grants."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self._send_lock = threading.Lock()
        self._changed = threading.Condition()
        self.connection_window, self.initial_window = 65535, 65535
        self.stream_windows: dict[int, int] = {}
        self.ended: set[int] = set()  # streams the server has ended (END_STREAM or RST_STREAM)
        self.closed = False
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self._frame(SETTINGS, 0, 0, b"")
        self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", RECEIVE_WINDOW_BYTES))  # answers never wait on this side
        threading.Thread(target=self._read_frames, daemon=True).start()

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
        with self._send_lock:
            self.sock.sendall(head + payload)

    def _receive(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read_frames(self) -> None:
        try:
            while True:
                head = self._receive(9)
                kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._receive(int.from_bytes(head[:3], "big"))
                with self._changed:
                    self._on_frame(kind, flags, stream, payload)
                    self._changed.notify_all()
        except (EOFError, OSError):
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for offset in range(0, len(payload), 6):
                ident, value = struct.unpack(">HI", payload[offset:offset + 6])
                if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                    for open_stream in self.stream_windows:
                        self.stream_windows[open_stream] += value - self.initial_window
                    self.initial_window = value
            self._frame(SETTINGS, ACK, 0, b"")
        elif kind == PING and not flags & ACK:
            self._frame(PING, ACK, 0, payload)
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream == 0:
                self.connection_window += increment
            elif stream in self.stream_windows:
                self.stream_windows[stream] += increment
        elif kind == RST_STREAM or (kind in (DATA, HEADERS) and flags & END_STREAM):
            self.ended.add(stream)

    def open(self, stream: int, path: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """Start a call on `stream` (odd, increasing): its request headers, no data yet."""
        with self._changed:
            self.stream_windows[stream] = self.initial_window
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "test"),
                   ("content-type", "application/grpc"), ("te", "trailers"), *metadata]
        self._frame(HEADERS, END_HEADERS, stream, b"".join(_literal(k, v) for k, v in headers))

    def send(self, stream: int, data: bytes, end: bool = False, stall_s: float = 2.0) -> int:
        """Send `data` on the stream as fast as the windows allow; stop once no window has opened for stall_s. The
        bytes sent: the server let in at least that much of it (the rest waits for a window)."""
        sent = 0
        while sent < len(data):
            with self._changed:
                stalled_at = time.monotonic() + stall_s
                while min(self.connection_window, self.stream_windows[stream]) <= 0:
                    if self.closed or stream in self.ended or time.monotonic() > stalled_at:
                        return sent
                    self._changed.wait(0.1)
                size = min(MAX_FRAME_BYTES, len(data) - sent, self.connection_window, self.stream_windows[stream])
                self.connection_window -= size
                self.stream_windows[stream] -= size
            self._frame(DATA, END_STREAM if end and sent + size == len(data) else 0, stream, data[sent:sent + size])
            sent += size
        return sent

    def reset(self, stream: int) -> None:
        """Cancel the call (RST_STREAM CANCEL), as a client that gives up does."""
        self._frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))

    def wait_ended(self, stream: int, timeout_s: float = 30) -> bool:
        """Whether the server ends the stream (answers the call, or resets it) within timeout_s."""
        with self._changed:
            return self._changed.wait_for(lambda: stream in self.ended or self.closed, timeout_s) and \
                stream in self.ended

    def close(self) -> None:
        self.sock.close()
