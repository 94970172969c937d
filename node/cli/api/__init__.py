"""The HTTP/SSE client of the operations API, with its error tree and stream logic."""

__all__: list[str] = []
