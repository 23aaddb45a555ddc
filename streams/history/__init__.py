"""The history store: conversations, messages and events in PostgreSQL (a layer between rules and stages)."""
