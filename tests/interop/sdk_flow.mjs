// Drives a running broker with the real @relaycast/sdk and prints what it saw as JSON.
//
// Usage: node --experimental-websocket sdk_flow.mjs http://127.0.0.1:PORT
//
// Every step goes through the SDK's public API, so the broker is checked
// against the SDK's real paths, bodies, headers and envelope parsing (the
// SDK throws on anything it cannot parse). tests/test_interop_sdk.py starts
// the daemon, runs this script and asserts on the printed results.

import { RelayCast, RelayError } from '@relaycast/sdk';

const baseUrl = process.argv[2];
if (!baseUrl) {
  console.error('usage: sdk_flow.mjs BASE_URL');
  process.exit(2);
}

const results = {};
const step = async (name, fn) => {
  try {
    results[name] = await fn();
  } catch (err) {
    results[name] = {
      thrown: true,
      name: err?.name,
      code: err?.code,
      rawCode: err?.rawCode,
      statusCode: err?.statusCode,
      message: String(err?.message ?? err),
    };
  }
  return results[name];
};

// Workspace: create with the static helper, look it up by name.
const created = await step('createWorkspace', () =>
  RelayCast.createWorkspace('interop', { baseUrl }));
await step('lookupWorkspace', () => RelayCast.lookupWorkspace('interop', { baseUrl }));
await step('lookupMissing', () => RelayCast.lookupWorkspace('nobody-here', { baseUrl }));
await step('ensureWorkspace', () =>
  RelayCast.ensureWorkspace('interop', { baseUrl, apiKey: created.apiKey }));

const relay = new RelayCast({ apiKey: created.apiKey, baseUrl });
await step('workspaceInfo', () => relay.workspace.info());

// Agents.
const aliceReg = await step('registerAlice', () => relay.agents.register({ name: 'alice' }));
const bobReg = await step('registerBob', () =>
  relay.agents.register({ name: 'bob', persona: 'reviewer' }));
await step('listAgents', () => relay.agents.list());
const alice = relay.as(aliceReg.token);
const bob = relay.as(bobReg.token);
await step('aliceMe', () => alice.me());

// Channels: create, join, list, get.
await step('createChannel', () => alice.channels.create({ name: 'ops', topic: 'deploys' }));
await step('joinChannel', () => bob.channels.join('ops'));
await step('listChannels', () => relay.channels.list());
await step('getChannel', () => bob.channels.get('ops'));

// Messages: send (with the SDK's idempotency headers), list, get.
const sent = await step('send', () => alice.send('#ops', 'hello @bob, deploy at noon'));
await step('sendAgain', () => alice.send('ops', 'second message'));
await step('listMessages', () => bob.messages('ops', { limit: 10 }));
await step('getMessage', () => bob.message(sent.id));

// Threads.
await step('reply', () => bob.reply(sent.id, 'ack, watching the deploy'));
await step('thread', () => alice.thread(sent.id));

// DMs.
await step('dm', () => alice.dm('bob', 'psst, a secret'));
await step('conversations', () => bob.dms.conversations());

// Reactions.
await step('react', () => bob.react(sent.id, 'rocket'));
await step('reactions', () => alice.reactions(sent.id));

// Read receipts.
await step('markRead', () => bob.markRead(sent.id));
await step('readers', () => alice.readers(sent.id));
await step('readStatus', () => alice.readStatus('ops'));

// Inbox and search.
await step('bobInbox', () => bob.inbox());
await step('aliceInbox', () => alice.inbox());
await step('search', () => alice.search('deploy'));

// The delivery mailbox.
const pending = await step('deliveries', () => bob.deliveries());
await step('ackDelivery', () => bob.ackDelivery(pending[0].id));
await step('ackedDeliveries', () => bob.deliveries({ status: 'acked' }));

// An error comes back as a RelayError with the broker's code and status.
await step('missingMessage', () => bob.message('12345'));
await step('wrongKind', () => relay.client.get('/v1/inbox'));

results.errorIsRelayError = results.missingMessage.thrown === true;
results.relayErrorClass = typeof RelayError === 'function';
console.log(JSON.stringify(results));
