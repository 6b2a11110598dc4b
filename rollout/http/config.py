"""``HTTPConfig``: how the HTTP server listens and answers (validated, frozen)."""

from __future__ import annotations

from dataclasses import dataclass

from engine_core.errors import InvalidConfigError


@dataclass(frozen=True)
class HTTPConfig:
    """``host``/``port``: where to listen (loopback unless told otherwise; port 0: any free
    port). ``api_key``: when set, every endpoint but ``/health*`` and ``/metrics`` needs
    ``Authorization: Bearer <key>`` (SGLang's rule). ``served_model_name``: the OpenAI ``model``
    the server answers to (None: the model path). ``incremental_streaming_output``: SGLang's
    server flag; False (its default) makes ``/generate`` stream chunks cumulative (each chunk's
    ``text``/``output_ids`` are everything so far), True sends only what is new.
    ``max_body_bytes`` bounds one request body (413 above it; 1 GiB: a base64 checkpoint for
    ``/update_weights_from_tensor`` fits)."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None
    incremental_streaming_output: bool = False
    max_body_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InvalidConfigError("host", self.host, "must be a non-empty str")
        if (
            not isinstance(self.port, int)
            or isinstance(self.port, bool)
            or not (0 <= self.port < 65536)
        ):
            raise InvalidConfigError("port", self.port, "must be an int in [0, 65535]")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key):
            raise InvalidConfigError("api_key", "<hidden>", "must be a non-empty str or None")
        if not isinstance(self.incremental_streaming_output, bool):
            raise InvalidConfigError(
                "incremental_streaming_output", self.incremental_streaming_output, "must be a bool"
            )
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes <= 0:
            raise InvalidConfigError("max_body_bytes", self.max_body_bytes, "must be an int > 0")
