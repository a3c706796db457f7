"""The MCP server: the SDK's low-level `Server`, its handlers bound to the operation table.

Each handler finds its caller in the HTTP request the SDK hands it
(`ctx.request.scope`, set by broker.mcp.endpoint after the token was
checked): there is no MCP without HTTP here (the stdio bridge speaks HTTP
to this endpoint). A tool call decodes its arguments into the operation's
input exactly as REST does (`invoke`), so it refuses the same bad input
with the same codes, and it is counted against the same rate limits. A
domain error is a tool result with `isError` and `{"error": {"code",
"message"}}`, never a protocol error; an unknown tool is a JSON-RPC error
(invalid params), as the MCP specification asks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import mcp_types as types
import msgspec
import trio
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError

from broker.auth import authorize
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.mcp import render
from broker.mcp.notify import ResourceNotifier
from broker.mcp.prompt import PROMPT_NAME, prompt_messages
from broker.mcp.sessions import SESSION_HEADER, Caller
from broker.mcp.tools import MAX_WAIT_SECONDS, Tool, WaitInput, resolve, tools
from broker.mcp.watch import CHANNEL_URI_PREFIX, INBOX_URI, Watches
from broker.operations.registry import Call, Existing, invoke
from broker.ratelimit import RateLimited, RateLimiter, client_address
from protocol import objects as ob
from protocol.nesting import unstorable

log = logging.getLogger(__name__)

SERVER_NAME = "agent-broker"
INSTRUCTIONS = (
    "A message broker for agents. Check your inbox (message.inbox.check), wait for messages "
    "without polling (message.inbox.wait), reply in threads (message.reply) and mark what "
    "you handled as read (message.inbox.mark_read). See the prompt 'agent-guide'.")
# Messages a channel resource shows.
CHANNEL_RESOURCE_MESSAGES = 20
CALLER_KEY = "broker.mcp.caller"
# Told of each tool call: the tool's name, `ok` or the error code, the seconds it took.
ToolCallObserver = Callable[[str, str, float], None]


class McpHandlers:
    """The handlers of the server (`build` makes the SDK's `Server` of them)."""

    def __init__(self, engine: Engine, watches: Watches, notifier: ResourceNotifier,
                 limiter: RateLimiter, public_url: str | None = None,
                 on_tool_call: ToolCallObserver | None = None) -> None:
        """on_tool_call(tool, outcome, seconds): told of every call of a known tool, with
        `ok` or the error code as its outcome (the metrics)."""
        self.engine = engine
        self.public_url = public_url
        self.watches = watches
        self.notifier = notifier
        self.limiter = limiter
        self.on_tool_call = on_tool_call

    def build(self) -> Server[Any]:
        server: Server[Any] = Server(
            SERVER_NAME, version="1", instructions=INSTRUCTIONS,
            on_list_tools=self.list_tools, on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
            on_subscribe_resource=self.subscribe, on_unsubscribe_resource=self.unsubscribe,
            on_subscriptions_listen=self.listen,
            on_list_prompts=self.list_prompts, on_get_prompt=self.get_prompt,
        )
        # No tracing exporter is configured: the default middleware is only overhead here.
        server.middleware = []
        return server

    # -- tools -------------------------------------------------------------------------------

    async def list_tools(self, ctx: ServerRequestContext[Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        caller = _caller(ctx)
        return types.ListToolsResult(tools=[
            _tool(tool) for tool in tools().values() if tool.visible_to(caller.is_agent)])

    async def call_tool(self, ctx: ServerRequestContext[Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        tool = resolve(params.name)
        if tool is None:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool: {params.name!r}",
                           {"code": "unknown_tool"})
        if self.on_tool_call is None:
            return await self._call_tool(ctx, tool, params)
        started = time.perf_counter()
        outcome = "internal_error"  # a bug: the SDK answers it as a JSON-RPC error
        try:
            result = await self._call_tool(ctx, tool, params)
            outcome = _error_code(result) or "ok"
            return result
        except trio.Cancelled:
            outcome = "cancelled"  # the client went away, or the daemon stops
            raise
        finally:
            self.on_tool_call(tool.name, outcome, time.perf_counter() - started)

    async def _call_tool(self, ctx: ServerRequestContext[Any], tool: Tool,
                         params: types.CallToolRequestParams) -> types.CallToolResult:
        caller = _caller(ctx)
        arguments = params.arguments or {}
        # The SDK decoded them: the bound every other binding's decoder applies.
        problem = unstorable(arguments)
        if problem is not None:
            return _tool_error("invalid_request", f"the arguments hold {problem}")
        try:
            if tool.operation is None:
                result = await self._wait(caller, arguments)
            else:
                op = tool.operation
                authorize(op.auth, caller.principal)
                self.limiter.take_request(op.name, caller.principal.workspace_id,
                                          caller.principal.agent_id, _address(ctx))
                result = await invoke(self.engine, op.name,
                                      Call(caller.principal,
                                           base_url=self.public_url or _base_url(ctx)), arguments)
                if isinstance(result, Existing):
                    result = result.value
        except RateLimited as exc:
            return _tool_error(exc.code, exc.message)
        except BrokerError as exc:
            return _tool_error(exc.code, exc.message)
        content = [types.TextContent(type="text", text=render.text(result))]
        # The inbox check has just read what the notice says.
        notice = render.notice(result) if isinstance(result, ob.Inbox) else \
            await self._notice(caller)
        if notice is not None:
            content.append(types.TextContent(type="text", text=notice))
        return types.CallToolResult(content=list(content),
                                    structured_content=render.structured(result))

    async def _notice(self, caller: Caller) -> str | None:
        """The unread notice of an agent's tool results (None: nothing unread, or no agent)."""
        if not caller.is_agent:
            return None
        try:
            inbox = await invoke(self.engine, "inbox.get", Call(caller.principal), {})
        except BrokerError:
            return None
        assert isinstance(inbox, ob.Inbox)
        return render.notice(inbox)

    async def _wait(self, caller: Caller, arguments: dict[str, Any]) -> Any:
        """`message.inbox.wait`: the unacked deliveries, after waiting on the hub for one."""
        if not caller.is_agent:
            raise BrokerError("forbidden", "this operation needs an agent token")
        try:
            args = msgspec.convert(arguments, WaitInput, strict=False)
        except msgspec.ValidationError as exc:
            raise BrokerError("invalid_request", str(exc)) from None
        if not 0 <= args.timeout_seconds <= MAX_WAIT_SECONDS:
            raise BrokerError("invalid_request",
                              f"timeout_seconds must be between 0 and {MAX_WAIT_SECONDS:g}")
        principal = caller.principal
        assert principal.agent_id is not None
        call = Call(principal)
        listing = {"after_seq": args.after_seq, "limit": args.limit}
        items: list[Any] = []
        with self.watches.holding(principal.workspace_id, principal.agent_id) as watch, \
                trio.move_on_after(args.timeout_seconds):
            while True:
                # Read after taking the seq: a delivery committed in between wakes the wait.
                seen = watch.last_seq
                items = await invoke(self.engine, "delivery.list", call, listing)
                if items:
                    break
                await watch.wait_delivery_after(seen)
        if not items:
            # The timeout passed with nothing: one last look (it may have landed meanwhile).
            items = await invoke(self.engine, "delivery.list", call, listing)
        acked = False
        if items and args.ack:
            await invoke(self.engine, "delivery.ack_up_to", call, {"up_to_seq": items[-1].seq})
            acked = True
        return WaitResult(deliveries=items,
                          next_after_seq=items[-1].seq if items else args.after_seq,
                          acked=acked)

    # -- resources ---------------------------------------------------------------------------

    async def list_resources(self, ctx: ServerRequestContext[Any],
                             params: types.PaginatedRequestParams | None
                             ) -> types.ListResourcesResult:
        caller = _caller(ctx)
        if not caller.is_agent:
            return types.ListResourcesResult(resources=[])
        resources = [types.Resource(uri=INBOX_URI, name="inbox", mime_type="text/plain",
                                    description="Your unread channels, mentions and DMs.")]
        channels = await invoke(self.engine, "channel.list", Call(caller.principal), {})
        for channel in channels:
            resources.append(types.Resource(
                uri=f"{CHANNEL_URI_PREFIX}{channel.name}", name=f"#{channel.name}",
                mime_type="text/plain", description=f"Recent messages of #{channel.name}."))
        return types.ListResourcesResult(resources=resources)

    async def list_resource_templates(self, ctx: ServerRequestContext[Any],
                                      params: types.PaginatedRequestParams | None
                                      ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[types.ResourceTemplate(
            uri_template=f"{CHANNEL_URI_PREFIX}{{name}}", name="channel",
            mime_type="text/plain", description="Recent messages of a channel you are in.")])

    async def read_resource(self, ctx: ServerRequestContext[Any],
                            params: types.ReadResourceRequestParams
                            ) -> types.ReadResourceResult:
        caller = _caller(ctx)
        uri = str(params.uri)
        try:
            if not caller.is_agent:
                raise BrokerError("forbidden", "resources are an agent's: use an agent token")
            call = Call(caller.principal)
            if uri == INBOX_URI:
                inbox = await invoke(self.engine, "inbox.get", call, {})
                body = render.notice(inbox) or "nothing unread"
                data = render.structured(inbox)
            elif uri.startswith(CHANNEL_URI_PREFIX):
                messages = await invoke(self.engine, "message.list", call, {
                    "channel": uri.removeprefix(CHANNEL_URI_PREFIX),
                    "limit": CHANNEL_RESOURCE_MESSAGES})
                body = render.text(messages)
                data = render.structured(messages)
            else:
                raise BrokerError("resource_not_found", f"no resource {uri!r}")
        except BrokerError as exc:
            raise MCPError(types.INVALID_PARAMS, f"{exc.code}: {exc.message}",
                           {"code": exc.code}) from None
        return types.ReadResourceResult(contents=[
            types.TextResourceContents(uri=uri, mime_type="text/plain", text=body),
            types.TextResourceContents(uri=uri, mime_type="application/json",
                                       text=msgspec.json.encode(data).decode()),
        ])

    async def subscribe(self, ctx: ServerRequestContext[Any],
                        params: types.SubscribeRequestParams) -> types.EmptyResult:
        caller, session_id, uri = self._subscription(ctx, str(params.uri))
        principal = caller.principal
        assert principal.agent_id is not None
        self.notifier.subscribe(session_id, ctx.session, principal.workspace_id,
                                principal.agent_id, uri)
        return types.EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any],
                          params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        _, session_id, uri = self._subscription(ctx, str(params.uri))
        self.notifier.unsubscribe(session_id, uri)
        return types.EmptyResult()

    def _subscription(self, ctx: ServerRequestContext[Any], uri: str) -> tuple[Caller, str, str]:
        caller = _caller(ctx)
        if not caller.is_agent:
            raise MCPError(types.INVALID_PARAMS, "forbidden: subscriptions need an agent token",
                           {"code": "forbidden"})
        if uri != INBOX_URI and not (uri.startswith(CHANNEL_URI_PREFIX)
                                     and len(uri) > len(CHANNEL_URI_PREFIX)):
            raise MCPError(types.INVALID_PARAMS, f"resource_not_found: no resource {uri!r}",
                           {"code": "resource_not_found"})
        session_id = ctx.request.headers.get(SESSION_HEADER) if ctx.request else None
        if not session_id:
            raise MCPError(types.INVALID_REQUEST, "resources/subscribe needs a session")
        return caller, session_id, uri

    async def listen(self, ctx: ServerRequestContext[Any],
                     params: types.SubscriptionsListenRequestParams
                     ) -> types.SubscriptionsListenResult:
        caller = _caller(ctx)
        principal = caller.principal
        if principal.agent_id is None:
            raise MCPError(types.INVALID_PARAMS, "forbidden: subscriptions need an agent token",
                           {"code": "forbidden"})
        result: types.SubscriptionsListenResult = await self.notifier.listen(
            principal.workspace_id, principal.agent_id, ctx, params)
        return result

    # -- prompts -----------------------------------------------------------------------------

    async def list_prompts(self, ctx: ServerRequestContext[Any],
                           params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=[types.Prompt(
            name=PROMPT_NAME, description="How to work as an agent with this broker's tools.")])

    async def get_prompt(self, ctx: ServerRequestContext[Any],
                         params: types.GetPromptRequestParams) -> types.GetPromptResult:
        if params.name != PROMPT_NAME:
            raise MCPError(types.INVALID_PARAMS, f"unknown prompt: {params.name!r}",
                           {"code": "unknown_prompt"})
        return types.GetPromptResult(description="Working with the broker",
                                     messages=prompt_messages())


class WaitResult(msgspec.Struct, kw_only=True):
    """What `message.inbox.wait` answers: pass `next_after_seq` to the next wait."""

    deliveries: list[Any]
    next_after_seq: int | None
    acked: bool


def _caller(ctx: ServerRequestContext[Any]) -> Caller:
    request = ctx.request
    caller = request.scope.get(CALLER_KEY) if request is not None else None
    if not isinstance(caller, Caller):
        # Only reachable by serving this server on a transport without the endpoint.
        raise MCPError(types.INVALID_REQUEST, "no authenticated caller")
    return caller


def _address(ctx: ServerRequestContext[Any]) -> str:
    return client_address(ctx.request.scope) if ctx.request is not None else ""


def _base_url(ctx: ServerRequestContext[Any]) -> str | None:
    return str(ctx.request.base_url).rstrip("/") if ctx.request is not None else None


def _tool(tool: Tool) -> types.Tool:
    return types.Tool(name=tool.name, description=tool.description,
                      input_schema=tool.input_schema, annotations=types.ToolAnnotations(
                          read_only_hint=tool.read_only, destructive_hint=tool.destructive))


def _error_code(result: types.CallToolResult) -> str | None:
    """The error code of a tool result made by `_tool_error` (None: not an error)."""
    if not result.is_error or not isinstance(result.structured_content, dict):
        return None
    error = result.structured_content.get("error")
    return str(error["code"]) if isinstance(error, dict) and "code" in error else None


def _tool_error(code: str, message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=f"error {code}: {message}")],
        structured_content={"error": {"code": code, "message": message}}, is_error=True)
