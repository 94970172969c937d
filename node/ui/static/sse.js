// Server-Sent Events over fetch(): EventSource cannot send an Authorization header.
// The parser follows the HTML event-stream rules (fields id/event/data, comments, blank
// line dispatches); the follower reconnects after a dropped connection and resumes with
// Last-Event-ID, so nothing is missed and nothing is shown twice.

import { ApiError, failure, request } from './api.js';

export class SSEParser {
  /** onEvent({id, own, event, data}) for each dispatched event (`id` is the last event
   *  id seen, `own` whether this event carried one); onComment(text) for ": ..." */
  constructor(onEvent, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = '';
    this.reset();
    this.lastId = null;
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = undefined;
  }

  push(text) {
    this.buffer += text;
    let nl;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      let line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      if (line.endsWith('\r')) line = line.slice(0, -1);
      this.line(line);
    }
  }

  line(line) {
    if (line === '') {
      if (this.id !== undefined) this.lastId = this.id;
      if (this.data.length) {
        this.onEvent({ id: this.lastId, own: this.id !== undefined, event: this.event || 'message',
          data: this.data.join('\n') });
      }
      this.reset();
      return;
    }
    if (line.startsWith(':')) { this.onComment(line.slice(1).trim()); return; }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.id = value;
  }
}

const IDLE_MS = 45000; // three missed 15 s pings: the connection is dead even if open

/**
 * Follow one deployment's event stream from this node.
 *
 * handlers: onEvent({seq, t, event, data}), onReset(data) (the stored log restarts),
 * onDone(result), onError(ApiError) (the stream's end, or a refusal), onState(state)
 * with state 'live' | 'reconnecting' | 'ended'.
 * `after` is the last seq already shown (sent as Last-Event-ID on the first request).
 * Returns {close()}.
 */
export function followDeployment(deploymentId, after, handlers) {
  let lastId = after ?? null;
  let closed = false;
  let controller = null;
  let delay = 250;
  const state = (s) => handlers.onState && handlers.onState(s);

  async function once() {
    controller = new AbortController();
    const headers = lastId === null ? {} : { 'Last-Event-ID': String(lastId) };
    const resp = await fetch('/', request('get_deployment', { deployment_id: deploymentId },
      { accept: 'text/event-stream', signal: controller.signal, headers }));
    if (!resp.ok) {
      const err = await failure(resp);
      // Refusals are final; a node that is restarting or overloaded is retried.
      if (resp.status < 500) return { final: err };
      throw err;
    }
    state('live');
    let finished = null;
    const parser = new SSEParser((ev) => {
      let data = null;
      try { data = JSON.parse(ev.data); } catch { data = ev.data; }
      // The stream's own `done`, `error` and `reset` carry no id; a deploy's events (its
      // `error` event too) always do.
      if (!ev.own) {
        if (ev.event === 'done') finished = { done: data && data.result };
        else if (ev.event === 'error') finished = { final: new ApiError(200, data) };
        else if (ev.event === 'reset') { lastId = null; handlers.onReset && handlers.onReset(data); }
        return;
      }
      const seq = Number(ev.id);
      if (seq !== null && Number.isFinite(seq)) lastId = seq;
      delay = 250;
      handlers.onEvent({ seq, event: ev.event, data, t: Date.now() });
    });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let idle = setTimeout(() => controller.abort(), IDLE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        clearTimeout(idle);
        idle = setTimeout(() => controller.abort(), IDLE_MS);
        parser.push(value);
        if (finished) break;
      }
    } finally {
      clearTimeout(idle);
    }
    if (finished) controller.abort();
    return finished;
  }

  (async () => {
    while (!closed) {
      let outcome = null;
      try {
        outcome = await once();
      } catch (e) {
        if (closed) return;
        outcome = null; // a dropped connection or a 5xx: try again below
      }
      if (closed) return;
      if (outcome && 'done' in outcome) { state('ended'); handlers.onDone(outcome.done); return; }
      if (outcome && outcome.final) { state('ended'); handlers.onError(outcome.final); return; }
      state('reconnecting');
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 5000);
    }
  })();

  return {
    close() {
      closed = true;
      if (controller) controller.abort();
    },
  };
}

/** Start a deploy over SSE and resolve with its id as soon as the node names it (the
 *  deploy goes on after we stop reading: a client that leaves does not cancel it). */
export async function startDeploy(fields) {
  const controller = new AbortController();
  const resp = await fetch('/', request('deploy_component', fields,
    { accept: 'text/event-stream', signal: controller.signal }));
  if (!resp.ok) throw await failure(resp);
  let id = null;
  let refusal = null;
  const parser = new SSEParser((ev) => {
    let data = null;
    try { data = JSON.parse(ev.data); } catch { return; }
    if (data && typeof data.deployment_id === 'string') id = id || data.deployment_id;
    if (ev.event === 'error' && !ev.own && !id) refusal = new ApiError(200, data);
    if (ev.event === 'done' && !ev.own && data && data.result) id = id || data.result.deployment_id;
  });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    while (!id && !refusal) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
  } finally {
    controller.abort();
  }
  if (refusal) throw refusal;
  if (!id) throw new ApiError(0, { error: 'the node did not name the new deployment' });
  return id;
}
