"""The operation table, assembled: importing this package registers every operation.

`registry` defines what an operation is and holds the table; each area's
module registers its handlers there when it is imported. This module
imports them all, so `from broker.operations import OPERATIONS` is the full
table for the bindings (broker.http, broker.gateway). A new area is a
module here and one name in the import below.
"""

from __future__ import annotations

from broker.operations import (  # noqa: F401  (imported to register their operations)
    agents,
    channels,
    conversations,
    deliveries,
    files,
    inbox,
    messages,
    webhooks,
    workspaces,
)
from broker.operations.registry import OPERATIONS

__all__ = ["OPERATIONS"]
