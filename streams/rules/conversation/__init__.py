"""The conversation rules: what one input does to one conversation key's state, as a pure function."""
