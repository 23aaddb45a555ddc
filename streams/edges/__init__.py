"""Processes at the edge, talking to Meta: the webhook endpoint and the Send API dispatcher."""
