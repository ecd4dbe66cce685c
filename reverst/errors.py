"""Every error reverst raises derives from :class:`ReverstError`."""


class ReverstError(Exception):
    """Base class for every reverst error."""


class ConfigError(ReverstError):
    """A configuration source is invalid.  str() is one line naming source and key path."""


class Unauthorized(ReverstError):
    """Registration credentials were rejected (never retried)."""


class BadRequest(ReverstError):
    """The peer's registration request could not be decoded (never retried)."""


class NotFound(ReverstError):
    """The tunnel group is unknown to the server (retried: it may appear later)."""


class ServerError(ReverstError):
    """The server refused the registration for another reason (retried)."""


class ConnectionClosed(ReverstError):
    """The QUIC connection is closed; ``error_code`` and ``reason`` say why."""

    def __init__(self, reason: str = "connection closed", error_code: int | None = None,
                 application: bool = True) -> None:
        self.reason = reason
        self.error_code = error_code
        self.application = application
        if error_code is None:
            super().__init__(reason)
        else:
            kind = "application" if application else "transport"
            super().__init__(f"{reason} ({kind} error 0x{error_code:x})")


class StreamReset(ReverstError):
    """The peer reset the stream (or asked us to stop sending)."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(f"stream {stream_id} reset by peer (error 0x{error_code:x})")


class ProtocolViolation(ReverstError):
    """The peer sent bytes that break the registration protocol."""
