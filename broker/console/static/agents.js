// Agents: presence (live), last seen, and each agent's mailbox (pending,
// failed and dead-lettered deliveries, the oldest unacked one's age), with
// two actions behind a confirmation: rotate the token (the new one is shown
// once) and deactivate.

import { ApiError, seg } from "./api.js";
import { $, age, clear, confirmAction, el, showSecret, when } from "./dom.js";

const AGENT_PAGE = 100;
// The mailbox figures move with every send: refreshed this often while shown.
const REFRESH_MS = 5000;
// The observer's presence events, as the presence the REST reads show.
const STATUS_OF_EVENT = {
  "agent.status.active": "online",
  "agent.status.idle": "away",
  "agent.status.offline": "offline",
};

export class AgentsView {
  constructor(api) {
    this.api = api;
    this.rows = []; // MailboxSummary (or, without mailbox reads, Agent) objects
    this.limit = AGENT_PAGE;
    this.timer = null;
    this.visible = false;
    $("agent-filter").addEventListener("input", () => {
      this.limit = AGENT_PAGE;
      this.render();
    });
    $("agents-more").addEventListener("click", () => {
      this.limit += AGENT_PAGE;
      this.render();
    });
  }

  show() {
    this.visible = true;
    this.reload();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.reload(), REFRESH_MS);
  }

  hide() {
    this.visible = false;
    clearInterval(this.timer);
  }

  stop() {
    this.hide();
  }

  async reload() {
    if (!this.visible) return;
    const note = $("mailbox-note");
    try {
      this.rows = await this.api.get("/v1/mailboxes");
      note.hidden = true;
    } catch (error) {
      // A daemon without owner mailbox reads: presence and last seen only.
      if (!(error instanceof ApiError) || error.status === 0 || error.status === 401) return;
      try {
        const agents = await this.api.get("/v1/agents");
        this.rows = agents.map((a) => ({ agent_name: a.name, status: a.status,
          last_seen: a.last_seen }));
      } catch (inner) {
        return;
      }
      note.hidden = false;
      note.textContent = `Mailboxes: this daemon does not let the workspace key read them (${error.code}).`;
    }
    this.rows.sort((a, b) => a.agent_name.localeCompare(b.agent_name));
    this.render();
  }

  render() {
    const body = clear(document.querySelector("#agent-table tbody"));
    const filter = $("agent-filter").value.trim().toLowerCase();
    const shown = this.rows.filter((r) => !filter || r.agent_name.toLowerCase().includes(filter));
    for (const row of shown.slice(0, this.limit)) body.append(this.rowNode(row));
    if (!shown.length) {
      body.append(el("tr", {}, el("td", { colspan: 8, class: "muted", text: "No agents." })));
    }
    const more = $("agents-more");
    more.hidden = shown.length <= this.limit;
    more.textContent = `Show more (${shown.length - this.limit} left)`;
  }

  rowNode(row) {
    const figure = (value) => (value === undefined || value === null ? "—" : String(value));
    const oldest = row.oldest_unacked_age_ms === undefined || row.oldest_unacked_age_ms === null
      ? "—" : age(row.oldest_unacked_age_ms / 1000);
    return el("tr", { "data-agent": row.agent_name },
      el("th", { scope: "row", text: row.agent_name }),
      el("td", {}, el("span", { class: "presence", "data-status": row.status,
        text: row.status })),
      el("td", {}, el("time", { datetime: row.last_seen || "", text: when(row.last_seen) || "never" })),
      el("td", { class: "num", "data-field": "pending", text: figure(row.pending) }),
      el("td", { class: row.failed ? "num warn" : "num", "data-field": "failed",
        text: figure(row.failed) }),
      el("td", { class: row.dead_lettered ? "num warn" : "num", "data-field": "dead_lettered",
        text: figure(row.dead_lettered) }),
      el("td", { class: "num", "data-field": "oldest", text: oldest }),
      el("td", { class: "actions" },
        el("button", { type: "button", class: "quiet", text: "Rotate token",
          "aria-label": `Rotate ${row.agent_name}'s token`,
          onclick: () => this.rotate(row.agent_name) }),
        el("button", { type: "button", class: "quiet danger-text", text: "Deactivate",
          "aria-label": `Deactivate ${row.agent_name}`,
          onclick: () => this.deactivate(row.agent_name) })));
  }

  async rotate(name) {
    const ok = await confirmAction(`Rotate ${name}'s token?`,
      `${name} gets a new token; the current one keeps working only for its grace period, `
      + "then its sockets are closed.", "Rotate");
    if (!ok) return;
    try {
      const rotated = await this.api.post(`/v1/agents/${seg(name)}/rotate-token`);
      await showSecret(`New token for ${name}`, rotated.token);
    } catch (error) {
      this.notice(`Rotating ${name}'s token failed: ${error.message}`);
    }
  }

  async deactivate(name) {
    const ok = await confirmAction(`Deactivate ${name}?`,
      `${name}'s tokens stop working at once and its sockets are closed.`, "Deactivate");
    if (!ok) return;
    try {
      await this.api.delete(`/v1/agents/${seg(name)}`);
      this.rows = this.rows.filter((r) => r.agent_name !== name);
      this.render();
    } catch (error) {
      this.notice(`Deactivating ${name} failed: ${error.message}`);
    }
  }

  notice(text) {
    const node = $("notice");
    node.textContent = text;
    node.hidden = !text;
  }

  onEvent(event) {
    if (!event.type.startsWith("agent.status.")) return;
    const name = event.agent?.name;
    const row = this.rows.find((r) => r.agent_name === name);
    if (!row) {
      if (this.visible) this.reload(); // a new agent
      return;
    }
    row.status = STATUS_OF_EVENT[event.type] || row.status;
    if (event.type === "agent.status.offline") row.last_seen = new Date().toISOString();
    if (this.visible) this.render();
  }
}
