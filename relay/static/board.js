// The live call board: one card per call, newest first, following it from the first ring to the end.
// Every value from an event reaches the page through textContent or an attribute, never as HTML.
import { connectRelay, tokenExpiry } from './relay-client.js';

const CALL_EVENTS = ['call.incoming', 'call.initiated', 'call.answered', 'call.transfer', 'call.end'];
const MAX_CARDS = 60; // a board left open all day keeps the latest calls, not all of them
const DOWN_GRACE_MS = 1_000; // shorter blips show on the connection dots only, not as a banner
const RECOVERED_MS = 4_000;
const TOKEN_KEY = 'relay_token';

// Later stages never give way to earlier ones, so a late or repeated event cannot rewind a card.
const STAGE = { ringing: 0, dialing: 0, answered: 1, transferred: 2, ended: 3 };
const STATUS_LABEL = { ringing: 'Ringing', dialing: 'Dialing', answered: 'On call', transferred: 'Transferred' };
const OUTCOME_LABEL = {
  completed: 'Ended',
  missed: 'Missed',
  voicemail: 'Voicemail',
  no_answer: 'No answer',
  busy: 'Busy',
  failed: 'Failed',
};
const UNANSWERED = new Set(['missed', 'no_answer', 'busy', 'failed']);

const $ = (id) => document.getElementById(id);
const callsEl = $('calls');
const template = $('call-template');
const calls = new Map(); // card key (call_id, else `event:<relay id>`) → call, oldest first

// --- numbers and times, for people ------------------------------------------------------------

// Country codes are 1 digit in zones 1 and 7, 2 digits for this list, 3 digits otherwise (ITU E.164).
const TWO_DIGIT_CODES = new Set(
  '20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98'.split(' '),
);

function groups(digits, sizes) {
  const parts = [];
  let at = 0;
  for (const size of sizes) {
    parts.push(digits.slice(at, at + size));
    at += size;
  }
  return parts.filter(Boolean).join(' ');
}

function ukNational(digits) {
  return digits.startsWith('2') ? groups(digits, [2, 4, 4]) : groups(digits, [4, 6]);
}

function anyNational(digits) {
  const tail = digits.length > 4 ? [digits.slice(-4)] : [];
  const head = digits.slice(0, digits.length - (tail.length ? 4 : 0)).match(/.{1,3}/g) ?? [];
  return [...head, ...tail].join(' ');
}

function formatNumber(value) {
  if (typeof value !== 'string' || value === '') return '';
  if (!/^\+[1-9]\d{6,14}$/.test(value)) return value; // an extension or a withheld number, as given
  const digits = value.slice(1);
  if (digits.startsWith('1') && digits.length === 11) {
    return `+1 (${digits.slice(1, 4)}) ${digits.slice(4, 7)}-${digits.slice(7)}`;
  }
  const codeLength = /^[17]/.test(digits) ? 1 : TWO_DIGIT_CODES.has(digits.slice(0, 2)) ? 2 : 3;
  const code = digits.slice(0, codeLength);
  const national = digits.slice(codeLength);
  return `+${code} ${code === '44' ? ukNational(national) : anyNational(national)}`;
}

function formatTransferTarget(value) {
  if (typeof value !== 'string' || value === '') return 'another line';
  return /^\d{1,6}$/.test(value) ? `ext. ${value}` : formatNumber(value);
}

function formatDuration(totalSeconds) {
  const seconds = Math.max(0, Math.round(totalSeconds));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = String(seconds % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

const clock = new Intl.DateTimeFormat(undefined, { hour: 'numeric', minute: '2-digit' });

// --- calls --------------------------------------------------------------------------------------

function text(value) {
  return typeof value === 'string' && value !== '' ? value : null;
}

function newCall(key, data) {
  const element = template.content.firstElementChild.cloneNode(true);
  const call = {
    key,
    element,
    callId: text(data.call_id),
    direction: 'inbound',
    status: 'ringing',
    outcome: null,
    name: null,
    from: null,
    to: null,
    user: null,
    transferredTo: null,
    duration: null,
    startedAt: Date.now(),
    answeredAt: null,
  };
  calls.set(key, call);
  callsEl.prepend(element);
  prune();
  return call;
}

// DialStack's docs show call.incoming without a call_id: a later event with one adopts the live card
// of the same caller on the same line.
function adoptable(data) {
  for (const call of calls.values()) {
    if (call.callId === null && call.status !== 'ended' && call.from === data.from_number && call.to === data.to_number) {
      return call;
    }
  }
  return null;
}

function callFor(data, eventId) {
  const callId = text(data.call_id);
  if (callId !== null) {
    const known = calls.get(callId) ?? adoptable(data);
    if (known !== null) {
      if (known.key !== callId) {
        calls.delete(known.key);
        known.key = callId;
        known.callId = callId;
        calls.set(callId, known);
      }
      return known;
    }
    return newCall(callId, data);
  }
  const key = `event:${eventId}`;
  return calls.get(key) ?? newCall(key, data);
}

function advance(call, status) {
  if (STAGE[status] < STAGE[call.status]) return false;
  call.status = status;
  return true;
}

function apply(call, type, data) {
  if (data.direction === 'inbound' || data.direction === 'outbound') call.direction = data.direction;
  call.from ??= text(data.from_number);
  call.to ??= text(data.to_number);
  call.user ??= text(data.user_id);
  switch (type) {
    case 'call.incoming':
      call.direction = 'inbound';
      call.name ??= text(data.from_name);
      break;
    case 'call.initiated':
      call.direction = 'outbound';
      if (call.status === 'ringing') call.status = 'dialing';
      break;
    case 'call.answered':
      if (advance(call, 'answered')) call.answeredAt ??= Date.now();
      break;
    case 'call.transfer':
      if (advance(call, 'transferred')) call.transferredTo = text(data.transferred_to) ?? call.transferredTo;
      break;
    case 'call.end':
      if (advance(call, 'ended')) {
        call.outcome = text(data.status) ?? 'completed';
        call.duration = Number.isFinite(data.duration_seconds) ? data.duration_seconds : null;
      }
      break;
  }
}

function prune() {
  while (calls.size > MAX_CARDS) {
    const oldest = [...calls.values()].find((call) => call.status === 'ended') ?? calls.values().next().value;
    calls.delete(oldest.key);
    oldest.element.remove();
  }
}

// --- rendering ----------------------------------------------------------------------------------

function set(root, selector, value) {
  root.querySelector(selector).textContent = value;
}

function footer(call, now) {
  if (call.status === 'ended') {
    if (UNANSWERED.has(call.outcome)) return ['Not answered', ''];
    const label = call.outcome === 'voicemail' ? 'Voicemail' : 'Call lasted';
    return [label, call.duration === null ? '' : formatDuration(call.duration)];
  }
  if (call.status === 'ringing') return ['Ringing for', formatDuration((now - call.startedAt) / 1000)];
  if (call.status === 'dialing') return ['Dialing for', formatDuration((now - call.startedAt) / 1000)];
  return ['On call for', formatDuration((now - (call.answeredAt ?? call.startedAt)) / 1000)];
}

function statusLabel(call) {
  if (call.status !== 'ended') return STATUS_LABEL[call.status];
  return OUTCOME_LABEL[call.outcome] ?? call.outcome.replaceAll('_', ' ');
}

function renderProgress(call, now) {
  const [label, value] = footer(call, now);
  set(call.element, '.progress', label);
  set(call.element, '.elapsed', value);
}

function render(call) {
  const card = call.element;
  const inbound = call.direction === 'inbound';
  card.dataset.key = call.key;
  if (call.callId !== null) card.dataset.callId = call.callId;
  card.dataset.status = call.status;
  card.dataset.direction = call.direction;
  card.classList.toggle('unknown', inbound && call.name === null);
  if (call.outcome !== null) card.dataset.outcome = UNANSWERED.has(call.outcome) ? 'unanswered' : call.outcome;

  set(card, '.direction', inbound ? 'Inbound' : 'Outbound');
  set(card, '.status', statusLabel(call));
  const started = card.querySelector('.started');
  started.textContent = clock.format(call.startedAt);
  started.dateTime = new Date(call.startedAt).toISOString();

  const party = inbound ? call.from : call.to;
  set(card, '.caller', inbound ? call.name ?? 'Unknown caller' : 'Outbound call');
  set(card, '.number', formatNumber(party) || 'Number withheld');
  set(card, '.line-label', inbound ? 'Dialed' : 'From line');
  set(card, '.line', formatNumber(inbound ? call.to : call.from) || '—');
  card.querySelector('.fact-user').hidden = call.user === null;
  set(card, '.user', call.user ?? '');
  card.querySelector('.fact-transfer').hidden = call.transferredTo === null;
  set(card, '.transfer', formatTransferTarget(call.transferredTo));
  renderProgress(call, Date.now());
}

function renderTally() {
  const count = (...statuses) => [...calls.values()].filter((call) => statuses.includes(call.status)).length;
  $('count-ringing').textContent = count('ringing', 'dialing');
  $('count-active').textContent = count('answered', 'transferred');
  $('count-ended').textContent = count('ended');
  $('empty').hidden = calls.size > 0;
}

function onCallEvent(data, { type, id }) {
  if (data === null || typeof data !== 'object') return; // not a call payload; nothing to show
  const call = callFor(data, id);
  apply(call, type, data);
  render(call);
  renderTally();
}

setInterval(() => {
  const now = Date.now();
  for (const call of calls.values()) if (call.status !== 'ended') renderProgress(call, now);
}, 1_000);

// --- connection banner --------------------------------------------------------------------------

const UPSTREAM_TROUBLE = {
  reconnecting: 'The relay lost its connection to DialStack and is reconnecting. New calls will appear once it is back.',
  unauthorized: 'DialStack refused the relay’s credentials; the relay keeps retrying. Check upstream.secret_key.',
  degraded: 'The relay’s broker is unreachable; calls may arrive late.',
};

const link = { relay: 'connecting', upstream: null, relayError: null };
let shownTrouble = null; // the kind the banner shows, once a trouble outlasts DOWN_GRACE_MS
let troubleTimer;
let recoveredTimer;

function trouble() {
  if (link.relay === 'reconnecting') return 'relay-down';
  if (link.upstream !== null && link.upstream !== 'connected') return 'upstream-down';
  return null;
}

function troubleText(kind) {
  if (kind === 'upstream-down') return UPSTREAM_TROUBLE[link.upstream] ?? `DialStack connection: ${link.upstream}.`;
  return link.relayError ?? 'Connection to the relay lost. Reconnecting…';
}

function showBanner(kind, message) {
  const banner = $('banner');
  banner.dataset.kind = kind;
  $('banner-text').textContent = message;
  banner.hidden = false;
}

function hideBanner() {
  const banner = $('banner');
  banner.hidden = true;
  delete banner.dataset.kind;
}

function renderLinks() {
  const relayLink = $('relay-link');
  relayLink.dataset.state = link.relay;
  relayLink.querySelector('b').textContent = { open: 'live', 'no-token': 'no token' }[link.relay] ?? link.relay;
  const upstreamLink = $('upstream-link');
  upstreamLink.dataset.state = link.upstream ?? 'unknown';
  upstreamLink.querySelector('b').textContent = link.upstream ?? '…';

  const kind = trouble();
  clearTimeout(troubleTimer);
  if (kind !== null) {
    clearTimeout(recoveredTimer);
    if (shownTrouble !== null) {
      shownTrouble = kind;
      showBanner(kind, troubleText(kind));
    } else {
      troubleTimer = setTimeout(() => {
        shownTrouble = kind;
        showBanner(kind, troubleText(kind));
      }, DOWN_GRACE_MS);
    }
  } else if (shownTrouble !== null && link.relay === 'open') {
    shownTrouble = null;
    showRecovered('Back online.');
  }
}

function showRecovered(message) {
  showBanner('recovered', message);
  clearTimeout(recoveredTimer);
  recoveredTimer = setTimeout(hideBanner, RECOVERED_MS);
}

// The relay could not replay what this page missed (it restarted, or the gap outlasted its replay
// window); it says so right after reconnecting.
function onReset() {
  if (trouble() === null) showRecovered('Back online. Calls during the outage may be missing from the board.');
}

// --- start --------------------------------------------------------------------------------------

// The token travels in the URL fragment, which browsers never send to servers; it is then kept for
// this tab only and taken out of the address bar so it is not copied along with the link.
function takeToken() {
  const fromFragment = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromFragment) {
    sessionStorage.setItem(TOKEN_KEY, fromFragment);
    history.replaceState(null, '', location.pathname + location.search);
    return fromFragment;
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function start() {
  const token = takeToken();
  if (!token) {
    $('empty').hidden = true;
    $('no-token').hidden = false;
    link.relay = 'no-token';
    renderLinks();
    return;
  }
  const relay = connectRelay({
    url: new URL('.', location.href).href,
    // The board has one token, from its link; once that expires it asks for a new link.
    fetchToken: async () => {
      const expiry = tokenExpiry(token);
      if (expiry !== null && expiry <= Date.now()) {
        throw new Error('The token in this link has expired. Open a new link (relay token --account ...).');
      }
      return token;
    },
    onStateChange: (state, detail) => {
      link.relay = state;
      if (state !== 'open') link.upstream = null; // unknown until the relay tells again
      link.relayError = detail.error?.message ?? null;
      renderLinks();
    },
  });
  relay.on('connected', (data) => {
    if (typeof data?.account_id === 'string') $('account').textContent = data.account_id;
  });
  relay.on('relay.upstream', (data) => {
    link.upstream = typeof data?.state === 'string' ? data.state : null;
    renderLinks();
  });
  relay.on('relay.reset', onReset);
  for (const type of CALL_EVENTS) relay.on(type, onCallEvent);
}

// A token pasted into the address bar of an open board changes only the fragment: start over with it.
window.addEventListener('hashchange', () => {
  if (new URLSearchParams(location.hash.slice(1)).has('token')) location.reload();
});
start();
