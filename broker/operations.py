"""The operation table: every operation defined once, bound twice (REST and WebSocket).

An `Operation` names its input Struct (protocol.requests), who may call it
(an agent token, a workspace key, either, or nobody authenticated) and its
handler, an async function of the engine, the caller and the input. The HTTP
layer maps a route to an operation name; the gateway maps a request `type`
to the same name. A third binding (an MCP tool surface, say) is another map.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from broker.engine import channels, files, messages, workspaces
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.workspaces import Principal
from protocol import files as pf
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
    name: str
    input: type[I]
    auth: Auth
    handler: Callable[[Engine, Call, I], Awaitable[Any]]


OPERATIONS: dict[str, Operation[Any]] = {}

Handler = Callable[[Engine, Call, I], Awaitable[Any]]


def operation(name: str, input: type[I], auth: Auth) -> Callable[[Handler[I]], Handler[I]]:
    """Register the decorated handler as operation `name`."""

    def register(handler: Handler[I]) -> Handler[I]:
        if name in OPERATIONS:
            raise RuntimeError(f"operation {name!r} registered twice")
        OPERATIONS[name] = Operation(name, input, auth, handler)
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


def _agent(call: Call) -> tuple[int, int]:
    principal = call.principal
    if principal is None or principal.agent_id is None:
        raise BrokerError("forbidden", "this operation needs an agent token")
    return principal.workspace_id, principal.agent_id


def _workspace(call: Call) -> int:
    if call.principal is None:
        raise BrokerError("unauthorized", "this operation needs a token")
    return call.principal.workspace_id


# -- workspaces and agents -----------------------------------------------------------


@operation("workspace.create", rq.CreateWorkspace, auth="none")
async def create_workspace(engine: Engine, call: Call, req: rq.CreateWorkspace) -> Any:
    return await engine.submit(workspaces.CreateWorkspace(req.name))


@operation("agent.register", rq.RegisterAgent, auth="workspace")
async def register_agent(engine: Engine, call: Call, req: rq.RegisterAgent) -> Any:
    return await engine.submit(workspaces.RegisterAgent(
        workspace_id=_workspace(call), name=req.name, type=req.type, persona=req.persona,
        metadata=req.metadata))


# -- channels --------------------------------------------------------------------


@operation("channel.create", rq.CreateChannel, auth="any")
async def create_channel(engine: Engine, call: Call, req: rq.CreateChannel) -> Any:
    principal = call.principal
    assert principal is not None
    return await engine.submit(channels.CreateChannel(
        workspace_id=principal.workspace_id, agent_id=principal.agent_id, name=req.name,
        topic=req.topic, metadata=req.metadata))


@operation("channel.join", rq.JoinChannel, auth="agent")
async def join_channel(engine: Engine, call: Call, req: rq.JoinChannel) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(channels.JoinChannel(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel))


# -- messages --------------------------------------------------------------------


@operation("message.send", rq.SendMessage, auth="agent")
async def send_message(engine: Engine, call: Call, req: rq.SendMessage) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(messages.SendChannelMessage(
        workspace_id=workspace_id, agent_id=agent_id, channel=req.channel, text=req.text,
        mode=req.mode, data=req.data, attachments=req.attachments,
        idempotency_key=call.idempotency_key))

# -- files -------------------------------------------------------------------------------


@operation("file.upload", pf.UploadFile, auth="agent")
async def upload_file(engine: Engine, call: Call, req: pf.UploadFile) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(files.CreateUpload(
        workspace_id=workspace_id, agent_id=agent_id, filename=req.filename,
        content_type=req.content_type, size_bytes=req.size_bytes, base_url=call.base_url))


@operation("file.complete", pf.FileRef, auth="agent")
async def complete_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(files.CompleteUpload(
        workspace_id=workspace_id, agent_id=agent_id, file_id=req.file_id,
        base_url=call.base_url))


@operation("file.get", pf.FileRef, auth="any")
async def get_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    return await engine.read(files.get_file, _workspace(call), req.file_id, call.base_url,
                             engine.limits.file_url_ttl_seconds * 1000)


@operation("file.list", pf.ListFiles, auth="any")
async def list_files(engine: Engine, call: Call, req: pf.ListFiles) -> Any:
    return await engine.read(files.list_files, _workspace(call), req.uploaded_by, req.limit,
                             req.before, call.base_url, engine.limits.file_url_ttl_seconds * 1000)


@operation("file.delete", pf.FileRef, auth="agent")
async def delete_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    workspace_id, agent_id = _agent(call)
    return await engine.submit(files.DeleteFile(
        workspace_id=workspace_id, agent_id=agent_id, file_id=req.file_id))


# The webhook operations live with the webhook code; importing registers them
# (at the end: that module imports `operation` from this one).
from broker.webhooks import operations as _webhook_operations  # noqa: E402,F401
