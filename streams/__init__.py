"""messenger-streams: the Facebook Messenger connector core, on Faust and Apache Kafka.

Layers, each importing only from the ones before it:
- `streams.core`: settings, config, serde, metrics, topic names, dead letters (no Faust, no rules);
- `streams.rules`: the pure decisions (normalize, dedupe, conversation rules, CSAT, Send API limits);
- `streams.stages`: the Faust app and its agents, tables and web pages;
- `streams.edges`: the processes that talk to Meta (webhook endpoint, Send API dispatcher);
- `streams.commands`: the command line and operator tools.
"""

__version__ = "0.1.0"
