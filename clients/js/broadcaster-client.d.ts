// Type declarations of @ws-broadcaster/client (broadcaster-client.js).

/** An event as delivered on /ws (CONTRACT §3). */
export interface BroadcastEvent<T = unknown> {
  type: string;
  conv_id: string;
  /** Starts at 1 per conversation, +1 per publish; filtered profiles see gaps, never reordering. */
  seq: number;
  id: string;
  /** Milliseconds since the epoch. */
  ts: number;
  data: T;
  /** Present on state upserts; `data === null` with a key removes the entry. */
  key?: string;
  /** "append": `data` is a chunk merged into the entity `key` (whole: `client.entity(convId, key)`);
   * "delta": `data` is a patch against the version of seq `base` (docs/streaming.md). */
  op?: "append" | "delta";
  base?: number;
  [field: string]: unknown;
}

/** A change to a conversation's entity map; `entity` null: deleted. */
export interface EntityDetail {
  convId: string;
  key: string;
  entity: BroadcastEvent | null;
}

export interface HelloMessage {
  type: "ws.hello";
  connection_id: string;
  gateway_id: string;
  profile: string;
  server_time: number;
}

export interface SubscribedMessage {
  type: "ws.subscribed";
  conv_id: string;
  epoch: string;
  /** Latest seq at subscribe time. */
  seq: number;
}

export interface UnsubscribedMessage {
  type: "ws.unsubscribed";
  conv_id: string;
  /** Present when the server ended the subscription ("forbidden": the token no longer allows it,
   * after a refresh or a refused ws.subscribe); the client dropped it and will not resubscribe. */
  reason?: string;
  /** The gateway's explanation, when it gave one. */
  message?: string;
}

/** The gateway accepted a ws.refresh: the socket now lives until `exp`. */
export interface RefreshedMessage {
  type: "ws.refreshed";
  /** The new token's exp, seconds since the epoch. */
  exp: number;
}

export interface StateMessage {
  type: "ws.state";
  conv_id: string;
  epoch: string;
  /** The snapshot is consistent as of this seq; live events follow from seq + 1. */
  seq: number;
  entities: Record<string, BroadcastEvent>;
}

export interface ResetMessage {
  type: "ws.reset";
  conv_id: string;
  reason: "history_truncated" | "epoch_changed";
  epoch: string;
  /** The client's new position: live events follow from seq + 1. */
  seq: number;
  /** Added by the client: true when it re-subscribes with hydrate (a "state" event follows). */
  rehydrate: boolean;
}

/** A user's first connection (over every gateway) subscribed (`ws.join`), or its last one left and
 * stayed away the gateway's join/leave delay (`ws.leave`): only where the conversation's namespace
 * has `join_leave = true`. No seq: never replayed after a reconnect. */
export interface JoinLeaveDetail {
  conv_id: string;
  /** The token's `sub`. */
  user: string;
  /** "join" only: the token's `info` claim, when it had one. */
  info?: unknown;
}

export interface PongMessage {
  type: "ws.pong";
  server_time: number;
}

/** A ws.error from the server (e.g. "forbidden" with a conv_id, "bad_refresh"), or a client-side
 * problem ("bad_frame", "token", "connect", "refresh_timeout"). */
export interface ErrorDetail {
  type?: "ws.error";
  code: string;
  message: string;
  /** The conversation a subscription-caused ws.error is about. */
  conv_id?: string;
  /** The unparsable line, for code "bad_frame". */
  line?: string;
  error?: unknown;
}

export type ConnectionStatus = "idle" | "connecting" | "open" | "closed" | "failed";

export interface StatusDetail {
  status: Exclude<ConnectionStatus, "idle">;
  /** The socket's URL ("connecting", "open"). */
  url?: string;
  /** Consecutive failed attempts before this one ("connecting"). */
  attempt?: number;
  /** Close code ("closed", "failed"). */
  code?: number;
  reason?: string;
  /** "closed": whether the client reconnects by itself. */
  willReconnect?: boolean;
  /** "closed" with willReconnect: milliseconds until the next attempt. */
  delayMs?: number;
  /** "failed" after maxAttempts. */
  attempts?: number;
  /** "closed" by 4401 "token expired": the client reconnects at once with a fresh token. */
  tokenExpired?: boolean;
}

export interface BroadcasterEventMap {
  event: BroadcastEvent;
  state: StateMessage;
  reset: ResetMessage;
  subscribed: SubscribedMessage;
  /** The answer to unsubscribe(), or (with `reason`) a subscription the server ended. */
  unsubscribed: UnsubscribedMessage;
  /** A user joined a subscribed conversation (ws.join, namespaces with join_leave). */
  join: JoinLeaveDetail;
  /** A user left a subscribed conversation (ws.leave, namespaces with join_leave). */
  leave: JoinLeaveDetail;
  /** The open socket's token was refreshed (getToken). */
  refreshed: RefreshedMessage;
  status: StatusDetail;
  error: ErrorDetail;
  hello: HelloMessage;
  pong: PongMessage;
  /** Every object received, before the client handles it. */
  message: { type: string; [field: string]: unknown };
  /** `transport: "auto"` fell back to SSE (the websocket failed to open sseAfterFailures times in a row),
   * or, on a reconnect websocketRetryMs later, tries the websocket again. */
  transport: { transport: "sse" | "websocket"; reason: string };
  /** An entity changed (ws.state, upsert, append or delete): the whole entity, never a chunk. */
  entity: EntityDetail;
}

/** "websocket": /ws; "sse": one /sse stream per conversation (fetch); "auto": the websocket, SSE once it
 * failed to open sseAfterFailures times in a row, the websocket tried again websocketRetryMs later. */
export type Transport = "websocket" | "sse" | "auto";

export interface BackoffOptions {
  /** First reconnect delay (before jitter). Default 500. */
  initialMs?: number;
  /** Cap of the delay. Default 30000. */
  maxMs?: number;
  /** Growth per failed attempt. Default 2. */
  factor?: number;
  /** Fraction of the delay randomised away: delay * (1 - jitter * random()). Default 0.5. */
  jitter?: number;
  /** A connection open this long resets the attempt counter. Default 5000. */
  resetAfterMs?: number;
}

export type TokenSource = string | null | (() => string | null | undefined | Promise<string | null | undefined>);

export interface BroadcasterClientOptions {
  /** Gateway websocket URLs (…/ws), tried round-robin. http(s) URLs are turned into ws(s); relative ones resolve against location in a browser. */
  urls?: string | string[];
  /** A single URL (same as `urls: [url]`). */
  url?: string;
  /** Profile name. Default "default". */
  profile?: string;
  /** Auth token (query parameter `token`); a function is called before every connect (and after a
   * 4401 "token expired"), never to refresh an open socket. Give `token` or `getToken`, not both. */
  token?: TokenSource;
  /** A fresh token, called before every connect and ahead of each token's `exp` (read from the JWT,
   * unverified) to refresh the open websocket with ws.refresh. */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; default globalThis.WebSocket (browsers, Node 22+). On Node 20 pass the `ws` package's. */
  WebSocket?: unknown;
  backoff?: BackoffOptions;
  /** Send ws.ping this often while open; 0 disables. Default 25000. */
  pingIntervalMs?: number;
  /** Drop and reconnect when nothing arrives this long after a ping. Default 10000. */
  pongTimeoutMs?: number;
  /** Give up on a socket that has not opened after this long. Default 10000. */
  connectTimeoutMs?: number;
  /** Reconnects in a row that may fail (no connection lasting resetAfterMs) before status "failed". Default Infinity. */
  maxAttempts?: number;
  /** Connect on the first subscribe(). Default true. */
  autoConnect?: boolean;
  /** Extra query parameters for the /ws URL; the gateway refuses names it does not know (close 4400) unless they start with `_`. */
  params?: Record<string, string>;
  /** Default "websocket". With "sse" the token goes as `Authorization: Bearer`, and no WebSocket is needed. */
  transport?: Transport;
  /** "auto": websocket opens that may fail in a row (none opening: a 503 from a busy gateway, a proxy
   * refusing the upgrade) before SSE takes over. Default 3 (AUTO_SSE_AFTER_FAILURES). */
  sseAfterFailures?: number;
  /** "auto" on SSE: the first reconnect this long after falling back tries the websocket once; it stays
   * if it opens, else SSE again at once. Default 300000 (AUTO_WEBSOCKET_RETRY_MS); Infinity: never. */
  websocketRetryMs?: number;
  /** fetch for the SSE transport; default globalThis.fetch. */
  fetch?: typeof fetch;
}

export interface SubscribeOptions {
  /** Globs narrowing the profile (array, or comma-separated string). */
  types?: string | string[] | null;
  /** Start from a ws.state snapshot; re-hydrates after a ws.reset. */
  hydrate?: boolean;
  /** Resume after this seq (e.g. a position saved from an earlier client). */
  since?: number | null;
  /** The epoch `since` belongs to. */
  epoch?: string | null;
  /** Ask for delta upserts (where the namespace allows them); the entity map applies them. */
  delta?: boolean;
}

export interface Position {
  convId: string;
  /** Last seq delivered (or given by ws.subscribed / ws.state / ws.reset); null before the first. */
  seq: number | null;
  epoch: string | null;
}

export type Listener<K extends keyof BroadcasterEventMap> = (detail: BroadcasterEventMap[K], event: CustomEvent<BroadcasterEventMap[K]>) => void;

export declare class BroadcasterClient extends EventTarget {
  constructor(options: BroadcasterClientOptions);

  /** The profile sent on every connect. */
  profile: string;
  /** Counters: sockets opened, duplicate events dropped, unparsable lines, tokens refreshed on open
   * sockets, refresh attempts that failed (bad_refresh, getToken throwing, no answer). */
  readonly stats: { connects: number; duplicatesDropped: number; badLines: number; refreshes: number;
                    refreshFailures: number };
  readonly status: ConnectionStatus;
  /** Transport of the current (or next) connection. */
  readonly transport: "websocket" | "sse";
  /** URL of the current (or last) socket, null before the first connect. */
  readonly url: string | null;
  /** Conversation ids currently subscribed. */
  readonly subscriptions: string[];

  /** Start connecting (no-op while running); restarts after close() or "failed". */
  connect(): this;
  /** Subscribe (or re-subscribe with new options, resuming from the current position). Throws TypeError on an invalid conv_id or since. */
  subscribe(convId: string, options?: SubscribeOptions): this;
  /** Returns false when the conversation was not subscribed. */
  unsubscribe(convId: string): boolean;
  /** Send ws.ping now (the answer is a "pong" event); false when not open. */
  ping(): boolean;
  /** Where the client stands in a conversation, or undefined when not subscribed. */
  position(convId: string): Position | undefined;
  /** A conversation's entities, whole, by key (ws.state, upserts, appends merged, deletes; emptied by ws.reset). */
  entities(convId: string): Map<string, BroadcastEvent>;
  /** One whole entity, or undefined. */
  entity(convId: string, key: string): BroadcastEvent | undefined;
  /** Close for good (no reconnect) until connect() is called again; subscriptions are kept. */
  close(code?: number, reason?: string): void;

  /** Listen; returns a function that removes the listener. */
  on<K extends keyof BroadcasterEventMap>(name: K, fn: Listener<K>): () => void;
  off<K extends keyof BroadcasterEventMap>(name: K, fn: Listener<K>): void;
}

/** The SSE transport's stand-in for a WebSocket (used by the client; exported for tests). */
export declare class SseSocket {
  constructor(wsUrl: string, fetch: typeof globalThis.fetch);
  readonly url: string;
  readyState: number;
  send(text: string): void;
  close(code?: number, reason?: string): void;
  terminate(): void;
}

/** Close codes after which the client stops: 4400, 4401, 4403, 4404. */
export declare const FATAL_CLOSE_CODES: readonly number[];
/** 1012: the gateway is draining; the client reconnects at once to the next URL. */
export declare const CLOSE_DRAINING: 1012;
/** 3: `transport: "auto"` falls back to SSE after this many websocket opens failed in a row (sseAfterFailures). */
export declare const AUTO_SSE_AFTER_FAILURES: 3;
/** 300000: `transport: "auto"` on SSE tries the websocket again on a reconnect this long after (websocketRetryMs). */
export declare const AUTO_WEBSOCKET_RETRY_MS: 300000;
/** "token expired": the reason of the 4401 after which the client reconnects with a fresh token. */
export declare const TOKEN_EXPIRED_REASON: "token expired";

/** A JWT's `exp` (seconds since the epoch), read without verification; null when unreadable. */
export declare function tokenExpiry(token: unknown): number | null;

/** Milliseconds to wait before refreshing a token with `remainingMs` left (80-90 % of it, jittered, with a lead kept). */
export declare function refreshDelay(remainingMs: number, random?: () => number): number;

/** Reconnect delay for a 0-based attempt number. */
export declare function backoffDelay(
  attempt: number,
  backoff: { initialMs: number; maxMs: number; factor: number; jitter: number },
  random?: () => number,
): number;

/** Split one text frame into its JSON objects (NDJSON). */
export declare function parseFrame(text: string): {
  messages: Array<{ [field: string]: unknown }>;
  errors: Array<{ line: string; error: unknown }>;
};

/** An entity's data after a delta's patch (merge patch with `$append` and `$set`). */
export declare function applyPatch(target: unknown, patch: unknown): Record<string, unknown>;

/** An entity's data after an append chunk: string fields extend, others replace. */
export declare function mergeAppend(data: unknown, chunk: unknown): Record<string, unknown>;

/** Apply one stream object to an entity map; returns the [key, entity | null] changes. */
export declare function applyToEntities(
  map: Map<string, BroadcastEvent>,
  msg: { type: string; [field: string]: unknown },
): Array<[string, BroadcastEvent | null]>;

export default BroadcasterClient;
