// @ts-check
/**
 * Browser and Node client for the ws-broadcaster websocket API (/ws), or its Server-Sent
 * Events twin (/sse) where websockets are blocked (`transport: "sse" | "auto"`).
 *
 * One client holds one websocket to one gateway at a time and multiplexes any number of
 * conversation subscriptions over it. It keeps, per conversation, the last seq it
 * delivered and the conversation's epoch, so that after any disconnect it can resubscribe
 * with `since` + `epoch` and the application sees every event exactly once, in order.
 *
 * No dependencies. Runs where a standard WebSocket constructor exists (browsers, Node 22+)
 * or is passed in (Node 20: `new BroadcasterClient({ WebSocket: require('ws') })`).
 *
 * Wire protocol (server -> client): text frames, each holding one or more JSON objects
 * separated by "\n". Control objects have types starting "ws.".
 *
 * Transports. "websocket" (default): one socket multiplexes every subscription. "sse": one
 * `GET /sse` stream per subscribed conversation, read with `fetch` (so the token goes in an
 * `Authorization` header, and every event type is seen, named or not); an SseSocket stands in
 * for the websocket, so resume, dedup, hydrate and reconnect work exactly as over /ws. "auto":
 * the websocket first; SSE once it failed to open `sseAfterFailures` times in a row (default 3)
 * with none opening: one refusal is no proof of a proxy that blocks upgrades, since a busy gateway
 * answers 503 past its handshake or connection limits. On SSE, the first reconnect at least
 * `websocketRetryMs` (default 5 min) after falling back tries the websocket once more: it stays
 * if it opens, else SSE again at once (a healthy SSE stream is never closed just to try).
 *
 * Tokens. `getToken()` is called before every connect and, on an open websocket, ahead of the
 * token's `exp` (read from the JWT payload, never verified here): the client sends
 * `ws.refresh` with a fresh token and the socket lives on. When a socket is closed anyway
 * with 4401 "token expired" (no refresh in time, an SSE stream ended at exp), the client
 * reconnects with a fresh token and resumes; a 4401 on that new connection is fatal.
 * Per-subscription refusals (`ws.error` forbidden with a conv_id, `ws.unsubscribed` reason
 * forbidden) drop that one subscription and emit "unsubscribed" with the reason.
 *
 * Presence. Where a conversation's namespace has `join_leave = true`, the gateway sends
 * `ws.join` / `ws.leave`; the client emits "join" / "leave" `{conv_id, user, info?}` for the
 * conversations it is subscribed to, in stream order. They carry no seq: not replayed after a
 * reconnect (a client away at the time misses them).
 */

/** Close codes after which reconnecting cannot help: the request itself is refused. */
export const FATAL_CLOSE_CODES = Object.freeze([4400, 4401, 4403, 4404]);

/** "auto": websocket opens that may fail in a row (none opening) before SSE takes over. */
export const AUTO_SSE_AFTER_FAILURES = 3;

/** "auto" on SSE: the first reconnect this long after falling back tries the websocket again. */
export const AUTO_WEBSOCKET_RETRY_MS = 300_000;

/** Close code of a gateway that is draining: reconnect at once, to another URL. */
export const CLOSE_DRAINING = 1012;

/** HTTP statuses of a refused /sse stream, as the close codes /ws would use (all of them fatal). */
const SSE_STATUS_CLOSE = Object.freeze({ 400: 4400, 401: 4401, 403: 4403, 404: 4404 });

/** Close reason of a socket whose token reached its exp: reconnect with a fresh token (other 4401s are fatal). */
export const TOKEN_EXPIRED_REASON = "token expired";

/** Refresh ahead of exp: never later than this long before it (less for tokens living under 3x this). */
const REFRESH_LEAD_MAX_MS = 5_000;
/** Failed refreshes (bad_refresh, getToken throwing, no answer) retried before the token's exp. */
const REFRESH_RETRIES = 3;
/** A refresh unanswered this long (or half the token's remaining life, when less) counts as failed. */
const REFRESH_ANSWER_TIMEOUT_MS = 10_000;

/** The longest delay setTimeout honours. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** ws.error codes naming a conv_id that end that one subscription (the socket and the others stay). */
const SUBSCRIPTION_ENDING_ERRORS = Object.freeze(["forbidden", "too_many_subscriptions"]);

/** An /sse stream that ends this close to its token's exp (or after) ended because the token expired. */
const SSE_EXPIRY_SLACK_MS = 2_000;

/** Syntax of a conversation id (the server enforces the same). */
const CONV_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;

const OPEN = 1;
const CONNECTING = 0;

const DEFAULT_BACKOFF = Object.freeze({
  initialMs: 500,
  maxMs: 30_000,
  factor: 2,
  jitter: 0.5,
  resetAfterMs: 5_000,
});

/**
 * Delay before reconnect attempt number `attempt` (0-based): exponential growth capped at
 * `maxMs`, then "equal jitter": a random value in [delay * (1 - jitter), delay].
 *
 * @param {number} attempt
 * @param {{initialMs: number, maxMs: number, factor: number, jitter: number}} backoff
 * @param {() => number} [random]
 * @returns {number}
 */
export function backoffDelay(attempt, backoff, random = Math.random) {
  const base = Math.min(backoff.maxMs, backoff.initialMs * Math.pow(backoff.factor, attempt));
  const jitter = Math.min(1, Math.max(0, backoff.jitter));
  return Math.round(base * (1 - jitter * random()));
}

/**
 * The `exp` claim of a JWT (seconds since the epoch), read from its base64url payload without
 * verifying anything; null when the token is not a JWT or has no numeric exp.
 *
 * @param {unknown} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3 || !/^[A-Za-z0-9_-]+={0,2}$/.test(parts[1])) return null; // padding tolerated
  try {
    const b64 = parts[1].replace(/=+$/, "").replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const payload = JSON.parse(new TextDecoder().decode(bytes));
    const exp = payload?.exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/**
 * How long to wait before refreshing a token with `remainingMs` left: 80-90 % (jittered, so a
 * fleet spreads its refreshes) of the life left once a lead of min(5 s, a third of it) is kept
 * for the round trip and retries. 0 when the token is (nearly) spent.
 *
 * @param {number} remainingMs
 * @param {() => number} [random]
 * @returns {number}
 */
export function refreshDelay(remainingMs, random = Math.random) {
  if (!(remainingMs > 0)) return 0;
  const usable = remainingMs - Math.min(REFRESH_LEAD_MAX_MS, remainingMs / 3);
  return Math.round(usable * (0.8 + 0.1 * random()));
}

/**
 * Split one text frame into the JSON objects it carries (NDJSON). Lines that are not valid
 * JSON objects are returned in `errors` and do not stop the others.
 *
 * @param {string} text
 * @returns {{messages: any[], errors: {line: string, error: unknown}[]}}
 */
export function parseFrame(text) {
  const messages = [];
  const errors = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    try {
      const obj = JSON.parse(line);
      if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
        throw new TypeError("not a JSON object");
      }
      messages.push(obj);
    } catch (error) {
      errors.push({ line, error });
    }
  }
  return { messages, errors };
}

/** CustomEvent where it exists (browsers, Node 19+), a minimal stand-in elsewhere. */
const DetailEvent =
  typeof globalThis.CustomEvent === "function"
    ? globalThis.CustomEvent
    : class DetailEvent extends Event {
        /** @param {string} type @param {{detail?: any}} [init] */
        constructor(type, init) {
          super(type);
          this.detail = init?.detail;
        }
      };

/**
 * @typedef {object} SubscriptionRecord
 * @property {string} convId
 * @property {string | null} types      comma-separated globs, or null
 * @property {boolean} hydrate          the subscription asked for the state snapshot
 * @property {boolean} needsState       next (re)subscribe must ask for hydrate
 * @property {number | null} seq        last position delivered (event seq, or state/reset seq)
 * @property {string | null} epoch
 * @property {boolean} delta            asks for delta upserts (applied to the entity map)
 */

export class BroadcasterClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string | string[]} [options.urls]  websocket URLs of gateways (…/ws); tried round-robin
   * @param {string} [options.url]              a single URL (same as urls: [url])
   * @param {string} [options.profile]          profile name, default "default"
   * @param {string | (() => string | null | undefined | Promise<string | null | undefined>) | null} [options.token]
   *   auth token sent as the `token` query parameter; a function is called before every connect (and
   *   after a 4401 "token expired"), but never to refresh an open socket: use getToken for that
   * @param {() => string | Promise<string>} [options.getToken] a fresh token: called before every connect
   *   and ahead of each token's exp to refresh the open websocket (ws.refresh); give token or getToken
   * @param {any} [options.WebSocket]           WebSocket constructor (default: globalThis.WebSocket)
   * @param {Partial<typeof DEFAULT_BACKOFF>} [options.backoff]
   * @param {number} [options.pingIntervalMs]   send ws.ping this often while open (0: never), default 25000
   * @param {number} [options.pongTimeoutMs]    reconnect when nothing arrives this long after a ping, default 10000
   * @param {number} [options.connectTimeoutMs] give up on an opening socket after this long, default 10000
   * @param {number} [options.maxAttempts]      reconnects in a row that may fail before "failed", default Infinity
   * @param {boolean} [options.autoConnect]     connect on the first subscribe(), default true
   * @param {Record<string, string>} [options.params] extra query parameters for the /ws URL; the gateway
   *   refuses names it does not know (close 4400) unless they start with `_`
   * @param {"websocket" | "sse" | "auto"} [options.transport] "websocket" (default); "sse": /sse streams
   *   (one per conversation) next to each /ws URL; "auto": the websocket, and SSE once it cannot open
   *   (see sseAfterFailures, websocketRetryMs)
   * @param {number} [options.sseAfterFailures] "auto": websocket opens failing in a row before SSE, default 3
   * @param {number} [options.websocketRetryMs] "auto" on SSE: retry the websocket on the first reconnect
   *   this long after falling back, default 300000 (Infinity: never)
   * @param {typeof fetch} [options.fetch]       fetch for the SSE transport (default: globalThis.fetch)
   */
  constructor(options = {}) {
    super();
    const urls = options.urls ?? (options.url !== undefined ? [options.url] : []);
    /** @type {string[]} */
    this._urls = (Array.isArray(urls) ? urls : [urls]).map(normalizeUrl);
    if (this._urls.length === 0) throw new TypeError("BroadcasterClient: give at least one URL (urls or url)");
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    /** @type {"websocket" | "sse" | "auto"} */
    this._transportOption = options.transport ?? "websocket";
    if (!["websocket", "sse", "auto"].includes(this._transportOption)) {
      throw new TypeError(`BroadcasterClient: transport must be "websocket", "sse" or "auto"`);
    }
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    /** The transport of the next connection: "sse" from the start, or once "auto" fell back. */
    this._useSse = this._transportOption === "sse";
    if (this._transportOption !== "websocket" && typeof this._fetch !== "function") {
      throw new TypeError("BroadcasterClient: the SSE transport needs fetch (pass options.fetch)");
    }
    if (this._transportOption === "auto" && typeof this._WebSocket !== "function") this._useSse = true;
    this._sseAfterFailures = Math.max(1, options.sseAfterFailures ?? AUTO_SSE_AFTER_FAILURES);
    this._websocketRetryMs = options.websocketRetryMs ?? AUTO_WEBSOCKET_RETRY_MS;
    /** "auto": websocket opens that failed since the last one that opened. */
    this._wsFailures = 0;
    /** "auto": when it fell back to SSE (Date.now()), null while on the websocket. */
    this._sseSince = /** @type {number | null} */ (null);
    /** "auto": this websocket is a retry from SSE: one failure sends the client back. */
    this._wsRetry = false;
    if (this._useSse) this._WebSocket ??= null;
    else if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "BroadcasterClient: no WebSocket constructor; pass one, e.g. { WebSocket } from the 'ws' package on Node 20",
      );
    }
    this.profile = options.profile ?? "default";
    if (options.getToken !== undefined && options.getToken !== null) {
      if (typeof options.getToken !== "function") throw new TypeError("BroadcasterClient: getToken must be a function");
      if (options.token !== undefined && options.token !== null) {
        throw new TypeError("BroadcasterClient: give token or getToken, not both");
      }
    }
    this._token = options.token ?? null;
    /** @type {(() => string | Promise<string>) | null} */
    this._getToken = options.getToken ?? null;
    /** Exp of the token the current socket authenticated with (seconds since the epoch; ws.refreshed's
     * once refreshed), null when unreadable. */
    this._connExp = /** @type {number | null} */ (null);
    /** server_time of the last ws.hello minus the local clock: token exps are the server's clock. */
    this._clockSkewMs = 0;
    /** A "token expired" close led to a reconnect with a fresh token; a 4401 before the next hello is fatal. */
    this._renewingToken = false;
    /** @type {{token: string, failures: number} | null} the ws.refresh awaiting its answer (failures before it) */
    this._refreshPending = null;
    /** The gateway answered ws.refresh with unknown_type (an older gateway): no more refreshes on this socket. */
    this._refreshUnsupported = false;
    this._params = { ...(options.params ?? {}) };
    this._backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this._pingIntervalMs = options.pingIntervalMs ?? 25_000;
    this._pongTimeoutMs = options.pongTimeoutMs ?? 10_000;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this._maxAttempts = options.maxAttempts ?? Infinity;
    this._autoConnect = options.autoConnect ?? true;

    /** @type {Map<string, SubscriptionRecord>} */
    this._subs = new Map();
    /** @type {any} */
    this._socket = null;
    this._urlIndex = -1;
    this._attempt = 0;
    /** Incremented by every _open() and close(): an _open() that awaited a token checks it is still current. */
    this._generation = 0;
    /** @type {"idle" | "connecting" | "open" | "closed" | "failed"} */
    this._status = "idle";
    this._running = false;
    /** @type {Record<"reconnect" | "ping" | "pong" | "connect" | "stable" | "refresh", any>} */
    this._timers = { reconnect: null, ping: null, pong: null, connect: null, stable: null, refresh: null };
    /** @type {Map<string, Map<Function, EventListener>>} */
    this._wrapped = new Map();
    this.stats = { connects: 0, duplicatesDropped: 0, badLines: 0, refreshes: 0, refreshFailures: 0 };
    /** @type {Map<string, Map<string, any>>} each conversation's entities, whole (see entities()) */
    this._entities = new Map();
  }

  /**
   * A conversation's entities, whole, by key: built from ws.state, keyed upserts, appends
   * (`"op": "append"` chunks merged in) and deletes, so the page shows whole messages, never
   * chunks. Every change also fires an "entity" event `{convId, key, entity}` (entity null:
   * deleted). A ws.reset empties the map (with hydrate, the next ws.state fills it again).
   *
   * @param {string} convId
   * @returns {Map<string, any>}
   */
  entities(convId) {
    let map = this._entities.get(convId);
    if (!map) this._entities.set(convId, (map = new Map()));
    return map;
  }

  /**
   * One whole entity (an event object whose data holds every append so far), or undefined.
   * @param {string} convId
   * @param {string} key
   */
  entity(convId, key) {
    return this._entities.get(convId)?.get(key);
  }

  _track(/** @type {any} */ msg) {
    for (const [key, entity] of applyToEntities(this.entities(msg.conv_id), msg)) {
      this._emit("entity", { convId: msg.conv_id, key, entity });
    }
  }

  // ---- public API -------------------------------------------------------------------------

  /** Connection status: "idle" | "connecting" | "open" | "closed" | "failed". */
  get status() {
    return this._status;
  }

  /** The transport of the current (or next) connection: "websocket" or "sse". */
  get transport() {
    return this._useSse ? "sse" : "websocket";
  }

  /** URL of the current (or last) socket. */
  get url() {
    return this._urlIndex >= 0 ? this._urls[this._urlIndex % this._urls.length] : null;
  }

  /** Conversation ids currently subscribed. */
  get subscriptions() {
    return [...this._subs.keys()];
  }

  /**
   * Where the client stands in a conversation: the last seq delivered (or given by
   * ws.subscribed / ws.state / ws.reset) and the epoch. Pass it back as `since` / `epoch`
   * to resume in a later client.
   *
   * @param {string} convId
   * @returns {{convId: string, seq: number | null, epoch: string | null} | undefined}
   */
  position(convId) {
    const sub = this._subs.get(convId);
    return sub ? { convId, seq: sub.seq, epoch: sub.epoch } : undefined;
  }

  /** Open the connection (no-op when already running). Also restarts after close() or "failed". */
  connect() {
    if (this._running) return this;
    this._running = true;
    this._attempt = 0;
    this._renewingToken = false;
    this._open();
    return this;
  }

  /**
   * Subscribe to a conversation. Subscribing again to the same conversation replaces its
   * options and resumes from the current position.
   *
   * @param {string} convId
   * @param {{types?: string | string[] | null, hydrate?: boolean, since?: number | null, epoch?: string | null, delta?: boolean}} [options]
   *   delta: full upserts of keys this client holds may come as deltas (where the conversation's namespace
   *   allows them); the client applies them to its entities, and the "event" it emits is the delta object
   */
  subscribe(convId, options = {}) {
    if (typeof convId !== "string" || !CONV_ID_RE.test(convId)) {
      throw new TypeError(`invalid conv_id ${JSON.stringify(convId)}: 1-128 characters of [A-Za-z0-9._:-]`);
    }
    const types = Array.isArray(options.types) ? options.types.join(",") : options.types ?? null;
    const since = options.since ?? null;
    if (since !== null && (!Number.isInteger(since) || since < 0)) {
      throw new TypeError(`invalid since ${JSON.stringify(since)}: a non-negative integer`);
    }
    const previous = this._subs.get(convId);
    const hydrate = Boolean(options.hydrate);
    /** @type {SubscriptionRecord} */
    const sub = {
      convId,
      types: types || null,
      hydrate,
      needsState: hydrate && since === null,
      seq: since ?? previous?.seq ?? null,
      epoch: options.epoch ?? previous?.epoch ?? null,
      delta: Boolean(options.delta),
    };
    this._subs.set(convId, sub);
    if (this._isOpen()) this._sendSubscribe(sub);
    else if (this._autoConnect && !this._running) this.connect();
    return this;
  }

  /**
   * Stop receiving a conversation. Returns false when it was not subscribed.
   * @param {string} convId
   */
  unsubscribe(convId) {
    if (!this._subs.delete(convId)) return false;
    if (this._isOpen()) this._send({ type: "ws.unsubscribe", conv_id: convId });
    return true;
  }

  /** Send a ws.ping now; the answer arrives as a "pong" event. Returns false when not open. */
  ping() {
    if (!this._isOpen()) return false;
    this._send({ type: "ws.ping" });
    this._armPongTimeout();
    return true;
  }

  /** Close the connection for good (until connect() is called again). Subscriptions are kept. */
  close(code = 1000, reason = "client closed") {
    const wasRunning = this._running;
    this._running = false;
    this._generation += 1;
    this._clearTimers();
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      detach(socket);
      try {
        socket.close(code, reason);
      } catch {
        /* already closed */
      }
    }
    if (wasRunning || socket) this._setStatus("closed", { code, reason, willReconnect: false });
  }

  /**
   * Listen to an event; `fn(detail, event)`. Returns a function that removes the listener.
   * Events: "event", "state", "reset", "subscribed", "unsubscribed", "status", "error",
   * "hello", "pong", "message" (every object received, before handling).
   *
   * @param {string} name
   * @param {(detail: any, event: Event) => void} fn
   */
  on(name, fn) {
    let byFn = this._wrapped.get(name);
    if (!byFn) this._wrapped.set(name, (byFn = new Map()));
    if (!byFn.has(fn)) {
      /** @type {EventListener} */
      const listener = (event) => fn(/** @type {CustomEvent} */ (event).detail, event);
      byFn.set(fn, listener);
      this.addEventListener(name, listener);
    }
    return () => this.off(name, fn);
  }

  /**
   * Remove a listener added with on().
   * @param {string} name
   * @param {(detail: any, event: Event) => void} fn
   */
  off(name, fn) {
    const listener = this._wrapped.get(name)?.get(fn);
    if (listener) {
      this.removeEventListener(name, listener);
      this._wrapped.get(name)?.delete(fn);
    }
  }

  // ---- connection lifecycle -----------------------------------------------------------------

  _isOpen() {
    return this._socket !== null && this._socket.readyState === OPEN;
  }

  async _open() {
    if (!this._running) return;
    const generation = ++this._generation;
    this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    const base = this._urls[this._urlIndex];
    this._setStatus("connecting", { url: base, attempt: this._attempt });
    let url;
    try {
      const source = this._getToken ?? this._token;
      const token = typeof source === "function" ? await source() : source;
      if (!this._running || generation !== this._generation) return;
      this._connExp = tokenExpiry(token);
      url = buildUrl(base, { ...this._params, profile: this.profile, ...(token ? { token } : {}) });
    } catch (error) {
      if (!this._running || generation !== this._generation) return;
      this._emit("error", { code: "token", message: `token provider failed: ${errorMessage(error)}`, error });
      this._scheduleReconnect({ code: 1006, reason: "token provider failed" });
      return;
    }
    this._retryWebsocket();
    let socket;
    try {
      socket = this._useSse ? new SseSocket(url, this._fetch) : new this._WebSocket(url);
    } catch (error) {
      this._emit("error", { code: "connect", message: errorMessage(error), error });
      this._scheduleReconnect({ code: 1006, reason: errorMessage(error) });
      return;
    }
    this._socket = socket;
    this._refreshUnsupported = false;
    this._refreshPending = null;
    this.stats.connects += 1;
    try {
      socket.binaryType = "arraybuffer";
    } catch {
      /* not supported: text frames only anyway */
    }
    if (this._connectTimeoutMs > 0) {
      this._timers.connect = setTimeout(() => {
        if (socket === this._socket && socket.readyState === CONNECTING) {
          this._drop(socket, "connect timeout");
        }
      }, this._connectTimeoutMs);
    }
    socket.onopen = () => {
      if (socket !== this._socket) return;
      socket.__opened = true;
      if (!(socket instanceof SseSocket)) this._wsFailures = 0;
      this._wsRetry = false;
      clearTimer(this._timers, "connect");
      this._setStatus("open", { url: base });
      this._timers.stable = setTimeout(() => {
        this._attempt = 0;
      }, this._backoff.resetAfterMs);
      for (const sub of this._subs.values()) this._sendSubscribe(sub);
      this._startPing();
    };
    socket.onmessage = (/** @type {{data: any}} */ event) => {
      if (socket !== this._socket) return;
      this._onFrame(socket, event.data);
    };
    socket.onerror = () => {
      /* a close event follows; the reason is reported there */
    };
    socket.onclose = (/** @type {{code: number, reason: string}} */ event) => {
      if (socket !== this._socket) return;
      this._fallBack(socket);
      this._onClose(event.code, event.reason);
    };
  }

  /**
   * "auto": a websocket that closed without ever opening (an upgrade refused on the way) counts a
   * failure; the sseAfterFailures-th in a row (or the first of a retry from SSE) -> SSE.
   */
  _fallBack(/** @type {any} */ socket) {
    if (this._transportOption !== "auto" || this._useSse || socket.__opened) return;
    this._wsFailures += 1;
    if (!this._wsRetry && this._wsFailures < this._sseAfterFailures) return;
    this._useSse = true;
    this._sseSince = Date.now();
    this._wsFailures = 0;
    this._wsRetry = false;
    this._attempt = 0;
    this._emit("transport", { transport: "sse", reason: "the websocket could not open" });
  }

  /** "auto" on SSE: the connection about to open tries the websocket once websocketRetryMs have passed. */
  _retryWebsocket() {
    if (this._transportOption !== "auto" || !this._useSse || this._sseSince === null) return;
    if (Date.now() - this._sseSince < this._websocketRetryMs) return;
    this._useSse = false;
    this._sseSince = null;
    this._wsRetry = true;
    this._emit("transport", { transport: "websocket", reason: "retrying the websocket" });
  }

  /** Abandon a socket that does not answer, and reconnect. */
  _drop(/** @type {any} */ socket, /** @type {string} */ reason) {
    detach(socket);
    this._fallBack(socket);
    try {
      if (typeof socket.terminate === "function") socket.terminate();
      else socket.close(4000, reason);
    } catch {
      /* ignore */
    }
    this._onClose(1006, reason);
  }

  _onClose(/** @type {number} */ code, /** @type {string} */ reason) {
    this._socket = null;
    this._clearTimers();
    this._refreshPending = null;
    if (!this._running) return;
    // The token ran out on a socket that was accepted: get a fresh one and resume. Once only: a
    // 4401 before the next ws.hello means the fresh token is refused too (fatal, like any other 4401).
    const source = this._getToken ?? this._token;
    if (code === 4401 && reason === TOKEN_EXPIRED_REASON && !this._renewingToken && typeof source === "function") {
      this._renewingToken = true;
      this._scheduleReconnect({ code, reason, tokenExpired: true });
      return;
    }
    if (FATAL_CLOSE_CODES.includes(code)) {
      this._running = false;
      this._setStatus("failed", { code, reason, willReconnect: false });
      return;
    }
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect(/** @type {{code: number, reason: string, tokenExpired?: boolean}} */ info) {
    if (!this._running) return;
    if (this._attempt >= this._maxAttempts) {
      this._running = false;
      this._setStatus("failed", { ...info, willReconnect: false, attempts: this._attempt });
      return;
    }
    // A draining gateway (1012) asks to go elsewhere now: the next URL, without waiting,
    // unless the previous attempt already failed (then back off like any other failure).
    // An expired token is no failure of the gateway: reconnect now, without counting an attempt.
    const immediate = info.tokenExpired || (info.code === CLOSE_DRAINING && this._attempt === 0);
    const delayMs = immediate ? 0 : backoffDelay(this._attempt, this._backoff);
    if (!info.tokenExpired) this._attempt += 1;
    this._setStatus("closed", { ...info, willReconnect: true, delayMs });
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      this._open();
    }, delayMs);
  }

  _startPing() {
    if (!(this._pingIntervalMs > 0)) return;
    this._timers.ping = setInterval(() => this.ping(), this._pingIntervalMs);
  }

  _armPongTimeout() {
    if (!(this._pongTimeoutMs > 0) || this._timers.pong) return;
    const socket = this._socket;
    this._timers.pong = setTimeout(() => {
      this._timers.pong = null;
      if (socket === this._socket) this._drop(socket, "ping timeout");
    }, this._pongTimeoutMs);
  }

  /** Milliseconds the current token has left by the server's clock (0 when its exp is unknown). */
  _tokenRemainingMs() {
    return this._connExp === null ? 0 : this._connExp * 1000 - (Date.now() + this._clockSkewMs);
  }

  /** Arm the refresh of the open websocket's token ahead of its exp (getToken, a readable exp, not SSE). */
  _scheduleRefresh() {
    clearTimer(this._timers, "refresh");
    const socket = this._socket;
    if (!this._getToken || !socket || socket instanceof SseSocket || this._refreshUnsupported) return;
    if (this._connExp === null) return; // no readable exp: nothing to refresh ahead of
    const delayMs = refreshDelay(this._tokenRemainingMs());
    // setTimeout fires at once past 2^31-1 ms (24.8 days): a longer wait re-plans when that much has passed
    if (delayMs > MAX_TIMER_MS) {
      this._timers.refresh = setTimeout(() => this._scheduleRefresh(), MAX_TIMER_MS);
      return;
    }
    this._timers.refresh = setTimeout(() => {
      this._timers.refresh = null;
      this._refresh(socket, 0);
    }, delayMs);
  }

  async _refresh(/** @type {any} */ socket, /** @type {number} */ failures) {
    if (socket !== this._socket || !this._isOpen() || !this._getToken) return;
    let token;
    try {
      token = await this._getToken();
      if (typeof token !== "string" || !token) throw new TypeError("getToken returned no token");
    } catch (error) {
      if (socket !== this._socket) return;
      this._emit("error", { code: "token", message: `getToken failed: ${errorMessage(error)}`, error });
      this._refreshFailed(socket, failures);
      return;
    }
    if (socket !== this._socket || !this._isOpen()) return;
    const pending = { token, failures };
    this._refreshPending = pending;
    this._send({ type: "ws.refresh", token });
    const answerMs = Math.max(200, Math.min(REFRESH_ANSWER_TIMEOUT_MS, this._tokenRemainingMs() / 2));
    this._timers.refresh = setTimeout(() => {
      this._timers.refresh = null;
      if (socket !== this._socket || this._refreshPending !== pending) return;
      this._refreshPending = null;
      this._emit("error", { code: "refresh_timeout", message: `no answer to ws.refresh within ${answerMs} ms` });
      this._refreshFailed(socket, failures);
    }, answerMs);
  }

  /** Retry a failed refresh a few times, spread over the token's remaining life; after that the
   * gateway closes at exp (4401 "token expired") and the client reconnects with a fresh token. */
  _refreshFailed(/** @type {any} */ socket, /** @type {number} */ failures) {
    this.stats.refreshFailures += 1;
    const remaining = this._tokenRemainingMs();
    if (failures >= REFRESH_RETRIES || !(remaining > 300)) return;
    clearTimer(this._timers, "refresh");
    this._timers.refresh = setTimeout(() => {
      this._timers.refresh = null;
      this._refresh(socket, failures + 1);
    }, remaining / 3);
  }

  _onRefreshed(/** @type {any} */ msg) {
    const pending = this._refreshPending;
    if (!pending) return; // not an answer to this client's ws.refresh
    this._refreshPending = null;
    clearTimer(this._timers, "refresh");
    this._connExp = typeof msg.exp === "number" ? msg.exp : tokenExpiry(pending.token);
    this.stats.refreshes += 1;
    this._emit("refreshed", msg);
    this._scheduleRefresh();
  }

  _onError(/** @type {any} */ msg) {
    if (typeof msg.conv_id === "string") {
      // Every subscription-caused ws.error names its conversation; forbidden (or too many subscriptions)
      // ends that one only, and a reconnect does not ask for it again.
      if (SUBSCRIPTION_ENDING_ERRORS.includes(msg.code) && this._subs.delete(msg.conv_id)) {
        this._emit("unsubscribed", { type: "ws.unsubscribed", conv_id: msg.conv_id, reason: msg.code,
                                     message: msg.message });
      }
      return;
    }
    const pending = this._refreshPending;
    if (!pending) return;
    if (msg.code === "bad_refresh") {
      this._refreshPending = null;
      clearTimer(this._timers, "refresh");
      this._refreshFailed(this._socket, pending.failures);
    } else if (msg.code === "unknown_type") {
      // A gateway from before ws.refresh: the socket lives until exp, then the reconnect renews the token.
      this._refreshPending = null;
      clearTimer(this._timers, "refresh");
      this._refreshUnsupported = true;
    }
  }

  _clearTimers() {
    for (const name of Object.keys(this._timers)) clearTimer(this._timers, name);
  }

  _setStatus(/** @type {any} */ status, /** @type {object} */ info = {}) {
    this._status = status;
    this._emit("status", { status, ...info });
  }

  _send(/** @type {object} */ obj) {
    this._socket.send(JSON.stringify(obj));
  }

  _sendSubscribe(/** @type {SubscriptionRecord} */ sub) {
    /** @type {Record<string, unknown>} */
    const msg = { type: "ws.subscribe", conv_id: sub.convId };
    if (sub.types) msg.types = sub.types;
    if (sub.delta) msg.delta = true;
    if (sub.needsState) {
      msg.hydrate = true;
    } else if (sub.seq !== null) {
      msg.since = sub.seq;
      if (sub.epoch !== null) msg.epoch = sub.epoch;
    }
    this._send(msg);
  }

  // ---- inbound ------------------------------------------------------------------------------

  _onFrame(/** @type {any} */ socket, /** @type {unknown} */ data) {
    // Any traffic proves the connection alive.
    clearTimer(this._timers, "pong");
    let text;
    if (typeof data === "string") text = data;
    else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) text = new TextDecoder().decode(data);
    else {
      this._emit("error", { code: "bad_frame", message: "unexpected non-text frame" });
      return;
    }
    const { messages, errors } = parseFrame(text);
    for (const { line, error } of errors) {
      this.stats.badLines += 1;
      this._emit("error", { code: "bad_frame", message: `unparsable line: ${errorMessage(error)}`, line });
    }
    for (const msg of messages) {
      // A listener may have closed (or reconnected) the client mid-frame.
      if (socket !== this._socket) return;
      this._emit("message", msg);
      this._handle(msg);
    }
  }

  _handle(/** @type {any} */ msg) {
    const type = msg.type;
    if (typeof type !== "string") return;
    if (!type.startsWith("ws.")) {
      this._onEvent(msg);
      return;
    }
    switch (type) {
      case "ws.hello":
        this._renewingToken = false; // the token was accepted
        if (typeof msg.server_time === "number") this._clockSkewMs = msg.server_time - Date.now();
        this._scheduleRefresh();
        this._emit("hello", msg);
        return;
      case "ws.pong":
        this._emit("pong", msg);
        return;
      case "ws.error":
        this._emit("error", msg);
        this._onError(msg);
        return;
      case "ws.refreshed":
        this._onRefreshed(msg);
        return;
      case "ws.subscribed":
        this._onSubscribed(msg);
        return;
      case "ws.unsubscribed":
        // With a reason, the server ended the subscription (e.g. "forbidden" after a token refresh):
        // drop it, so that no reconnect subscribes it again.
        if (typeof msg.reason === "string" && msg.reason) this._subs.delete(msg.conv_id);
        this._emit("unsubscribed", msg);
        return;
      case "ws.state":
        this._onState(msg);
        return;
      case "ws.reset":
        this._onReset(msg);
        return;
      case "ws.join":
      case "ws.leave":
        this._onJoinLeave(msg);
        return;
      default:
        return; // unknown control objects are ignored (forward compatibility)
    }
  }

  _onSubscribed(/** @type {any} */ msg) {
    const sub = this._subs.get(msg.conv_id);
    if (!sub) return;
    if (msg.epoch !== undefined) sub.epoch = msg.epoch;
    // Live-only subscription: nothing older than this will come.
    if (sub.seq === null && !sub.needsState && typeof msg.seq === "number") sub.seq = msg.seq;
    this._emit("subscribed", msg);
  }

  _onState(/** @type {any} */ msg) {
    const sub = this._subs.get(msg.conv_id);
    if (!sub) return;
    sub.needsState = false;
    sub.seq = msg.seq;
    if (msg.epoch !== undefined) sub.epoch = msg.epoch;
    this._track(msg);
    this._emit("state", msg);
  }

  _onReset(/** @type {any} */ msg) {
    const sub = this._subs.get(msg.conv_id);
    if (!sub) return;
    // The position becomes the reset's, even when it goes backwards (a new epoch starts at 0).
    sub.seq = msg.seq;
    if (msg.epoch !== undefined) sub.epoch = msg.epoch;
    const rehydrate = sub.hydrate;
    this._track(msg);
    this._emit("reset", { ...msg, rehydrate });
    if (rehydrate && this._subs.get(msg.conv_id) === sub) {
      // What the app holds is stale: ask for a fresh snapshot (the server replaces the
      // subscription in place).
      sub.needsState = true;
      if (this._isOpen()) this._sendSubscribe(sub);
    }
  }

  /** ws.join / ws.leave (namespaces with join_leave): "join" / "leave" {conv_id, user, info?}; no seq, never replayed. */
  _onJoinLeave(/** @type {any} */ msg) {
    if (!this._subs.has(msg.conv_id) || typeof msg.user !== "string") return;
    /** @type {{conv_id: string, user: string, info?: unknown}} */
    const detail = { conv_id: msg.conv_id, user: msg.user };
    if (msg.type === "ws.join" && msg.info !== undefined) detail.info = msg.info;
    this._emit(msg.type === "ws.join" ? "join" : "leave", detail);
  }

  _onEvent(/** @type {any} */ msg) {
    const sub = this._subs.get(msg.conv_id);
    if (!sub || typeof msg.seq !== "number") return;
    if (sub.seq !== null && msg.seq <= sub.seq) {
      this.stats.duplicatesDropped += 1;
      return;
    }
    sub.seq = msg.seq;
    if (typeof msg.key === "string") this._track(msg);
    this._emit("event", msg);
  }

  _emit(/** @type {string} */ name, /** @type {any} */ detail) {
    this.dispatchEvent(new DetailEvent(name, { detail }));
  }
}

// ---- helpers ----------------------------------------------------------------------------------

/**
 * An entity's data after a delta's patch (docs/streaming.md "Delta upserts"): JSON merge patch
 * (null removes), `{"$append": s}` extends a string, `{"$set": v}` sets a value verbatim.
 * @param {any} target
 * @param {any} patch
 * @returns {Record<string, any>}
 */
export function applyPatch(target, patch) {
  const out = target !== null && typeof target === "object" && !Array.isArray(target) ? { ...target } : {};
  for (const [name, value] of Object.entries(patch ?? {})) {
    if (value === null) {
      delete out[name];
    } else if (typeof value === "object" && !Array.isArray(value)) {
      const keys = Object.keys(value);
      if (keys.length === 1 && typeof value.$append === "string") {
        out[name] = (typeof out[name] === "string" ? out[name] : "") + value.$append;
      } else if (keys.length === 1 && keys[0] === "$set") {
        out[name] = value.$set;
      } else {
        out[name] = applyPatch(out[name], value);
      }
    } else {
      out[name] = value;
    }
  }
  return out;
}

/**
 * The data of an entity after the append `chunk` (the server's rule, docs/streaming.md): each
 * string field extends the entity's string at the same field, any other field replaces it.
 * @param {any} data
 * @param {any} chunk
 */
export function mergeAppend(data, chunk) {
  const merged = data !== null && typeof data === "object" && !Array.isArray(data) ? { ...data } : {};
  if (chunk === null || typeof chunk !== "object" || Array.isArray(chunk)) return merged;
  for (const [name, value] of Object.entries(chunk)) {
    const old = merged[name];
    merged[name] = typeof value === "string" && typeof old === "string" ? old + value : value;
  }
  return merged;
}

/**
 * Apply one object of a conversation's stream to its entity map (`Map` key -> entity); returns
 * the changes as [key, entity | null] pairs. ws.state replaces the map, ws.reset empties it, an
 * event with a key upserts (data null: deletes), one with `"op": "append"` merges its chunk, one
 * with `"op": "delta"` patches the version it was sent (`base`: that version's seq).
 * @param {Map<string, any>} map
 * @param {any} msg
 * @returns {Array<[string, any]>}
 */
export function applyToEntities(map, msg) {
  /** @type {Array<[string, any]>} */
  const changes = [];
  if (msg.type === "ws.state") {
    const next = new Map(Object.entries(msg.entities ?? {}));
    for (const key of map.keys()) if (!next.has(key)) changes.push([key, null]);
    map.clear();
    for (const [key, entity] of next) {
      map.set(key, entity);
      changes.push([key, entity]);
    }
    return changes;
  }
  if (msg.type === "ws.reset") {
    for (const key of map.keys()) changes.push([key, null]);
    map.clear();
    return changes;
  }
  if (typeof msg.type !== "string" || msg.type.startsWith("ws.") || typeof msg.key !== "string") return changes;
  if (msg.op === "append") {
    const { op: _op, ...entity } = msg;
    entity.data = mergeAppend(map.get(msg.key)?.data, msg.data);
    map.set(msg.key, entity);
    changes.push([msg.key, entity]);
  } else if (msg.op === "delta") {
    // The server sends a delta only against the version this client was sent: `base` is its seq.
    const held = map.get(msg.key);
    const { op: _op, base: _base, ...entity } = msg;
    if (!held || held.seq !== msg.base) {
      if (map.delete(msg.key)) changes.push([msg.key, null]); // cannot happen with a conforming server
      return changes;
    }
    entity.data = applyPatch(held.data, msg.data);
    map.set(msg.key, entity);
    changes.push([msg.key, entity]);
  } else if (msg.data === null || msg.data === undefined) {
    if (map.delete(msg.key)) changes.push([msg.key, null]);
  } else {
    map.set(msg.key, msg);
    changes.push([msg.key, msg]);
  }
  return changes;
}

/**
 * The websocket stand-in of the SSE transport: what the client sends over a socket (ws.subscribe,
 * ws.unsubscribe, ws.ping) becomes one `GET /sse` per conversation, read with fetch; each SSE
 * event's data (the JSON object /ws would send) is handed on as a message. A stream that ends or
 * fails closes the whole stand-in (the client then reconnects and resumes every subscription);
 * a refused stream closes it with the close code /ws would have used (400 -> 4400, ...), and a stream
 * the gateway ended at the token's exp closes it with 4401 "token expired", as /ws does (the client
 * then reconnects with a fresh token, where it has a token function).
 */
export class SseSocket {
  /**
   * @param {string} wsUrl  the /ws URL the client built (profile, token and extra parameters in its query)
   * @param {typeof fetch} fetchFn
   */
  constructor(wsUrl, fetchFn) {
    const url = new URL(wsUrl);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    url.pathname = url.pathname.endsWith("/ws") ? url.pathname.slice(0, -3) + "/sse"
      : url.pathname.replace(/\/?$/, "/sse");
    this._token = url.searchParams.get("token");
    url.searchParams.delete("token"); // sent as Authorization: Bearer, not in URLs and logs
    this._exp = tokenExpiry(this._token);
    this._base = url;
    this._fetch = fetchFn;
    /** @type {Map<string, AbortController>} */
    this._streams = new Map();
    this._lastDataAt = Date.now();
    this.readyState = CONNECTING;
    this.url = url.toString();
    /** @type {any} */ this.onopen = null;
    /** @type {any} */ this.onmessage = null;
    /** @type {any} */ this.onclose = null;
    /** @type {any} */ this.onerror = null;
    setTimeout(() => {
      if (this.readyState !== CONNECTING) return;
      this.readyState = OPEN;
      this.onopen?.({});
    }, 0);
  }

  /** @param {string} text a client message of the websocket protocol */
  send(text) {
    const msg = JSON.parse(text);
    if (msg.type === "ws.subscribe") this._open(msg);
    else if (msg.type === "ws.unsubscribe") {
      this._streams.get(msg.conv_id)?.abort();
      this._streams.delete(msg.conv_id);
      this._deliver(JSON.stringify({ type: "ws.unsubscribed", conv_id: msg.conv_id }));
    } else if (msg.type === "ws.ping" && Date.now() - this._lastDataAt < 45_000) {
      // the streams' keep-alive comments (every 15 s) stand for the pong: only a silent link times out
      this._deliver(JSON.stringify({ type: "ws.pong", server_time: Date.now() }));
    }
  }

  close(code = 1000, reason = "") {
    this._end(code, reason, false);
  }

  terminate() {
    this._end(1006, "terminated", false);
  }

  _end(/** @type {number} */ code, /** @type {string} */ reason, /** @type {boolean} */ notify) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    for (const controller of this._streams.values()) controller.abort();
    this._streams.clear();
    if (notify) this.onclose?.({ code, reason });
  }

  _deliver(/** @type {string} */ data) {
    if (this.readyState === OPEN) this.onmessage?.({ data });
  }

  async _open(/** @type {any} */ msg) {
    this._streams.get(msg.conv_id)?.abort();
    const controller = new AbortController();
    this._streams.set(msg.conv_id, controller);
    const url = new URL(this._base);
    url.searchParams.set("conv_id", msg.conv_id);
    for (const name of ["since", "epoch", "types"]) {
      if (msg[name] !== undefined && msg[name] !== null) url.searchParams.set(name, String(msg[name]));
    }
    if (msg.hydrate) url.searchParams.set("hydrate", "1");
    /** @type {Record<string, string>} */
    const headers = { accept: "text/event-stream" };
    if (this._token) headers.authorization = `Bearer ${this._token}`;
    let response;
    try {
      response = await this._fetch(url.toString(), { headers, signal: controller.signal, cache: "no-store" });
    } catch (error) {
      if (!controller.signal.aborted) this._end(1006, `sse: ${errorMessage(error)}`, true);
      return;
    }
    if (!response.ok || !response.body) {
      let reason = `HTTP ${response.status}`;
      try {
        reason = (await response.json()).message ?? reason;
      } catch {
        /* not JSON */
      }
      // a refusal is fatal like its close code; 503 and the rest: reconnect
      this._end(/** @type {Record<number, number>} */ (SSE_STATUS_CLOSE)[response.status] ?? 1013, reason, true);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this._lastDataAt = Date.now();
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.search(/\r\n|\n|\r/)) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
          if (line === "") {
            if (data.length) this._deliver(data.join("\n"));
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
          } // id:, event:, retry: and comments: the JSON object carries all the client needs
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (!controller.signal.aborted && this._streams.get(msg.conv_id) === controller) {
      // the gateway ended the stream (token expired, drain, slow reader) or the connection died:
      // reconnect, resume. SSE has no close code: an end within a few seconds of exp is the expiry
      // (the slack covers a client clock behind the gateway's).
      const expired = this._exp !== null && Date.now() >= this._exp * 1000 - SSE_EXPIRY_SLACK_MS;
      if (expired) this._end(4401, TOKEN_EXPIRED_REASON, true);
      else this._end(1012, "sse stream ended", true);
    }
  }
}

/** Accept ws(s):// URLs, http(s):// (turned into ws(s)://) and, in a browser, relative paths. */
function normalizeUrl(/** @type {string} */ raw) {
  if (typeof raw !== "string" || !raw) throw new TypeError(`invalid URL ${JSON.stringify(raw)}`);
  const base = globalThis.location?.href;
  const url = base ? new URL(raw, base) : new URL(raw);
  if (url.protocol === "http:") url.protocol = "ws:";
  else if (url.protocol === "https:") url.protocol = "wss:";
  if (url.protocol !== "ws:" && url.protocol !== "wss:") throw new TypeError(`not a websocket URL: ${raw}`);
  return url.toString();
}

function buildUrl(/** @type {string} */ base, /** @type {Record<string, string>} */ params) {
  const url = new URL(base);
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, String(value));
  return url.toString();
}

function detach(/** @type {any} */ socket) {
  socket.onopen = socket.onmessage = socket.onclose = null;
  // Keep an error handler: Node's `ws` throws on an "error" event nobody listens to.
  socket.onerror = noop;
}

function noop() {}

function clearTimer(/** @type {Record<string, any>} */ timers, /** @type {string} */ name) {
  const t = timers[name];
  if (t !== null) {
    clearTimeout(t);
    clearInterval(t);
    timers[name] = null;
  }
}

function errorMessage(/** @type {unknown} */ error) {
  return error instanceof Error ? error.message : String(error);
}

export default BroadcasterClient;
