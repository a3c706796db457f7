// The realtime half of @relaycast/sdk 6.0.2 against a running broker.
//
// Usage: node --experimental-websocket sdk_realtime.mjs BASE_URL AGENT_TOKEN
//
// Connects as the agent (AgentClient.connect: POST /v1/agent/node-token, then
// /v1/node/ws with node.register, auto-acked `deliver` frames, reconnects
// with backoff) and prints one JSON line per event the SDK hands to the
// application: {"event": <type>, "data": <the SDK's event object>}. It runs
// until stdin closes. tests/test_gateway_sdk.py drives the broker around it.

import { RelayCast } from '@relaycast/sdk';

const [baseUrl, token] = process.argv.slice(2);
if (!baseUrl || !token) {
  console.error('usage: sdk_realtime.mjs BASE_URL AGENT_TOKEN');
  process.exit(2);
}

const print = (event, data) => process.stdout.write(JSON.stringify({ event, data }) + '\n');

// The workspace key is not used by an agent client; RelayCast only needs one to exist.
const relay = new RelayCast({ apiKey: 'rk_live_unused', baseUrl });
const agent = relay.as(token, {
  autoHeartbeatMs: false,
  ws: { reconnectBaseDelayMs: 100, reconnectMaxDelayMs: 500, reconnectJitter: false },
});
agent.connect();
agent.on.connected(() => print('open', {}));
agent.on.disconnected(() => print('close', {}));
agent.on.messageCreated((e) => print('message.created', e));
agent.on.threadReply((e) => print('thread.reply', e));
agent.on.dmReceived((e) => print('dm.received', e));
agent.on.groupDmReceived((e) => print('group_dm.received', e));
agent.on.messageReacted((e) => print('message.reacted', e));

process.stdin.on('end', async () => {
  await agent.disconnect();
  process.exit(0);
});
process.stdin.resume();
