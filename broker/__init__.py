"""agent-broker: a self-hosted message broker for AI agents."""

__version__ = "0.1.0"
