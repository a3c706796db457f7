// The console's entry point: sign in, tabs, the live socket, and the views.
//
// The workspace key comes from the sign-in form or from the URL fragment
// (#key=rk_live_...; a fragment never reaches a server). The fragment is
// removed from the address bar before anything else runs, and the key is
// kept in sessionStorage only (this tab, until it closes), and only once the
// daemon has accepted it.

import { Api, ApiError, isRefusedKey } from "./api.js";
import { $ } from "./dom.js";
import { LiveSocket } from "./live.js";
import { ConversationsView } from "./conversations.js";
import { AgentsView } from "./agents.js";
import { WebhooksView } from "./webhooks.js";
import { HealthView } from "./health.js";

const KEY_STORAGE = "broker.console.key";
const TABS = ["conversations", "agents", "webhooks", "health"];

function takeKeyFromFragment() {
  if (!location.hash.startsWith("#")) return null;
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("key");
  if (key === null) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return key.trim();
}

/** Resolves to the workspace, or throws an ApiError saying why the key is refused. */
async function checkKey(key) {
  const api = new Api(key);
  const [workspace] = await Promise.all([
    api.get("/v1/workspace"),
    // Only a workspace key may list subscriptions: an agent token gets 403.
    api.get("/v1/subscriptions"),
  ]);
  return workspace;
}

function refusalText(error) {
  if (isRefusedKey(error)) {
    return "The daemon refused this key: it is wrong, revoked, or its workspace was deleted.";
  }
  if (error instanceof ApiError && error.status === 403) {
    return "This is not a workspace key (an agent token cannot open the console).";
  }
  if (error instanceof ApiError && error.status === 429) {
    return "Too many refused keys from this address: wait a minute and try again.";
  }
  if (error instanceof ApiError && error.status === 0) {
    return "The daemon does not answer. Is it running?";
  }
  return `Sign-in failed: ${error.message}`;
}

class Console {
  constructor() {
    this.api = null;
    this.live = null;
    this.views = {};
    this.current = "conversations";
  }

  boot() {
    const fromFragment = takeKeyFromFragment();
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (key) this.signIn(key, "form");
    });
    $("sign-out").addEventListener("click", () => this.signOut(""));
    this.setUpTabs();
    const stored = sessionStorage.getItem(KEY_STORAGE);
    if (fromFragment) this.signIn(fromFragment, "fragment");
    else if (stored) this.signIn(stored, "storage");
    else this.showSignIn("");
  }

  showSignIn(message) {
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("workspace-name").hidden = true;
    $("connection").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = message;
    $("key-input").value = "";
    $("key-input").focus();
  }

  async signIn(key, source) {
    $("signin-submit").disabled = true;
    $("signin-error").textContent = "";
    let workspace;
    try {
      workspace = await checkKey(key);
    } catch (error) {
      $("signin-submit").disabled = false;
      if (source === "storage") sessionStorage.removeItem(KEY_STORAGE);
      this.showSignIn(refusalText(error));
      return;
    }
    $("signin-submit").disabled = false;
    $("key-input").value = "";
    sessionStorage.setItem(KEY_STORAGE, key);
    this.start(key, workspace);
  }

  signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    if (this.live) this.live.stop();
    for (const view of Object.values(this.views)) view.stop?.();
    this.views = {};
    this.api = null;
    this.live = null;
    this.showSignIn(message);
  }

  start(key, workspace) {
    const api = this.api = new Api(key);
    api.onRefused = () => this.signOut(
      "The daemon no longer accepts this key (revoked, or the workspace was deleted).");
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    const name = $("workspace-name");
    name.textContent = workspace.name;
    name.hidden = false;
    this.views = {
      conversations: new ConversationsView(api),
      agents: new AgentsView(api),
      webhooks: new WebhooksView(api),
      health: new HealthView(),
    };
    this.live = new LiveSocket(key, {
      onEvent: (event) => {
        for (const view of Object.values(this.views)) view.onEvent?.(event);
      },
      onState: (state, detail) => this.showConnection(state, detail),
      onReconnect: () => {
        for (const view of Object.values(this.views)) view.reload?.();
      },
      checkKey: async () => {
        try {
          await api.get("/v1/workspace");
          return true;
        } catch (error) {
          if (isRefusedKey(error)) return false;
          throw error;
        }
      },
    });
    this.live.start();
    this.select(this.current);
  }

  showConnection(state, detail) {
    const badge = $("connection");
    badge.hidden = false;
    badge.dataset.state = state;
    badge.textContent = {
      connecting: "connecting…",
      live: "live",
      retrying: `daemon unreachable: retrying in ${detail} s`,
      refused: "key refused",
    }[state];
    if (state === "refused") {
      this.signOut("The daemon no longer accepts this key (revoked, or the workspace was deleted).");
    }
  }

  setUpTabs() {
    for (const name of TABS) {
      $(`tab-${name}`).addEventListener("click", () => this.select(name));
    }
    // Arrow keys move between tabs (the ARIA tabs pattern).
    document.querySelector(".tabs").addEventListener("keydown", (event) => {
      const at = TABS.indexOf(this.current);
      let next = null;
      if (event.key === "ArrowRight") next = TABS[(at + 1) % TABS.length];
      else if (event.key === "ArrowLeft") next = TABS[(at + TABS.length - 1) % TABS.length];
      else if (event.key === "Home") next = TABS[0];
      else if (event.key === "End") next = TABS[TABS.length - 1];
      if (next) {
        event.preventDefault();
        this.select(next);
        $(`tab-${next}`).focus();
      }
    });
  }

  select(name) {
    this.current = name;
    $("notice").hidden = true; // a notice belongs to the view it came from
    for (const tab of TABS) {
      const selected = tab === name;
      const button = $(`tab-${tab}`);
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      $(`view-${tab}`).hidden = !selected;
      const view = this.views[tab];
      if (!view) continue;
      if (selected) view.show();
      else view.hide?.();
    }
  }
}

new Console().boot();
