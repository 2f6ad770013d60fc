"""daphne as miStudio serves it (`python -m mistudio.webserver` takes daphne's own
arguments): the same server, except that a request line or header line longer than
Twisted's line limit (16 KiB) gets an answer before the connection closes, 414 URI Too Long
or 431 Request Header Fields Too Large, instead of a connection dropped with no word
(LineReceiver's default). Every other oversized header case already answers 400."""

from __future__ import annotations

import sys

TOO_LONG = {
    True: (b"414 URI Too Long", b"The address is too long (at most 16 KiB)."),
    False: (b"431 Request Header Fields Too Large", b"A request header is too long (at most 16 KiB)."),
}


def answer_line_too_long(channel, line: bytes) -> None:
    """HTTPChannel.lineLengthExceeded: say why, then close."""
    status, body = TOO_LONG[bool(getattr(channel, "_HTTPChannel__first_line", True))]
    channel.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)  # fmt: skip
    channel.loseConnection()


def main(argv: list[str] | None = None) -> None:
    from daphne.cli import CommandLineInterface
    from twisted.web import http

    http.HTTPChannel.lineLengthExceeded = answer_line_too_long
    CommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
