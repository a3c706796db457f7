"""The HTTP binding: REST routes over the operation table, health, readiness and metrics."""
