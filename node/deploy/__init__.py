"""One node's deploy machinery: extraction, hooks, releases, and the deploy's state loops."""
