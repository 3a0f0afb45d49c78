"""The adapter engine: hosts, deltas, target matching, registry, save/load, accounting."""
