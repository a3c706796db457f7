"""Outbound webhooks (the dispatcher, signing, the SSRF guard) and the inbound hook route.

The engine side (subscriptions, the outbox, inbound hooks) is
broker.engine.webhooks; the operations are broker.webhooks.operations.
"""
