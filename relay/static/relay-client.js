/**
 * relay-client.js: a relay's call events in the browser. Plain ES module, no build step, no dependency.
 *
 *   import { connectRelay } from 'https://relay.example.com/static/relay-client.js';
 *
 *   const relay = connectRelay({
 *     url: 'https://relay.example.com',  // the relay's base URL; '' (the default) is this page's origin
 *     fetchToken: async () => (await fetch('/api/relay-token', { method: 'POST' })).json(),
 *     onStateChange: (state, detail) => console.log(state, detail),
 *   });
 *   relay.on('call.incoming', (call, { id }) => showScreenPop(call));
 *
 * `fetchToken` resolves to a subscriber token (a string) or to an object with a `token` field, such as
 * the relay's `POST /v1/tokens` answer. It is called on the first connection, again whenever the relay
 * refuses the connection (an expired token, say), and ahead of the token's expiry. Each time the
 * client reconnects it resumes after the last event id it saw, so nothing is missed within the relay's
 * replay window; past it, a `relay.reset` event says so.
 *
 * The token travels as `?token=` (EventSource cannot set headers), so the relay keeps
 * auth.allow_query_token on; a page of another origin needs its origin in the relay's server.cors_origins.
 *
 * Handlers get `(data, { type, id })`: data JSON-parsed when it is JSON, else the raw string; `id` is
 * the relay's event id, null for the relay's own events (`connected`, `relay.upstream`,
 * `relay.reset`). States: idle → connecting → open ⇄ reconnecting, and closed after `close()`.
 */

const FIRST_BACKOFF_MS = 1_000;
const MAX_BACKOFF_MS = 30_000;
// Like DialStack's SDK, renew 5 minutes before expiry; short-lived tokens at 80% of their lifetime.
const REFRESH_BEFORE_EXPIRY_MS = 300_000;
const REFRESH_AT_FRACTION = 0.8;
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout fires at once past this
const REMEMBERED_IDS = 1_000;

/** The `exp` claim of a JWT in milliseconds, read without verifying it (the relay verifies); null if unreadable. */
export function tokenExpiry(token) {
  try {
    const payload = token.split('.')[1].replaceAll('-', '+').replaceAll('_', '/');
    const { exp } = JSON.parse(atob(payload));
    return Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

function tokenOf(answer) {
  const token = typeof answer === 'string' ? answer : answer?.token;
  if (typeof token !== 'string' || token === '') {
    throw new TypeError('fetchToken must resolve to a token string or to an object with a token field');
  }
  return token;
}

function parse(data) {
  try {
    return JSON.parse(data);
  } catch {
    return data;
  }
}

function isRelayOwn(type) {
  return type === 'connected' || type.startsWith('relay.');
}

export function connectRelay({ url = '', fetchToken, onStateChange = () => {} }) {
  if (typeof fetchToken !== 'function') {
    throw new TypeError('connectRelay needs fetchToken: async () => token');
  }
  const endpoint = new URL(`${url.replace(/\/+$/, '')}/v1/events`, location.href);
  const handlers = new Map(); // event type → Set of handlers
  const seen = new Set(); // recent event ids, oldest first
  let state = 'idle';
  let source = null;
  let listening = new Set(); // event types with a listener on `source`
  let token = null;
  let lastEventId = null;
  let attempt = 0; // failed connections in a row
  let reconnectTimer;
  let refreshTimer;
  let generation = 0; // bumped by every (re)connection, so a step still awaiting a token gives up

  function setState(next, detail = {}) {
    if (next === state && next !== 'reconnecting') return;
    state = next;
    try {
      onStateChange(next, detail);
    } catch (error) {
      reportError(error);
    }
  }

  function remember(id) {
    seen.add(id);
    if (seen.size > REMEMBERED_IDS) seen.delete(seen.values().next().value);
  }

  function dispatch(event) {
    const own = isRelayOwn(event.type);
    // EventSource keeps the last id across events, so only account events are keyed by it.
    const id = own ? null : event.lastEventId || null;
    if (id !== null) {
      if (seen.has(id)) return;
      remember(id);
      lastEventId = id;
    }
    if (event.type === 'connected') {
      attempt = 0;
      setState('open');
    }
    const data = parse(event.data);
    for (const handler of [...(handlers.get(event.type) ?? [])]) {
      try {
        handler(data, { type: event.type, id });
      } catch (error) {
        reportError(error);
      }
    }
  }

  function listen(type) {
    if (source !== null && !listening.has(type)) {
      source.addEventListener(type, dispatch);
      listening.add(type);
    }
  }

  async function connect() {
    const current = ++generation;
    clearTimeout(reconnectTimer);
    try {
      token ??= tokenOf(await fetchToken());
    } catch (error) {
      if (current === generation) retry(error);
      return;
    }
    if (current !== generation) return;
    const query = new URLSearchParams({ token });
    if (lastEventId !== null) query.set('last_event_id', lastEventId);
    endpoint.search = query;
    source?.close();
    // The browser's own reconnection is not used: it would retry with the same (maybe expired) token
    // at the same fixed interval in every open tab; retry() backs off with jitter instead.
    const opened = new EventSource(endpoint);
    source = opened;
    listening = new Set();
    for (const type of ['connected', ...handlers.keys()]) listen(type);
    opened.onerror = () => {
      if (opened !== source) return;
      // CLOSED means the relay answered but refused (401 for an expired token, 429, 503): EventSource
      // cannot see the status, so any refusal gets a fresh token. CONNECTING is a network error.
      if (opened.readyState === EventSource.CLOSED) token = null;
      retry();
    };
    scheduleRefresh();
  }

  function retry(error) {
    source?.close();
    source = null;
    attempt += 1;
    const ceiling = Math.min(MAX_BACKOFF_MS, FIRST_BACKOFF_MS * 2 ** (attempt - 1));
    const delayMs = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    clearTimeout(refreshTimer);
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, delayMs);
    setState('reconnecting', { attempt, delayMs, error });
  }

  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    const expiry = tokenExpiry(token);
    if (expiry === null) return;
    const lifetime = expiry - Date.now();
    const delay = Math.max(lifetime * REFRESH_AT_FRACTION, lifetime - REFRESH_BEFORE_EXPIRY_MS);
    if (delay > 0) refreshTimer = setTimeout(refresh, Math.min(delay, MAX_TIMER_MS));
  }

  async function refresh() {
    const current = generation;
    let fresh;
    try {
      fresh = tokenOf(await fetchToken());
    } catch (error) {
      // The open stream goes on; if the relay later refuses the old token, connect() asks again.
      reportError(error);
      return;
    }
    // A caller that has no newer token (a fixed one) keeps this stream rather than churning it.
    if (current !== generation || fresh === token) return;
    token = fresh;
    connect(); // the stream is replaced in place and resumes after lastEventId: the state stays open
  }

  function on(type, handler) {
    if (state === 'closed') throw new Error('this relay client is closed');
    if (typeof handler !== 'function') throw new TypeError('handler must be a function');
    if (!handlers.has(type)) handlers.set(type, new Set());
    handlers.get(type).add(handler);
    listen(type);
    if (state === 'idle') {
      setState('connecting');
      connect();
    }
  }

  function off(type, handler) {
    const registered = handlers.get(type);
    if (registered === undefined) return;
    if (handler === undefined) registered.clear();
    else registered.delete(handler);
    if (registered.size === 0) handlers.delete(type);
  }

  function close() {
    generation += 1;
    clearTimeout(reconnectTimer);
    clearTimeout(refreshTimer);
    source?.close();
    source = null;
    handlers.clear();
    setState('closed');
  }

  return Object.freeze({
    on,
    off,
    close,
    get state() {
      return state;
    },
  });
}
