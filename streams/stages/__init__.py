"""The Faust app and its stages (agents, tables, web pages)."""
