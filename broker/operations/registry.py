"""The operation registry: what an operation is, the table, and how a binding runs one.

An `Operation` names its input Struct (protocol.requests), who may call it
(an agent token, a workspace key, either, or nobody authenticated) and its
handler, an async function of the engine, the caller and the input. The HTTP
layer maps a route to an operation name; the gateway maps a request `type`
to the same name. A third binding (an MCP tool surface, say) is another map.

Handlers are transport-neutral: they translate the input into one engine
command (`engine.submit`) or one query (`engine.read`) and return a wire
object; the bindings encode it. A handler that returns None has nothing to
say (REST answers 204). Reads of messages, threads, reactions, receipts,
DMs and search take an agent token, and then what it may see is decided by
its memberships, or the workspace key, the workspace's owner, which reads
all of its workspace (the handler passes no agent to the query); the inbox
and an agent's own mailbox are the agent's, and the owner reads every
agent's mailbox by name.

This module imports no handler: the handlers live in one module per area
(broker/operations/*.py) and register themselves with `operation`; the
package (broker/operations/__init__.py) imports them all, so the table is
full once anything of the package is imported.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.lookups import agent_by_name
from broker.engine.workspaces import Principal
from protocol import requests as rq

I = TypeVar("I", bound=rq.Request)  # noqa: E741

Auth = Literal["agent", "workspace", "any", "none"]


@dataclass(frozen=True)
class Call:
    """What a binding knows about the call besides its input."""

    principal: Principal | None
    idempotency_key: str | None = None
    # Where the caller reached this daemon (scheme://host[:port]), for the
    # URLs that operations hand out (file upload and download URLs).
    base_url: str | None = None


@dataclass(frozen=True)
class Operation(Generic[I]):
    """One operation: its input, who may call it, its handler and what the handler returns.

    output: the type of the handler's result, as a type expression (a Struct,
    `list[...]`, a union, or None for "nothing to say"); an `Existing[T]` in
    a union is the answer of a create that found what it would have made.
    The bindings describe their answers from it (the OpenAPI document, a
    tool surface's result schema), so it is declared, not inferred.
    """

    name: str
    input: type[I]
    auth: Auth
    handler: Callable[[Engine, Call, I], Awaitable[Any]]
    output: Any


OPERATIONS: dict[str, Operation[Any]] = {}

T = TypeVar("T")


@dataclass(frozen=True)
class Existing(Generic[T]):
    """What a create operation returns when it found what it would have made.

    Nothing was written; REST answers 200 instead of the route's 201. Only
    operations that sockets do not expose return it (the gateway replies
    with handler results as they are).
    """

    value: T

Handler = Callable[[Engine, Call, I], Awaitable[Any]]


def operation(
    name: str, input: type[I], auth: Auth, *, output: Any
) -> Callable[[Handler[I]], Handler[I]]:
    """Register the decorated handler as operation `name`.

    output: what the handler returns (see `Operation.output`); required, so
    no operation goes undescribed.
    """

    def register(handler: Handler[I]) -> Handler[I]:
        if name in OPERATIONS:
            raise RuntimeError(f"operation {name!r} registered twice")
        OPERATIONS[name] = Operation(name, input, auth, handler, output)
        return handler

    return register


def decode_input(op: Operation[I], fields: dict[str, Any]) -> I:
    """Convert merged wire fields to the operation's input; `invalid_request` names the field."""
    try:
        return msgspec.convert(fields, op.input, strict=False)
    except msgspec.ValidationError as exc:
        raise BrokerError("invalid_request", str(exc)) from None


async def invoke(engine: Engine, name: str, call: Call, fields: dict[str, Any]) -> Any:
    """Decode `fields` for operation `name` and run it (the caller checked auth)."""
    op = OPERATIONS[name]
    return await op.handler(engine, call, decode_input(op, fields))


# -- who is calling (the helpers every area's handlers share) -------------------------


def agent_of(call: Call) -> tuple[int, int]:
    """(workspace, agent) of an agent token's call. Raises forbidden for any other caller."""
    principal = call.principal
    if principal is None or principal.agent_id is None:
        raise BrokerError("forbidden", "this operation needs an agent token")
    return principal.workspace_id, principal.agent_id


def workspace_of(call: Call) -> int:
    """The workspace of an authenticated call. Raises unauthorized when there is no token."""
    if call.principal is None:
        raise BrokerError("unauthorized", "this operation needs a token")
    return call.principal.workspace_id


def caller_of(call: Call) -> tuple[int, int | None]:
    """(workspace, agent or None for the workspace key). Raises unauthorized with no token."""
    principal = call.principal
    if principal is None:
        raise BrokerError("unauthorized", "this operation needs a token")
    return principal.workspace_id, principal.agent_id


async def agent_id_of(engine: Engine, workspace_id: int, name: str) -> int:
    """The id of the active agent called `name`. Raises agent_not_found."""
    return (await engine.read(agent_by_name, workspace_id, name)).id
