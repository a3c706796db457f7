"""Outbound webhooks (the dispatcher, signing, the SSRF guard) and the inbound hook route.

The engine side is broker.engine: subscriptions in webhooks, the outbox's
enqueue in outbox, the dispatcher's reads and reports in webhook_deliveries,
inbound hooks in inbound_hooks; the operations are broker.operations.webhooks.
"""
