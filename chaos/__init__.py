"""The chaos suite (`make chaos`, `python -m chaos.run`): faults injected into a running pipeline
(worker SIGKILLs, a broker restart, a two-worker failover, fuzzed bodies, dispatcher kills) under
realistic, deterministic traffic, with an audit of what came out. See docs/reliability.md."""
