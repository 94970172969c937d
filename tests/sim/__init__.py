"""The deterministic simulator: many cairn nodes in one process on virtual time, a
seeded scheduler of operations and faults, and checkers (see docs/reliability.md)."""
