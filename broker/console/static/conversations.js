// Conversations: channels (topic, members, archived), DMs and group DMs, a
// history paged back, threads expanded in place, reactions, attachments, and
// search. Live events from the observer socket append messages, replies and
// reactions to what is on screen.
//
// Every message text is set with textContent: markup in a message is shown as
// the characters it is and never parsed. Long lists stay responsive: channels
// are shown a page at a time, the history is loaded a page at a time, and the
// pane keeps at most MAX_SHOWN messages (the oldest leave; "Load older" brings
// them back).

import { ApiError, seg } from "./api.js";
import { $, bytes, clear, el, when } from "./dom.js";

const CHANNEL_PAGE = 50;
const DM_PAGE = 50;
const HISTORY_PAGE = 50;
const THREAD_PAGE = 100;
const MAX_SHOWN = 500;
// A longer text is cut to this many characters until "Show all" is pressed.
const FOLD_CHARS = 800;
const MESSAGE_EVENTS = new Set(["message.created", "thread.reply", "dm.received",
  "group_dm.received"]);

function describeError(error, what) {
  if (error instanceof ApiError && error.status === 403) {
    return `${what}: this daemon does not let the workspace key read it (${error.code}).`;
  }
  return `${what} failed: ${error.message}`;
}

export class ConversationsView {
  constructor(api) {
    this.api = api;
    this.channels = [];
    this.channelLimit = CHANNEL_PAGE;
    this.conversations = [];
    this.moreConversations = false;
    this.selected = null; // {kind: "channel"|"dm", id, name}
    this.messages = new Map(); // id -> {message, node}
    this.unread = new Map(); // channel name -> count of live messages not seen
    this.loaded = false;
    this.refreshTimer = null;
    $("channel-filter").addEventListener("input", () => {
      this.channelLimit = CHANNEL_PAGE;
      this.renderChannels();
    });
    $("show-archived").addEventListener("change", () => this.renderChannels());
    $("dms-more").addEventListener("click", () => this.loadConversations(true));
    $("channels-more").addEventListener("click", () => {
      this.channelLimit += CHANNEL_PAGE;
      this.renderChannels();
    });
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const query = $("search-input").value.trim();
      if (query) this.search(query);
    });
  }

  show() {
    if (!this.loaded) {
      this.loaded = true;
      this.reload();
    }
  }

  stop() {
    clearTimeout(this.refreshTimer);
  }

  async reload() {
    await Promise.all([this.loadChannels(), this.loadConversations()]);
    if (this.selected) this.open(this.selected);
    else if (this.channels.length) {
      const first = this.channels.find((c) => !c.is_archived) || this.channels[0];
      this.open({ kind: "channel", id: first.name, name: first.name });
    } else {
      this.showEmpty("No channels yet.");
    }
  }

  // -- the sidebar ------------------------------------------------------------------------

  async loadChannels() {
    try {
      this.channels = await this.api.get("/v1/channels", { include_archived: "true" });
    } catch (error) {
      this.channels = [];
      this.notice(describeError(error, "Listing channels"));
    }
    this.channels.sort((a, b) => a.name.localeCompare(b.name));
    this.renderChannels();
  }

  renderChannels() {
    const list = clear($("channel-list"));
    const filter = $("channel-filter").value.trim().toLowerCase();
    const archived = $("show-archived").checked;
    const shown = this.channels.filter((c) => (archived || !c.is_archived)
      && (!filter || c.name.toLowerCase().includes(filter)));
    for (const channel of shown.slice(0, this.channelLimit)) {
      const current = this.selected?.kind === "channel" && this.selected.id === channel.name;
      const unread = this.unread.get(channel.name) || 0;
      list.append(el("li", {},
        el("button", {
          type: "button", class: "pick", "data-channel": channel.name,
          "aria-current": current ? "true" : null,
          onclick: () => this.open({ kind: "channel", id: channel.name, name: channel.name }),
        },
        el("span", { class: "pick-name", text: `#${channel.name}` }),
        channel.is_archived ? el("span", { class: "tag", text: "archived" }) : null,
        unread ? el("span", { class: "badge", text: String(unread),
          "aria-label": `${unread} new` }) : null)));
    }
    const more = $("channels-more");
    more.hidden = shown.length <= this.channelLimit;
    more.textContent = `Show more (${shown.length - this.channelLimit} left)`;
  }

  async loadConversations(more = false) {
    const note = $("dm-note");
    // Most recent activity first; the next page starts below the last one's activity.
    const last = more ? this.conversations[this.conversations.length - 1] : null;
    const before = last ? (last.last_message?.id || last.id) : null;
    try {
      const page = await this.api.get("/v1/dm/conversations", { limit: DM_PAGE, before });
      this.conversations = more ? this.conversations.concat(page) : page;
      this.moreConversations = page.length === DM_PAGE;
      note.hidden = true;
    } catch (error) {
      if (!more) this.conversations = [];
      note.hidden = false;
      note.textContent = describeError(error, "Direct messages");
    }
    this.renderConversations();
  }

  renderConversations() {
    const list = clear($("dm-list"));
    for (const conversation of this.conversations) {
      const label = conversationLabel(conversation);
      const current = this.selected?.kind === "dm" && this.selected.id === conversation.id;
      list.append(el("li", {},
        el("button", {
          type: "button", class: "pick", "data-conversation": conversation.id,
          "aria-current": current ? "true" : null,
          onclick: () => this.open({ kind: "dm", id: conversation.id, name: label }),
        },
        el("span", { class: "pick-name", text: label }),
        el("span", { class: "tag", text: conversation.type === "group" ? "group" : "DM" }))));
    }
    if (!this.conversations.length && $("dm-note").hidden) {
      list.append(el("li", { class: "muted", text: "None yet." }));
    }
    $("dms-more").hidden = !this.moreConversations;
  }

  scheduleSidebarRefresh() {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => {
      this.loadChannels();
      this.loadConversations();
    }, 300);
  }

  // -- the pane -----------------------------------------------------------------------------

  notice(text) {
    const node = $("notice");
    node.textContent = text;
    node.hidden = !text;
  }

  showEmpty(text) {
    clear($("pane-header"));
    clear($("pane-body")).append(el("p", { class: "muted", text }));
  }

  async open(target) {
    this.selected = target;
    this.messages.clear();
    if (target.kind === "channel") this.unread.delete(target.id);
    this.renderChannels();
    this.renderConversations();
    const header = clear($("pane-header"));
    const body = clear($("pane-body"));
    const list = el("ol", { class: "messages", "aria-label": "Messages" });
    const older = el("button", { type: "button", class: "quiet older", text: "Load older",
      onclick: () => this.loadOlder() });
    body.append(older, list);
    this.list = list;
    this.olderButton = older;
    if (target.kind === "channel") this.renderChannelHeader(header, target.id);
    else header.append(el("h2", { text: target.name }));
    await this.loadPage(null);
    body.scrollTop = body.scrollHeight;
  }

  renderChannelHeader(header, name) {
    const channel = this.channels.find((c) => c.name === name);
    header.append(el("h2", { text: `#${name}` }));
    if (!channel) return;
    if (channel.is_archived) header.append(el("span", { class: "tag", text: "archived" }));
    header.append(el("p", { class: "topic", text: channel.topic || "No topic." }));
    const members = el("details", { class: "members" },
      el("summary", { text: `${channel.member_count} members` }));
    const memberList = el("ul", { class: "member-list" });
    members.append(memberList);
    members.addEventListener("toggle", async () => {
      if (!members.open || memberList.childElementCount) return;
      try {
        const rows = await this.api.get(`/v1/channels/${seg(name)}/members`);
        for (const member of rows) {
          memberList.append(el("li", {}, member.agent_name,
            member.role !== "member" ? el("span", { class: "tag", text: member.role }) : null,
            member.is_muted ? el("span", { class: "tag", text: "muted" }) : null));
        }
      } catch (error) {
        memberList.append(el("li", { class: "error", text: describeError(error, "Members") }));
      }
    });
    header.append(members);
  }

  historyPath() {
    const target = this.selected;
    return target.kind === "channel"
      ? `/v1/channels/${seg(target.id)}/messages`
      : `/v1/dm/${seg(target.id)}/messages`;
  }

  async loadPage(before) {
    const list = this.list; // the pane this page is for (another may replace it meanwhile)
    let page;
    try {
      page = await this.api.get(this.historyPath(), { limit: HISTORY_PAGE, before });
    } catch (error) {
      if (list !== this.list) return;
      list.append(el("li", { class: "error", text: describeError(error, "History") }));
      this.olderButton.hidden = true;
      return;
    }
    if (list !== this.list) return;
    // A page comes newest first; the pane shows oldest at the top. A message that
    // arrived live while the page was on its way is already shown.
    const nodes = page.slice().reverse().filter((message) => !this.messages.has(message.id))
      .map((message) => this.messageNode(message));
    list.prepend(...nodes);
    this.olderButton.hidden = page.length < HISTORY_PAGE;
    if (!list.childElementCount) {
      list.append(el("li", { class: "muted empty", text: "No messages yet." }));
    }
  }

  async loadOlder() {
    const first = this.list.querySelector("li.message");
    const body = $("pane-body");
    const before = body.scrollHeight - body.scrollTop;
    await this.loadPage(first ? first.dataset.id : null);
    body.scrollTop = body.scrollHeight - before; // keep the reader's place
  }

  appendLive(message) {
    if (!this.list) return;
    // One short line for screen readers, not the whole list read again.
    $("announce").textContent = `New message from ${message.agent_name || "someone"}`;
    this.list.querySelector("li.empty")?.remove();
    const body = $("pane-body");
    const atBottom = body.scrollHeight - body.scrollTop - body.clientHeight < 40;
    this.list.append(this.messageNode(message));
    // Bounded: the oldest leave the pane (Load older brings them back).
    while (this.list.querySelectorAll(":scope > li.message").length > MAX_SHOWN) {
      const oldest = this.list.querySelector(":scope > li.message");
      this.messages.delete(oldest.dataset.id);
      oldest.remove();
      this.olderButton.hidden = false;
    }
    if (atBottom) body.scrollTop = body.scrollHeight;
  }

  // -- one message ----------------------------------------------------------------------

  messageNode(message, { inThread = false } = {}) {
    const node = el("li", { class: "message", "data-id": message.id });
    const head = el("div", { class: "meta" },
      el("span", { class: "author", text: message.agent_name || "(deleted agent)" }),
      el("time", { datetime: message.created_at || "", text: when(message.created_at) }));
    node.append(head, this.textNode(message.text || ""));
    if (message.attachments?.length) node.append(this.attachmentsNode(message.attachments));
    const reactions = el("div", { class: "reactions", "aria-label": "Reactions" });
    node.append(reactions);
    const entry = { message, node, reactions: message.reactions || [], reactionsNode: reactions };
    this.messages.set(message.id, entry);
    this.renderReactions(entry);
    if (!inThread) node.append(this.threadNode(message, entry));
    return node;
  }

  textNode(text) {
    const paragraph = el("p", { class: "text" });
    if (text.length <= FOLD_CHARS) {
      paragraph.textContent = text;
      return paragraph;
    }
    paragraph.textContent = `${text.slice(0, FOLD_CHARS)}…`;
    const toggle = el("button", {
      type: "button", class: "quiet fold", "aria-expanded": "false",
      text: `Show all (${text.length.toLocaleString()} characters)`,
    });
    toggle.addEventListener("click", () => {
      const open = toggle.getAttribute("aria-expanded") === "true";
      paragraph.textContent = open ? `${text.slice(0, FOLD_CHARS)}…` : text;
      toggle.setAttribute("aria-expanded", String(!open));
      toggle.textContent = open ? `Show all (${text.length.toLocaleString()} characters)`
        : "Show less";
    });
    return el("div", { class: "long" }, paragraph, toggle);
  }

  attachmentsNode(attachments) {
    const list = el("ul", { class: "attachments", "aria-label": "Attachments" });
    for (const file of attachments) {
      const link = el("a", { class: "attachment", "data-file": file.file_id, download: file.filename,
        rel: "noopener", text: file.filename });
      const size = file.size_bytes !== undefined ? ` (${bytes(file.size_bytes)})` : "";
      list.append(el("li", {}, link, size));
      // The download link is the file's signed URL, so the key never goes in a link.
      this.api.get(`/v1/files/${seg(file.file_id)}`).then((info) => {
        if (info.download_url) link.href = info.download_url;
        else link.after(el("span", { class: "muted", text: " (upload not complete)" }));
      }).catch((error) => {
        link.after(el("span", { class: "muted", text: ` (${error.code})` }));
      });
    }
    return list;
  }

  renderReactions(entry) {
    const node = clear(entry.reactionsNode);
    for (const group of entry.reactions) {
      if (!group.count) continue;
      node.append(el("span", {
        class: "reaction", title: group.agents.join(", "),
        "data-emoji": group.emoji,
        "aria-label": `${group.emoji} from ${group.agents.join(", ")}`,
      }, el("span", { class: "emoji", text: group.emoji }),
      el("span", { class: "count", text: String(group.count) })));
    }
  }

  threadNode(message, entry) {
    const box = el("div", { class: "thread" });
    const toggle = el("button", { type: "button", class: "quiet replies-toggle",
      "aria-expanded": "false" });
    const replies = el("ol", { class: "replies", "aria-label": "Replies", hidden: true });
    const more = el("button", { type: "button", class: "quiet", text: "More replies",
      hidden: true });
    entry.replyCount = message.reply_count || 0;
    entry.repliesNode = replies;
    entry.repliesToggle = toggle;
    entry.threadOpen = false;
    const label = () => {
      toggle.textContent = entry.replyCount === 1 ? "1 reply" : `${entry.replyCount} replies`;
      toggle.hidden = entry.replyCount === 0;
    };
    entry.relabel = label;
    label();
    const load = async (after) => {
      try {
        const thread = await this.api.get(`/v1/messages/${seg(message.id)}/replies`,
          { limit: THREAD_PAGE, after });
        for (const reply of thread.replies) {
          if (!this.messages.has(reply.id)) {
            replies.append(this.messageNode(reply, { inThread: true }));
          }
        }
        more.hidden = thread.replies.length < THREAD_PAGE;
      } catch (error) {
        replies.append(el("li", { class: "error", text: describeError(error, "Thread") }));
      }
    };
    toggle.addEventListener("click", async () => {
      entry.threadOpen = !entry.threadOpen;
      toggle.setAttribute("aria-expanded", String(entry.threadOpen));
      replies.hidden = !entry.threadOpen;
      if (entry.threadOpen && !replies.childElementCount) await load(null);
      if (!entry.threadOpen) more.hidden = true;
    });
    more.addEventListener("click", () => {
      const last = replies.querySelector(":scope > li.message:last-child");
      load(last ? last.dataset.id : null);
    });
    box.append(toggle, replies, more);
    return box;
  }

  // -- search ---------------------------------------------------------------------------

  async search(query) {
    this.selected = null;
    this.list = null;
    this.renderChannels();
    this.renderConversations();
    const header = clear($("pane-header"));
    header.append(el("h2", {}, "Search: ", el("q", { text: query })));
    const body = clear($("pane-body"));
    let results;
    try {
      results = await this.api.get("/v1/search", { q: query, limit: 50 });
    } catch (error) {
      body.append(el("p", { class: "error", text: describeError(error, "Search") }));
      return;
    }
    if (!results.length) {
      body.append(el("p", { class: "muted", text: "Nothing found." }));
      return;
    }
    const list = el("ol", { class: "messages results" });
    for (const result of results) {
      const where = result.channel_name ? `#${result.channel_name}` : "direct message";
      const open = result.channel_name
        ? () => this.open({ kind: "channel", id: result.channel_name, name: result.channel_name })
        : () => this.open({ kind: "dm", id: result.conversation_id, name: "direct message" });
      list.append(el("li", { class: "message result", "data-id": result.id },
        el("div", { class: "meta" },
          el("span", { class: "author", text: result.agent_name || "(deleted agent)" }),
          el("button", { type: "button", class: "quiet", text: where, onclick: open }),
          el("time", { datetime: result.created_at, text: when(result.created_at) })),
        this.textNode(result.text || "")));
    }
    body.append(list);
  }

  // -- live events ----------------------------------------------------------------------

  onEvent(event) {
    const type = event.type;
    if (MESSAGE_EVENTS.has(type)) this.onMessage(event);
    else if (type === "message.reacted") this.onReaction(event);
    else if (type.startsWith("channel.") || type.startsWith("member.")
      || type.startsWith("group_dm.")) {
      this.scheduleSidebarRefresh();
    }
  }

  onMessage(event) {
    const summary = event.message || {};
    const message = {
      id: summary.id || event.id, agent_name: summary.agent_name, text: summary.text,
      attachments: summary.attachments || [], created_at: new Date().toISOString(),
      reactions: [], reply_count: 0,
    };
    if (this.messages.has(message.id)) return;
    if (event.type === "thread.reply") {
      const parent = this.messages.get(event.parent_id);
      if (!parent) return;
      parent.replyCount += 1;
      parent.relabel();
      if (parent.threadOpen) {
        parent.repliesNode.append(this.messageNode(message, { inThread: true }));
      }
      return;
    }
    const target = this.selected;
    if (event.type === "message.created") {
      if (target?.kind === "channel" && target.id === event.channel) this.appendLive(message);
      else if (event.channel) {
        this.unread.set(event.channel, (this.unread.get(event.channel) || 0) + 1);
        this.renderChannels();
      }
      return;
    }
    if (target?.kind === "dm" && target.id === event.conversation_id) this.appendLive(message);
    if (!this.conversations.some((c) => c.id === event.conversation_id)) {
      this.scheduleSidebarRefresh();
    }
  }

  onReaction(event) {
    const entry = this.messages.get(event.message_id);
    if (!entry) return;
    let group = entry.reactions.find((g) => g.emoji === event.emoji);
    if (event.action === "removed") {
      if (!group) return;
      group.agents = group.agents.filter((name) => name !== event.agent_name);
      group.count = group.agents.length;
    } else {
      if (!group) {
        group = { emoji: event.emoji, count: 0, agents: [] };
        entry.reactions.push(group);
      }
      if (!group.agents.includes(event.agent_name)) {
        group.agents.push(event.agent_name);
        group.count = group.agents.length;
      }
    }
    this.renderReactions(entry);
  }
}

function conversationLabel(conversation) {
  if (conversation.name) return conversation.name;
  const names = (conversation.participants || []).map((p) => p.agent_name || p.name);
  return names.filter(Boolean).join(", ") || `conversation ${conversation.id}`;
}

