"""The conversation rules: what one input does to one conversation key's state, as pure functions.

`api` is the contract with the stage; `decider.Decider.decide` the entry point; `state` the stored
model and its migration; the other modules one concern each (see docs/lifecycle.md).
"""
