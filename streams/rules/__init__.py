"""Pure decisions: (state, input) → (state, outputs), no I/O."""
