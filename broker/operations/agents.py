"""Agent operations: register, list, read, update, rotate a token, deactivate, presence.

Managing an agent (register, update, rotate, deactivate) takes the
workspace key; heartbeat and disconnect are the agent's own.
"""

from __future__ import annotations

from typing import Any

from broker.engine import agents, workspaces
from broker.engine.engine import Engine
from broker.operations.registry import Call, agent_id_of, agent_of, operation, workspace_of
from protocol import objects as ob
from protocol import requests as rq
from protocol.responses import PresenceInfo


@operation("agent.register", rq.RegisterAgent, auth="workspace", output=ob.AgentCreated)
async def register_agent(engine: Engine, call: Call, req: rq.RegisterAgent) -> Any:
    return await engine.submit(workspaces.RegisterAgent(
        workspace_id=workspace_of(call), name=req.name, type=req.type, persona=req.persona,
        metadata=req.metadata))


@operation("agent.list", rq.ListAgents, auth="any", output=list[ob.Agent])
async def list_agents(engine: Engine, call: Call, req: rq.ListAgents) -> Any:
    return await engine.read(agents.list_agents, workspace_of(call), req.status)


@operation("agent.get", rq.AgentByName, auth="any", output=ob.Agent)
async def get_agent(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    return await engine.read(agents.get_agent, workspace_of(call), req.name)


@operation("agent.me", rq.Empty, auth="agent", output=ob.Agent)
async def agent_me(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.read(agents.get_self, workspace_id, agent_id)


@operation("agent.presence", rq.Empty, auth="any", output=list[PresenceInfo])
async def agent_presence(engine: Engine, call: Call, req: rq.Empty) -> Any:
    listed = await engine.read(agents.list_agents, workspace_of(call), None)
    return [PresenceInfo(agent_id=a.id, agent_name=a.name, status=a.status,
                         last_seen=a.last_seen) for a in listed]


@operation("agent.update", rq.UpdateAgent, auth="workspace", output=ob.Agent)
async def update_agent(engine: Engine, call: Call, req: rq.UpdateAgent) -> Any:
    workspace_id = workspace_of(call)
    return await engine.submit(agents.UpdateAgent(
        workspace_id=workspace_id, agent_id=await agent_id_of(engine, workspace_id, req.name),
        persona=req.persona, metadata=req.metadata, status=req.status))


@operation("agent.rotate_token", rq.AgentByName, auth="workspace", output=ob.TokenRotated)
async def rotate_token(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    workspace_id = workspace_of(call)
    return await engine.submit(agents.RotateToken(
        workspace_id=workspace_id, agent_id=await agent_id_of(engine, workspace_id, req.name)))


@operation("agent.deactivate", rq.AgentByName, auth="workspace", output=ob.AgentDeactivated)
async def deactivate_agent(engine: Engine, call: Call, req: rq.AgentByName) -> Any:
    workspace_id = workspace_of(call)
    return await engine.submit(agents.DeactivateAgent(
        workspace_id=workspace_id, agent_id=await agent_id_of(engine, workspace_id, req.name)))


@operation("agent.heartbeat", rq.Empty, auth="agent", output=ob.AgentStatusChanged)
async def heartbeat(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(agents.SetAgentStatus(
        workspace_id=workspace_id, agent_id=agent_id, status="online"))


@operation("agent.disconnect", rq.Empty, auth="agent", output=ob.AgentStatusChanged)
async def disconnect(engine: Engine, call: Call, req: rq.Empty) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(agents.SetAgentStatus(
        workspace_id=workspace_id, agent_id=agent_id, status="offline"))
