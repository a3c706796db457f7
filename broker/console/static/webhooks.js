// Webhooks: the outbound subscriptions with their pending and dead-lettered
// events, each dead letter's last failure, and replay (one, or all of a
// subscription's); the inbound hooks.

import { seg } from "./api.js";
import { $, clear, confirmAction, el, when } from "./dom.js";

const DEAD_LETTER_PAGE = 50;

export class WebhooksView {
  constructor(api) {
    this.api = api;
    this.visible = false;
    $("webhooks-refresh").addEventListener("click", () => this.reload());
  }

  show() {
    this.visible = true;
    this.reload();
  }

  hide() {
    this.visible = false;
  }

  async reload() {
    if (!this.visible) return;
    await Promise.all([this.loadSubscriptions(), this.loadHooks()]);
  }

  async loadSubscriptions() {
    const box = $("subscriptions");
    let subscriptions;
    try {
      subscriptions = await this.api.get("/v1/subscriptions");
    } catch (error) {
      clear(box).append(el("p", { class: "error", text: `Subscriptions: ${error.message}` }));
      return;
    }
    clear(box);
    if (!subscriptions.length) {
      box.append(el("p", { class: "muted", text: "No subscriptions." }));
      return;
    }
    for (const sub of subscriptions) box.append(this.subscriptionNode(sub));
  }

  subscriptionNode(sub) {
    const letters = el("div", { class: "dead-letters" });
    const node = el("article", { class: "card subscription", "data-subscription": sub.id },
      el("h3", { text: sub.url }),
      el("p", { class: "muted" },
        `events: ${sub.events.join(", ")}`,
        sub.filter ? ` · filter: ${JSON.stringify(sub.filter)}` : "",
        sub.is_active ? "" : " · inactive"),
      el("p", {},
        el("span", { class: "figure", "data-field": "pending", text: `${sub.pending} pending` }),
        " · ",
        el("span", { class: sub.dead_letters ? "figure warn" : "figure",
          "data-field": "dead_letters", text: `${sub.dead_letters} dead letters` })),
      letters);
    if (sub.dead_letters) this.loadDeadLetters(sub, letters, null);
    return node;
  }

  async loadDeadLetters(sub, box, before) {
    let page;
    try {
      page = await this.api.get(`/v1/subscriptions/${seg(sub.id)}/dead-letters`,
        { limit: DEAD_LETTER_PAGE, before });
    } catch (error) {
      box.append(el("p", { class: "error", text: `Dead letters: ${error.message}` }));
      return;
    }
    if (!before) {
      clear(box);
      box.append(el("button", { type: "button", class: "quiet replay-all",
        text: "Replay all dead letters", onclick: () => this.replay(sub, null) }));
    }
    const table = box.querySelector("table") || box.appendChild(el("table", { class: "grid" },
      el("thead", {}, el("tr", {},
        el("th", { scope: "col", text: "Event" }), el("th", { scope: "col", text: "Attempts" }),
        el("th", { scope: "col", text: "Last failure" }),
        el("th", { scope: "col", text: "Failed at" }),
        el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "Actions" })))),
      el("tbody")));
    const body = table.querySelector("tbody");
    for (const letter of page) {
      const failure = letter.last_status ? `HTTP ${letter.last_status}` : (letter.last_error || "");
      body.append(el("tr", { "data-dead-letter": letter.id },
        el("td", { text: letter.type }),
        el("td", { class: "num", text: String(letter.attempts) }),
        el("td", { text: failure }),
        el("td", {}, el("time", { datetime: letter.failed_at || "", text: when(letter.failed_at) })),
        el("td", {}, el("button", { type: "button", class: "quiet", text: "Replay",
          "aria-label": `Replay dead letter ${letter.id}`,
          onclick: () => this.replay(sub, [letter.id]) }))));
    }
    box.querySelector("button.more")?.remove();
    if (page.length === DEAD_LETTER_PAGE) {
      box.append(el("button", { type: "button", class: "quiet more", text: "More dead letters",
        onclick: () => this.loadDeadLetters(sub, box, page[page.length - 1].id) }));
    }
  }

  async replay(sub, ids) {
    const what = ids ? "this dead letter" : `all dead letters of ${sub.url}`;
    const ok = await confirmAction("Replay?", `Send ${what} to ${sub.url} again.`, "Replay");
    if (!ok) return;
    try {
      const result = await this.api.post(`/v1/subscriptions/${seg(sub.id)}/dead-letters/replay`,
        ids ? { ids } : {});
      this.notice(`Replayed ${result.replayed} event${result.replayed === 1 ? "" : "s"}.`);
    } catch (error) {
      this.notice(`Replay failed: ${error.message}`);
    }
    await this.loadSubscriptions();
  }

  async loadHooks() {
    const box = $("inbound-hooks");
    let hooks;
    try {
      hooks = await this.api.get("/v1/webhooks");
    } catch (error) {
      clear(box).append(el("p", { class: "error", text: `Inbound hooks: ${error.message}` }));
      return;
    }
    clear(box);
    if (!hooks.length) {
      box.append(el("p", { class: "muted", text: "No inbound hooks." }));
      return;
    }
    const list = el("ul", { class: "plain" });
    for (const hook of hooks) {
      list.append(el("li", {}, el("strong", { text: hook.name }),
        ` → #${hook.channel} as ${hook.agent_name}`, hook.is_active ? "" : " (inactive)",
        el("code", { class: "url", text: ` ${hook.url}` })));
    }
    box.append(list);
  }

  notice(text) {
    const node = $("notice");
    node.textContent = text;
    node.hidden = !text;
  }
}
