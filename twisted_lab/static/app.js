// netlab chat in the browser: the JSON protocol of docs/protocol.md over one
// WebSocket (/ws), one text message per JSON message.
//
// Rules this file keeps:
//  - text from the server is only ever put in the page with textContent
//    (never innerHTML): nobody's message is interpreted as HTML;
//  - the session token lives in localStorage, is sent only inside a
//    `resume` message, and never appears in a URL;
//  - each room's messages are kept by seq: a message already shown is never
//    shown twice, and after a reconnect (or a reload) the page asks `history`
//    with `after` = the last seq it holds without a hole, page by page, so
//    nothing said meanwhile is missed;
//  - a busy room costs the page little and bounded: each conversation keeps
//    its newest MAX_ENTRIES messages (the "older" button asks the server for
//    earlier ones again), at most MAX_PRIVATES private conversations are
//    kept, what arrives is put in the page once per animation frame (one
//    layout read per batch, not per message), and the saved state is
//    written at most once a second.
"use strict";

(() => {
  const STORAGE_KEY = "netlab-chat";
  const HISTORY_PAGE = 500;
  const OLDER_PAGE = 100;
  // Entries (messages and system lines) a conversation keeps: its newest,
  // while the reader is at the bottom; up to MAX_KEPT while scrolled up or
  // after "older" brought earlier ones back.
  const MAX_ENTRIES = 500;
  const MAX_KEPT = 2000;
  const MAX_PRIVATES = 50;
  const PERSIST_DELAY_MS = 1000;
  const PING_INTERVAL_MS = 45000;
  const PING_TIMEOUT_MS = 20000;
  const MAX_BACKOFF_MS = 30000;
  const ROOM_PATTERN = /^[a-z0-9_-]{1,32}$/;

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function asText(value) {
    return typeof value === "string" ? value : "";
  }

  // -- saved state (localStorage): token, user, rooms and the last seq seen --

  function loadSaved() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}");
      if (saved && typeof saved === "object") {
        if (!saved.rooms || typeof saved.rooms !== "object") saved.rooms = {};
        return saved;
      }
    } catch (e) {
      // A damaged entry is dropped below.
    }
    return { rooms: {} };
  }

  const saved = loadSaved();
  let persistTimer = null;

  function persist() {
    clearTimeout(persistTimer);
    persistTimer = null;
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(saved));
    } catch (e) {
      // Storage full or disabled: the page still works, without resuming.
    }
  }

  // For what changes with every message (the last seq of a room): written
  // once a second at most, and when the page goes away.
  function persistSoon() {
    if (persistTimer === null) persistTimer = setTimeout(persist, PERSIST_DELAY_MS);
  }

  function forgetSession() {
    delete saved.token;
    delete saved.user;
    delete saved.current;
    saved.rooms = {};
    persist();
  }

  // -- elements ---------------------------------------------------------------

  const ui = {
    status: $("status"),
    retry: $("retry-button"),
    notices: $("notices"),
    whoami: $("whoami"),
    logout: $("logout-button"),
    drawerButton: $("drawer-button"),
    loginView: $("login-view"),
    loginForm: $("login-form"),
    loginUser: $("login-username"),
    loginPassword: $("login-password"),
    loginError: $("login-error"),
    loginButton: $("login-button"),
    registerButton: $("register-button"),
    chatView: $("chat-view"),
    sidebar: $("sidebar"),
    joinForm: $("join-form"),
    roomInput: $("room-input"),
    roomList: $("room-list"),
    privateList: $("private-list"),
    privateForm: $("private-form"),
    privateInput: $("private-input"),
    directory: $("directory"),
    roomsRefresh: $("rooms-refresh"),
    title: $("conversation-title"),
    membersButton: $("members-button"),
    leaveButton: $("leave-button"),
    older: $("older-button"),
    messages: $("messages"),
    emptyHint: $("empty-hint"),
    composer: $("composer"),
    composerInput: $("composer-input"),
    sendButton: $("send-button"),
    membersPanel: $("members-panel"),
    members: $("members"),
  };

  // -- notices -------------------------------------------------------------------

  const EXPLAIN = {
    rate_limited: (m) =>
      `You are sending too fast. Try again in ${Number(m.retry_after) || 1} s.`,
    slow_consumer: () =>
      "The server disconnected this page because it was not reading fast enough " +
      "(slow consumer). Reconnecting…",
    idle_timeout: () => "The server closed the idle connection. Reconnecting…",
    server_shutdown: () => "The server is restarting. Reconnecting…",
    too_many_connections: () => "The server has too many connections. Retrying…",
    frame_too_long: () => "That message is too large for the server.",
    frame_timeout: () => "The connection was too slow. Reconnecting…",
    session_revoked: () => "Your session was ended (logged out elsewhere or the password changed). Log in again.",
    session_expired: () => "Your session expired. Log in again.",
    not_authenticated: () => "Not logged in.",
    internal_error: () => "The server failed to handle that. Try again.",
    no_such_user: (m) => asText(m.message) || "That user is not online.",
  };

  function explain(message) {
    const code = asText(message.code);
    const known = EXPLAIN[code];
    return known ? known(message) : asText(message.message) || code || "error";
  }

  function notice(text, options = {}) {
    const kind = options.kind || "error";
    const key = options.key || text;
    for (const old of ui.notices.querySelectorAll(".notice")) {
      if (old.dataset.key === key) old.remove();
    }
    const item = el("p", `notice ${kind}`);
    item.dataset.key = key;
    if (options.code) item.dataset.code = options.code;
    item.append(el("span", "notice-text", text));
    if (options.code) item.append(el("span", "code", options.code));
    const close = el("button", "link-button", "dismiss");
    close.type = "button";
    close.addEventListener("click", () => item.remove());
    item.append(close);
    ui.notices.append(item);
    while (ui.notices.children.length > 4) ui.notices.firstElementChild.remove();
    const timeout = options.timeout === undefined ? 15000 : options.timeout;
    if (timeout) setTimeout(() => item.remove(), timeout);
    return item;
  }

  function errorNotice(message) {
    const code = asText(message.code);
    const timeout =
      code === "rate_limited" ? (Number(message.retry_after) || 1) * 1000 + 2000 : 15000;
    notice(explain(message), { code, key: code || undefined, timeout });
  }

  function clearNotices(key) {
    for (const old of ui.notices.querySelectorAll(".notice")) {
      if (!key || old.dataset.key === key) old.remove();
    }
  }

  // -- the connection ---------------------------------------------------------

  let socket = null;
  let nextId = 1;
  const pending = new Map(); // id -> {message, onReply, onError}
  let inSession = false;
  let attempts = 0;
  let reconnectTimer = null;
  let reconnectAt = 0;
  let countdownTimer = null;
  let pingTimer = null;
  let pingDeadline = null;
  let closingError = null;
  let stopped = false;

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws`;
  }

  function setStatus(kind, text) {
    ui.status.className = `status status-${kind}`;
    ui.status.textContent = text;
    ui.status.dataset.state = kind;
    ui.retry.hidden = kind !== "offline" || stopped;
    updateComposer();
  }

  function connect() {
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    reconnectTimer = null;
    if (socket) return;
    closingError = null;
    setStatus("connecting", "connecting…");
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch (e) {
      scheduleReconnect();
      return;
    }
    socket = ws;
    ws.addEventListener("open", () => {
      if (socket !== ws) return;
      setStatus("connecting", "connected");
      startPinging();
      if (saved.token) {
        resume();
      } else {
        showLogin();
        setStatus("online", "connected");
      }
    });
    ws.addEventListener("message", (event) => {
      if (socket !== ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      if (message && typeof message === "object") received(message);
    });
    ws.addEventListener("close", (event) => {
      if (socket !== ws) return;
      lost(event);
    });
  }

  function lost(event) {
    socket = null;
    inSession = false;
    stopPinging();
    for (const request of pending.values()) {
      if (request.onLost) request.onLost();
    }
    pending.clear();
    for (const room of rooms.values()) room.joined = false;
    if (closingError) {
      const code = asText(closingError.code);
      if (code !== "session_revoked" && code !== "session_expired") {
        errorNotice(closingError);
      }
    } else if (event && event.code === 1009) {
      notice("The server closed the connection: a message was too large.", { code: "1009" });
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (stopped) {
      setStatus("offline", "offline");
      return;
    }
    // Exponential back-off with jitter, so a restarted server is not met by
    // every page at once.
    const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempts);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    attempts += 1;
    reconnectAt = Date.now() + delay;
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, delay);
    const tick = () => {
      const left = Math.max(0, Math.ceil((reconnectAt - Date.now()) / 1000));
      setStatus("offline", `offline · reconnecting in ${left} s`);
    };
    tick();
    clearInterval(countdownTimer);
    countdownTimer = setInterval(tick, 1000);
  }

  function reconnectNow() {
    attempts = 0;
    if (!socket) connect();
  }

  function send(message) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(JSON.stringify(message));
    return true;
  }

  // Send a request with an id; its reply (or error) goes to the callbacks.
  // Replies come in request order, so a reply to a later request settles
  // the earlier ones that have no reply of their own (a successful `say`).
  function request(message, callbacks = {}) {
    const id = nextId++;
    const entry = { message: { ...message, id }, ...callbacks };
    if (!send(entry.message)) {
      if (callbacks.onLost) callbacks.onLost();
      return null;
    }
    pending.set(id, entry);
    return id;
  }

  function settleBefore(id) {
    for (const [other, entry] of pending) {
      if (other >= id) break;
      pending.delete(other);
      if (entry.onDone) entry.onDone();
    }
  }

  function received(message) {
    const type = message.type;
    const id = message.id;
    if (id !== undefined && pending.has(id)) {
      settleBefore(id);
      const entry = pending.get(id);
      pending.delete(id);
      if (type === "error") {
        if (entry.onError) entry.onError(message);
        else errorNotice(message);
      } else if (entry.onReply) {
        entry.onReply(message);
      }
      return;
    }
    switch (type) {
      case "message":
        roomMessage(message, true);
        break;
      case "presence":
        presence(message);
        break;
      case "private":
        privateReceived(message);
        break;
      case "error":
        unpromptedError(message);
        break;
      default:
        break;
    }
  }

  function unpromptedError(message) {
    const code = asText(message.code);
    if (code === "session_revoked" || code === "session_expired") {
      sessionEnded(explain(message), code);
      return;
    }
    if (
      code === "slow_consumer" ||
      code === "idle_timeout" ||
      code === "server_shutdown" ||
      code === "too_many_connections" ||
      code === "frame_timeout" ||
      code === "frame_too_long"
    ) {
      // The server closes the connection next: said once it is gone.
      closingError = message;
      return;
    }
    errorNotice(message);
  }

  // -- keepalive -------------------------------------------------------------------

  function startPinging() {
    stopPinging();
    pingTimer = setInterval(ping, PING_INTERVAL_MS);
  }

  function stopPinging() {
    clearInterval(pingTimer);
    clearTimeout(pingDeadline);
    pingTimer = null;
    pingDeadline = null;
  }

  function ping() {
    if (pingDeadline) return;
    const ws = socket;
    const answered = () => {
      clearTimeout(pingDeadline);
      pingDeadline = null;
    };
    pingDeadline = setTimeout(() => {
      pingDeadline = null;
      // No pong: the connection died silently. Start again.
      if (ws && socket === ws) ws.close();
    }, PING_TIMEOUT_MS);
    request({ type: "ping" }, { onReply: answered, onError: answered, onLost: answered });
  }

  // -- session -----------------------------------------------------------------------

  function resume() {
    setStatus("connecting", "resuming session…");
    request(
      { type: "resume", token: saved.token },
      {
        onReply: (reply) => sessionStarted(reply),
        onError: (error) => {
          if (error.code === "rate_limited") {
            setTimeout(() => socket && resume(), (Number(error.retry_after) || 1) * 1000);
            return;
          }
          sessionEnded(
            error.code === "invalid_token"
              ? "Your session has ended. Log in again."
              : explain(error),
            error.code
          );
        },
      }
    );
  }

  function sessionStarted(session) {
    const username = asText(session.username);
    if (saved.user !== username) {
      saved.rooms = {};
      delete saved.current;
    }
    saved.user = username;
    if (typeof session.token === "string") saved.token = session.token;
    persist();
    inSession = true;
    attempts = 0;
    clearNotices("login");
    for (const key of ["server_shutdown", "idle_timeout", "slow_consumer", "too_many_connections"]) {
      clearNotices(key);
    }
    setStatus("online", "online");
    ui.whoami.textContent = username;
    ui.whoami.hidden = false;
    ui.logout.hidden = false;
    ui.drawerButton.hidden = false;
    ui.loginView.hidden = true;
    ui.chatView.hidden = false;
    ui.loginPassword.value = "";
    ui.loginError.textContent = "";
    const names = new Set([...rooms.keys(), ...Object.keys(saved.rooms)]);
    for (const name of names) {
      const room = roomFor(name);
      if (room.wanted) joinRoom(name, false);
    }
    if (!current && saved.current) {
      const [kind, name] = saved.current;
      if (kind === "room" && rooms.has(name)) select("room", name);
      if (kind === "private") select("private", name);
    }
    refreshDirectory();
    render();
  }

  function sessionEnded(text, code) {
    inSession = false;
    forgetSession();
    resetConversations();
    notice(text, { code, key: "login", timeout: 0 });
    if (socket) {
      showLogin();
      setStatus("online", "connected");
    }
  }

  function showLogin() {
    ui.loginView.hidden = false;
    ui.chatView.hidden = true;
    ui.whoami.hidden = true;
    ui.logout.hidden = true;
    ui.drawerButton.hidden = true;
    ui.loginUser.value = ui.loginUser.value || saved.lastUser || "";
    if (!ui.loginUser.value) ui.loginUser.focus();
  }

  function credentials() {
    return { username: ui.loginUser.value.trim(), password: ui.loginPassword.value };
  }

  function loginBusy(busy) {
    ui.loginButton.disabled = busy;
    ui.registerButton.disabled = busy;
  }

  // One request of the login form (login or register): the buttons wait
  // for its answer, and an error is said under the form.
  function credentialRequest(message, onReply) {
    loginBusy(true);
    ui.loginError.textContent = "";
    const sent = request(message, {
      onReply: (reply) => {
        loginBusy(false);
        onReply(reply);
      },
      onError: (error) => {
        loginBusy(false);
        ui.loginError.textContent = explain(error);
      },
      onLost: () => loginBusy(false),
    });
    if (sent === null) {
      loginBusy(false);
      ui.loginError.textContent = "Not connected to the server yet.";
    }
  }

  function login() {
    const { username, password } = credentials();
    if (!username || !password) {
      ui.loginError.textContent = "Enter a username and a password.";
      return;
    }
    credentialRequest({ type: "login", username, password }, (session) => {
      saved.lastUser = asText(session.username);
      sessionStarted(session);
    });
  }

  function register() {
    const { username, password } = credentials();
    if (!username || !password) {
      ui.loginError.textContent = "Choose a username and a password (at least 8 characters).";
      return;
    }
    credentialRequest({ type: "register", username, password }, () => login());
  }

  function logout() {
    request({ type: "logout" });
    inSession = false;
    forgetSession();
    resetConversations();
    showLogin();
    setStatus("online", "connected");
  }

  // -- rooms ---------------------------------------------------------------------------

  const rooms = new Map(); // name -> room
  const privates = new Map(); // username -> conversation
  let activity = 0; // orders private conversations by their last message
  let current = null; // {kind, name}

  function roomFor(name) {
    let room = rooms.get(name);
    if (!room) {
      const stored = saved.rooms[name];
      room = {
        kind: "room",
        name,
        entries: [], // {seq?, from, text, ts, system?, el?}
        seqs: new Set(),
        // The last seq held with no hole before it (back to where this
        // page started the room); null until the first join.
        last: typeof stored === "number" ? stored : null,
        lowest: null,
        limit: MAX_ENTRIES,
        members: new Set(),
        moreMembers: false,
        joined: false,
        wanted: name in saved.rooms,
        unread: 0,
        catchingUp: false,
      };
      rooms.set(name, room);
    }
    return room;
  }

  function saveLast(room) {
    if (room.wanted && room.last !== null) {
      saved.rooms[room.name] = room.last;
      persistSoon();
    }
  }

  function retryLater(error, again) {
    if (error.code === "rate_limited") {
      setTimeout(() => inSession && again(), (Number(error.retry_after) || 1) * 1000);
      return true;
    }
    return false;
  }

  function joinRoom(name, switchTo) {
    const room = roomFor(name);
    room.wanted = true;
    if (!(name in saved.rooms)) {
      saved.rooms[name] = room.last;
      persist();
    }
    if (switchTo) select("room", name);
    request(
      { type: "join", room: name },
      {
        onReply: (joined) => roomJoined(room, joined),
        onError: (error) => {
          if (retryLater(error, () => joinRoom(name, false))) return;
          errorNotice(error);
          if (error.code === "invalid_room" || error.code === "too_many_rooms") {
            forgetRoom(room);
          }
        },
      }
    );
    renderNav();
  }

  function roomJoined(room, joined) {
    room.joined = true;
    room.members = new Set(Array.isArray(joined.members) ? joined.members.map(asText) : []);
    room.moreMembers = Boolean(joined.more_members);
    const history = Array.isArray(joined.history) ? joined.history : [];
    const lastSeq = Number.isInteger(joined.last_seq) ? joined.last_seq : 0;
    if (room.last !== null && room.last > lastSeq) {
      // The server's history is shorter than what this page saw (a new
      // database): start the room again from what the server has.
      room.entries = [];
      room.seqs = new Set();
      room.lowest = null;
      room.last = null;
      room.limit = MAX_ENTRIES;
      if (isCurrent(room)) render();
    }
    if (room.last === null) {
      // Nothing seen here before: start from the history the join brought.
      room.last = history.length && Number.isInteger(history[0].seq) ? history[0].seq - 1 : lastSeq;
    }
    for (const message of history) roomMessage({ ...message, room: room.name }, false);
    saveLast(room);
    if (room.last < lastSeq) catchUp(room);
    if (current && current.kind === "room" && current.name === room.name) renderMembers();
    renderNav();
    updateComposer();
    scheduleDirectory();
  }

  // Ask for everything after the last seq held without a hole, page by page.
  function catchUp(room) {
    if (room.catchingUp) return;
    room.catchingUp = true;
    const after = room.last;
    request(
      { type: "history", room: room.name, after, limit: HISTORY_PAGE },
      {
        onReply: (reply) => {
          room.catchingUp = false;
          const messages = Array.isArray(reply.messages) ? reply.messages : [];
          for (const message of messages) roomMessage({ ...message, room: room.name }, false);
          saveLast(room);
          if ((reply.more || messages.length >= HISTORY_PAGE) && room.last > after) catchUp(room);
        },
        onError: (error) => {
          room.catchingUp = false;
          if (!retryLater(error, () => catchUp(room))) errorNotice(error);
        },
        onLost: () => {
          room.catchingUp = false;
        },
      }
    );
  }

  function loadOlder(room) {
    if (room.lowest === null || room.lowest <= 1) return;
    const after = Math.max(0, room.lowest - 1 - OLDER_PAGE);
    request(
      { type: "history", room: room.name, after, limit: Math.min(OLDER_PAGE, room.lowest - 1) },
      {
        onReply: (reply) => {
          const messages = Array.isArray(reply.messages) ? reply.messages : [];
          for (const message of messages) roomMessage({ ...message, room: room.name }, false);
          // Kept, though over the usual number, until another room is shown.
          room.limit = Math.min(MAX_KEPT, Math.max(room.limit, room.entries.length));
          renderOlder();
        },
        onError: (error) => errorNotice(error),
      }
    );
  }

  function leaveRoom(room) {
    request(
      { type: "leave", room: room.name },
      { onReply: scheduleDirectory, onError: (error) => errorNotice(error) }
    );
    forgetRoom(room);
  }

  function forgetRoom(room) {
    room.wanted = false;
    delete saved.rooms[room.name];
    persist();
    rooms.delete(room.name);
    if (current && current.kind === "room" && current.name === room.name) {
      current = null;
      const next = rooms.keys().next();
      if (!next.done) select("room", next.value);
    }
    render();
  }

  // A room message: kept in seq order, each seq once.
  function roomMessage(message, live) {
    const name = asText(message.room);
    const seq = message.seq;
    if (!Number.isInteger(seq) || !rooms.has(name)) return;
    const room = rooms.get(name);
    if (room.seqs.has(seq)) return;
    room.seqs.add(seq);
    if (room.last === null) room.last = seq - 1;
    while (room.seqs.has(room.last + 1)) room.last += 1;
    if (room.lowest === null || seq < room.lowest) room.lowest = seq;
    const entry = { seq, from: asText(message.from), text: asText(message.text), ts: asText(message.ts) };
    insertEntry(room, entry);
    if (live) saveLast(room);
    const shown = current && current.kind === "room" && current.name === name;
    if (!shown && live && entry.from !== saved.user) {
      room.unread += 1;
      renderNavSoon();
    }
  }

  // Into the conversation's entries, in seq order; into the page at the
  // next animation frame (showSoon), with the others that arrive meanwhile.
  function insertEntry(conversation, entry) {
    const entries = conversation.entries;
    let position = entries.length;
    if (entry.seq !== undefined) {
      for (let i = entries.length - 1; i >= 0; i -= 1) {
        const other = entries[i];
        if (other.seq === undefined) continue;
        if (other.seq > entry.seq) position = i;
        else break;
      }
    }
    entries.splice(position, 0, entry);
    if (isCurrent(conversation)) {
      if (!entry.system && entry.from === saved.user) followMine = true;
      trim(conversation, MAX_KEPT);
      showSoon();
    } else {
      trim(conversation, MAX_ENTRIES);
    }
  }

  // Drop the oldest entries past `limit` (their elements too). A room
  // forgets their seqs, so "older" can bring them back, and shows the
  // button for it.
  function trim(conversation, limit) {
    const entries = conversation.entries;
    const excess = entries.length - limit;
    if (excess <= 0) return;
    const removed = entries.splice(0, excess);
    let highest = null;
    for (const entry of removed) {
      if (entry.el) {
        entry.el.remove();
        entry.el = null;
      }
      if (entry.seq === undefined || conversation.kind !== "room") continue;
      highest = entry.seq;
      // (A seq past a hole still being caught up is remembered: it was
      // seen, and `last` must be able to pass it.)
      if (entry.seq <= conversation.last) conversation.seqs.delete(entry.seq);
    }
    if (conversation.kind === "room") {
      const first = entries.find((entry) => entry.seq !== undefined);
      if (first) conversation.lowest = first.seq;
      else if (highest !== null) conversation.lowest = highest + 1;
    }
  }

  // -- putting what arrived in the page, once per frame ----------------------

  let frameRequested = false;
  let messagesDirty = false;
  let navDirty = false;
  let membersDirty = false;
  let followMine = false;

  function scheduleFrame() {
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(flush);
  }

  function showSoon() {
    messagesDirty = true;
    scheduleFrame();
  }

  function renderNavSoon() {
    navDirty = true;
    scheduleFrame();
  }

  function renderMembersSoon() {
    membersDirty = true;
    scheduleFrame();
  }

  function flush() {
    frameRequested = false;
    if (navDirty) {
      navDirty = false;
      renderNav();
    }
    if (membersDirty) {
      membersDirty = false;
      renderMembers();
    }
    if (!messagesDirty) return;
    messagesDirty = false;
    const conversation = currentConversation();
    if (!conversation) return;
    // One layout read for the whole batch, before it changes the page.
    const stick = followMine || nearBottom();
    followMine = false;
    trim(conversation, stick ? conversation.limit || MAX_ENTRIES : MAX_KEPT);
    syncMessages(conversation);
    renderOlder();
    if (stick) scrollToBottom();
  }

  // Make the list the conversation's entries: the page holds a subsequence
  // of them in order (trimmed ones are removed as they go), so one walk
  // puts each new element before the first one after it.
  function syncMessages(conversation) {
    const box = ui.messages;
    let node = box.firstElementChild;
    for (const entry of conversation.entries) {
      const item = entryElement(entry);
      if (item === node) node = node.nextElementSibling;
      else box.insertBefore(item, node);
    }
    while (node) {
      const next = node.nextElementSibling;
      node.remove();
      node = next;
    }
    ui.emptyHint.hidden = conversation.entries.length > 0;
  }

  function systemLine(conversation, text) {
    insertEntry(conversation, { system: true, text });
  }

  function presence(message) {
    const name = asText(message.room);
    const user = asText(message.user);
    if (!rooms.has(name) || !user) return;
    const room = rooms.get(name);
    if (message.event === "join") {
      room.members.add(user);
      systemLine(room, `${user} joined`);
    } else if (message.event === "leave") {
      room.members.delete(user);
      systemLine(room, `${user} left`);
    }
    if (isCurrent(room)) renderMembersSoon();
  }

  let directoryTimer = null;

  // The directory is asked again a little after joins and leaves (one
  // request for a burst of them: `rooms` has a low rate).
  function scheduleDirectory() {
    clearTimeout(directoryTimer);
    directoryTimer = setTimeout(() => inSession && refreshDirectory(), 1500);
  }

  function refreshDirectory() {
    clearTimeout(directoryTimer);
    request(
      { type: "rooms" },
      {
        onReply: (reply) => renderDirectory(Array.isArray(reply.rooms) ? reply.rooms : [], reply.more),
        onError: (error) => {
          if (error.code !== "rate_limited") errorNotice(error);
        },
      }
    );
  }

  // -- private messages ------------------------------------------------------------

  function privateFor(name) {
    let conversation = privates.get(name);
    if (!conversation) {
      conversation = { kind: "private", name, entries: [], unread: 0, limit: MAX_ENTRIES };
      conversation.active = ++activity;
      privates.set(name, conversation);
      // Any user can open one: past MAX_PRIVATES the least recently active
      // is forgotten (never the one shown).
      if (privates.size > MAX_PRIVATES) {
        let oldest = null;
        for (const other of privates.values()) {
          if (other === conversation || isCurrent(other)) continue;
          if (!oldest || other.active < oldest.active) oldest = other;
        }
        if (oldest) privates.delete(oldest.name);
      }
      renderNavSoon();
    }
    return conversation;
  }

  function privateReceived(message) {
    const from = asText(message.from);
    if (!from) return;
    const conversation = privateFor(from);
    conversation.active = ++activity;
    insertEntry(conversation, { from, text: asText(message.text), ts: asText(message.ts) });
    if (!isCurrent(conversation)) {
      conversation.unread += 1;
      renderNavSoon();
    }
  }

  // -- saying things -----------------------------------------------------------------

  function say() {
    const text = ui.composerInput.value;
    if (!current || !text.trim() || !inSession) return;
    const target = current;
    const restore = (error) => {
      if (!ui.composerInput.value) ui.composerInput.value = text;
      errorNotice(error);
    };
    let sent;
    if (target.kind === "room") {
      sent = request(
        { type: "say", room: target.name, text },
        {
          onError: (error) => {
            restore(error);
            if (error.code === "not_in_room") joinRoom(target.name, false);
          },
        }
      );
    } else {
      sent = request(
        { type: "msg", to: target.name, text },
        {
          onReply: (reply) => {
            const to = asText(reply.to) || target.name;
            if (to !== saved.user) {
              insertEntry(privateFor(target.name), {
                from: saved.user,
                text,
                ts: new Date().toISOString(),
              });
            }
          },
          onError: (error) => {
            restore(error);
            if (error.code === "no_such_user") {
              systemLine(privateFor(target.name), `${target.name} is not online`);
            }
          },
        }
      );
    }
    if (sent !== null) {
      ui.composerInput.value = "";
      fitComposer();
    }
  }

  // -- rendering ---------------------------------------------------------------------

  function isCurrent(conversation) {
    return Boolean(current && current.kind === conversation.kind && current.name === conversation.name);
  }

  function currentConversation() {
    if (!current) return null;
    return current.kind === "room" ? rooms.get(current.name) || null : privates.get(current.name) || null;
  }

  function select(kind, name) {
    current = { kind, name };
    saved.current = [kind, name];
    persist();
    const conversation = kind === "room" ? roomFor(name) : privateFor(name);
    conversation.unread = 0;
    if (kind === "private") conversation.active = ++activity;
    conversation.limit = MAX_ENTRIES;
    trim(conversation, MAX_ENTRIES);
    closeDrawer();
    render();
    scrollToBottom();
  }

  function timeOf(ts) {
    const date = new Date(ts);
    if (Number.isNaN(date.getTime())) return "";
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function entryElement(entry) {
    if (entry.el) return entry.el;
    const item = el("li", entry.system ? "message system" : "message");
    if (entry.system) {
      item.textContent = entry.text;
    } else {
      if (entry.seq !== undefined) item.dataset.seq = String(entry.seq);
      if (entry.from === saved.user) item.classList.add("mine");
      const meta = el("time", "meta", timeOf(entry.ts));
      if (entry.ts) meta.dateTime = entry.ts;
      item.append(meta, el("span", "from", entry.from), el("span", "text", entry.text));
    }
    entry.el = item;
    return item;
  }

  function nearBottom() {
    const box = ui.messages;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function navButton(label, selected, extra) {
    const item = el("li");
    const button = el("button", selected ? "current" : "");
    button.type = "button";
    button.append(el("span", "name", label));
    if (extra) button.append(extra);
    item.append(button);
    return { item, button };
  }

  function renderNav() {
    ui.roomList.replaceChildren();
    for (const room of rooms.values()) {
      if (!room.wanted) continue;
      const badge = room.unread ? el("span", "badge", room.unread) : null;
      const { item, button } = navButton(`#${room.name}`, isCurrent(room), badge);
      button.dataset.room = room.name;
      if (!room.joined) button.title = "joining…";
      button.addEventListener("click", () => select("room", room.name));
      ui.roomList.append(item);
    }
    ui.privateList.replaceChildren();
    for (const conversation of privates.values()) {
      const badge = conversation.unread ? el("span", "badge", conversation.unread) : null;
      const { item, button } = navButton(`@${conversation.name}`, isCurrent(conversation), badge);
      button.dataset.user = conversation.name;
      button.addEventListener("click", () => select("private", conversation.name));
      ui.privateList.append(item);
    }
  }

  function renderDirectory(list, more) {
    ui.directory.replaceChildren();
    for (const info of list) {
      const name = asText(info && info.room);
      if (!name) continue;
      const count = el("span", "count", Number.isInteger(info.members) ? info.members : "");
      const { item, button } = navButton(`#${name}`, false, count);
      button.dataset.room = name;
      button.addEventListener("click", () => joinRoom(name, true));
      ui.directory.append(item);
    }
    if (more) ui.directory.append(el("li", "count", "…and more"));
    if (!ui.directory.children.length) ui.directory.append(el("li", "count", "no rooms yet"));
  }

  function renderMembers() {
    ui.members.replaceChildren();
    const conversation = currentConversation();
    if (!conversation || conversation.kind !== "room") return;
    for (const name of [...conversation.members].sort()) {
      const item = el("li", name === saved.user ? "me" : "", name);
      ui.members.append(item);
    }
    if (conversation.moreMembers) ui.members.append(el("li", "count", "…and more"));
  }

  function renderOlder() {
    const conversation = currentConversation();
    ui.older.hidden = !(conversation && conversation.kind === "room" && conversation.lowest > 1);
  }

  function render() {
    renderNav();
    const conversation = currentConversation();
    ui.messages.replaceChildren();
    if (!conversation) {
      ui.title.textContent = "No room";
      ui.emptyHint.hidden = false;
      ui.leaveButton.hidden = true;
      ui.membersButton.hidden = true;
      renderMembers();
      renderOlder();
      updateComposer();
      return;
    }
    ui.title.textContent = conversation.kind === "room" ? `#${conversation.name}` : `@${conversation.name}`;
    ui.leaveButton.hidden = conversation.kind !== "room";
    ui.membersButton.hidden = conversation.kind !== "room";
    ui.messages.replaceChildren(...conversation.entries.map(entryElement));
    ui.emptyHint.hidden = conversation.entries.length > 0;
    if (conversation.entries.length === 0) {
      ui.emptyHint.textContent =
        conversation.kind === "room" ? "No messages yet." : "Private messages are not kept by the server.";
    }
    renderMembers();
    renderOlder();
    updateComposer();
  }

  function resetConversations() {
    rooms.clear();
    privates.clear();
    current = null;
    render();
  }

  function updateComposer() {
    const conversation = currentConversation();
    const ready =
      inSession &&
      conversation !== null &&
      (conversation.kind === "private" || conversation.joined);
    ui.composerInput.disabled = !conversation;
    ui.sendButton.disabled = !ready;
    ui.composerInput.placeholder = !conversation
      ? "Join a room first"
      : ready
        ? conversation.kind === "room"
          ? `Message #${conversation.name}`
          : `Message @${conversation.name}`
        : "Offline: your message will wait here";
  }

  function fitComposer() {
    const lines = ui.composerInput.value.split("\n").length;
    ui.composerInput.rows = Math.min(5, Math.max(1, lines));
  }

  function closeDrawer() {
    ui.sidebar.classList.remove("open");
    ui.drawerButton.setAttribute("aria-expanded", "false");
  }

  // -- wiring ---------------------------------------------------------------------------

  ui.loginForm.addEventListener("submit", (event) => {
    event.preventDefault();
    login();
  });
  ui.registerButton.addEventListener("click", register);
  ui.logout.addEventListener("click", logout);
  ui.retry.addEventListener("click", reconnectNow);
  ui.joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.roomInput.value.trim().toLowerCase().replace(/^#/, "");
    if (!ROOM_PATTERN.test(name)) {
      notice("Room names are 1–32 characters of a-z, 0-9, _ and -.", { code: "invalid_room" });
      return;
    }
    ui.roomInput.value = "";
    joinRoom(name, true);
  });
  ui.privateForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.privateInput.value.trim().replace(/^@/, "");
    if (!name) return;
    ui.privateInput.value = "";
    select("private", name);
  });
  ui.roomsRefresh.addEventListener("click", refreshDirectory);
  ui.leaveButton.addEventListener("click", () => {
    const conversation = currentConversation();
    if (conversation && conversation.kind === "room") leaveRoom(conversation);
  });
  ui.older.addEventListener("click", () => {
    const conversation = currentConversation();
    if (conversation && conversation.kind === "room") loadOlder(conversation);
  });
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    say();
  });
  ui.composerInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      say();
    }
  });
  ui.composerInput.addEventListener("input", fitComposer);
  ui.drawerButton.addEventListener("click", () => {
    const open = ui.sidebar.classList.toggle("open");
    ui.drawerButton.setAttribute("aria-expanded", String(open));
  });
  ui.membersButton.addEventListener("click", () => {
    const open = ui.membersPanel.classList.toggle("open");
    ui.membersButton.setAttribute("aria-expanded", String(open));
  });
  window.addEventListener("online", reconnectNow);
  window.addEventListener("pagehide", () => {
    if (persistTimer !== null) persist();
    stopped = true;
    if (socket) socket.close(1001);
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted && stopped) {
      stopped = false;
      reconnectNow();
    }
  });

  for (const name of Object.keys(saved.rooms)) {
    if (ROOM_PATTERN.test(name)) roomFor(name);
    else delete saved.rooms[name];
  }
  if (saved.token) {
    ui.loginView.hidden = true;
    ui.chatView.hidden = false;
  } else {
    showLogin();
  }
  render();
  connect();
})();
