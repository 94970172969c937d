"""Local clusters: the layout of a cluster directory, its node processes, a live deploy."""

__all__: list[str] = []
