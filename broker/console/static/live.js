// The observer socket: every event of the workspace, live. The key goes in the
// socket's query (a browser cannot set headers on a WebSocket) and nowhere else.
//
// When the socket drops (the daemon restarts, the network blinks) it reconnects
// with exponential backoff and jitter, and says so through onState; after a
// reconnect the views reload what they show, since events sent while the
// socket was down are not replayed (the observer stream has no seq).

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 15000;
// The observer is closed after the daemon's idle_timeout (90 s) of silence.
const PING_EVERY_MS = 30000;

export class LiveSocket {
  /**
   * key: the workspace key. onEvent(event): each flat event. onState(state, detail):
   * "connecting" | "live" | "retrying" (detail: seconds until the next try) | "refused".
   * checkKey(): resolves false when the daemon refuses the key (then no more retries).
   */
  constructor(key, { onEvent, onState, onReconnect, checkKey }) {
    this.key = key;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onReconnect = onReconnect;
    this.checkKey = checkKey;
    this.attempt = 0;
    this.everOpened = false;
    this.socket = null;
    this.timer = null;
    this.pinger = null;
    this.stopped = false;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    if (this.socket) this.socket.close(1000, "signed out");
    this.socket = null;
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/v1/ws?token=${encodeURIComponent(this.key)}`;
  }

  connect() {
    if (this.stopped) return;
    this.onState("connecting");
    const socket = new WebSocket(this.url());
    this.socket = socket;
    socket.addEventListener("open", () => {
      if (socket !== this.socket) return;
      const reconnected = this.everOpened;
      this.everOpened = true;
      this.attempt = 0;
      this.onState("live");
      this.pinger = setInterval(() => this.send({ type: "ping" }), PING_EVERY_MS);
      if (reconnected && this.onReconnect) this.onReconnect();
    });
    socket.addEventListener("message", (message) => {
      if (socket !== this.socket || typeof message.data !== "string") return;
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (event && typeof event.type === "string" && event.type !== "pong") this.onEvent(event);
    });
    socket.addEventListener("close", (close) => {
      if (socket !== this.socket) return;
      clearInterval(this.pinger);
      this.socket = null;
      if (this.stopped) return;
      this.retry(close.code);
    });
  }

  async retry(code) {
    // 4401: the credential went away (workspace deleted, key refused).
    if (code === 4401 || !(await this.stillValid())) {
      this.stopped = true;
      this.onState("refused");
      return;
    }
    const delay = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** this.attempt);
    const jittered = Math.round(delay * (0.75 + Math.random() * 0.5));
    this.attempt += 1;
    this.onState("retrying", Math.ceil(jittered / 1000));
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), jittered);
  }

  async stillValid() {
    // A refused handshake looks like any failed connect in a browser: ask REST.
    try {
      return await this.checkKey();
    } catch (err) {
      return true; // unreachable: keep trying
    }
  }

  send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
    }
  }
}
