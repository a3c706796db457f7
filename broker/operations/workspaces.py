"""Workspace operations: create (or find with its key), look up by name, read, update, delete."""

from __future__ import annotations

from typing import Any

from broker.engine import workspaces
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.operations.registry import Call, Existing, operation, workspace_of
from protocol import objects as ob
from protocol import requests as rq
from protocol.responses import WorkspaceFound, WorkspaceLookup


@operation("workspace.create", rq.CreateWorkspace, auth="none",
           output=ob.WorkspaceCreated | Existing[WorkspaceFound])
async def create_workspace(engine: Engine, call: Call, req: rq.CreateWorkspace) -> Any:
    """Create a workspace; with that workspace's own key, an existing one is found instead.

    The second form is what the SDK's `ensureWorkspace` relies on (200, no key
    in the answer, instead of 201 with the new key).
    """
    try:
        return await engine.submit(workspaces.CreateWorkspace(req.name))
    except BrokerError as exc:
        principal = call.principal
        if (exc.code != "workspace_already_exists" or principal is None
                or principal.agent_id is not None):
            raise
        found = await engine.read(workspaces.get_workspace, principal.workspace_id)
        if found.name != req.name:
            raise
        return Existing(WorkspaceFound(
            workspace_id=found.id, name=found.name, created_at=found.created_at))


@operation("workspace.lookup", rq.WorkspaceByName, auth="none", output=WorkspaceLookup)
async def lookup_workspace(engine: Engine, call: Call, req: rq.WorkspaceByName) -> Any:
    found = await engine.read(workspaces.workspace_by_name, req.name)
    return WorkspaceLookup(id=found.id, name=found.name, created_at=found.created_at)


@operation("workspace.get", rq.Empty, auth="any", output=ob.Workspace)
async def get_workspace(engine: Engine, call: Call, req: rq.Empty) -> Any:
    return await engine.read(workspaces.get_workspace, workspace_of(call))


@operation("workspace.update", rq.UpdateWorkspace, auth="workspace", output=ob.Workspace)
async def update_workspace(engine: Engine, call: Call, req: rq.UpdateWorkspace) -> Any:
    return await engine.submit(workspaces.UpdateWorkspace(
        workspace_id=workspace_of(call), name=req.name, system_prompt=req.system_prompt))


@operation("workspace.delete", rq.Empty, auth="workspace", output=ob.WorkspaceDeleted)
async def delete_workspace(engine: Engine, call: Call, req: rq.Empty) -> Any:
    return await engine.submit(workspaces.DeleteWorkspace(workspace_id=workspace_of(call)))
