"""The `messenger-streams` command line and operator tools."""
