// The operations API from the browser. Credentials live in sessionStorage only (gone
// when the tab closes), travel only in the Authorization header, never in a URL, and
// the browser's own credential store is never used (credentials: 'omit'), so a 401
// never raises the browser's Basic-auth prompt and no other site can ride on them.

const KEY = 'cairn.authorization';

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.code = this.body.code || (status === 0 ? 'unreachable' : 'http_' + status);
  }
}

let unauthorized = () => {};
/** Called with the error body whenever a request answers 401 (credentials are dropped). */
export function onUnauthorized(fn) { unauthorized = fn; }

export function authorization() { return sessionStorage.getItem(KEY); }
export function signOut() { sessionStorage.removeItem(KEY); }

function basic(user, password) {
  const bytes = new TextEncoder().encode(`${user}:${password}`);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return 'Basic ' + btoa(bin);
}

/** The fetch() options of one operation call. */
export function request(operation, fields, { accept = 'application/json', signal, headers,
  auth = authorization() } = {}) {
  return {
    method: 'POST',
    credentials: 'omit',
    cache: 'no-store',
    redirect: 'error',
    referrerPolicy: 'no-referrer',
    signal,
    headers: { 'Content-Type': 'application/json', Accept: accept, Authorization: auth || '',
      ...(headers || {}) },
    body: JSON.stringify({ operation, ...(fields || {}) }),
  };
}

async function send(operation, fields, options) {
  let resp;
  try {
    resp = await fetch('/', request(operation, fields, options));
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { error: `the node did not answer (${e.message})`, code: 'unreachable' });
  }
  return resp;
}

/** An error body from a failed response (JSON, or whatever text came back). */
export async function failure(resp) {
  let body;
  try { body = await resp.json(); } catch { body = { error: `HTTP ${resp.status}` }; }
  const err = new ApiError(resp.status, body);
  if (resp.status === 401) { signOut(); unauthorized(err); }
  return err;
}

/** One operation; resolves to the JSON answer or throws an ApiError. */
export async function call(operation, fields = {}, options = {}) {
  const resp = await send(operation, fields, options);
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

/** Check credentials with get_session; keeps them for this browser session on success. */
export async function signIn(user, password) {
  const auth = basic(user, password);
  const resp = await send('get_session', {}, { auth });
  if (!resp.ok) {
    let body;
    try { body = await resp.json(); } catch { body = {}; }
    throw new ApiError(resp.status, body);
  }
  const session = await resp.json();
  sessionStorage.setItem(KEY, auth);
  return session;
}

/** This node's name, from the unauthenticated health check. */
export async function nodeName() {
  try {
    const resp = await fetch('/health', { credentials: 'omit', cache: 'no-store' });
    return resp.ok ? (await resp.json()).node : null;
  } catch {
    return null;
  }
}
