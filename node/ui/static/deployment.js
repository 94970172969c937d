// One deployment: its record, a column per expected node (pending → fetching → staged →
// active, or failed with the error and that node's hook output) and the event timeline.
// A running deploy is followed live from the node serving the page; a finished one is
// drawn the same way from its stored log.

import { call } from './api.js';
import { badge, confirmDialog, h, notice, replace, token } from './dom.js';
import { bytes, dash, duration, shortId, time } from './format.js';
import { followDeployment, startDeploy } from './sse.js';

const TERMINAL = new Set(['success', 'failed', 'rolled_back']);
const STEPS = ['pending', 'fetching', 'staged', 'active'];
// Where each node status sits on the four steps (anything unknown sits on the first).
const STEP_OF = {
  pending: 0, fetching: 1, extracting: 1, installing: 1, loading: 1, staged: 2,
  activating: 3, active: 3,
};
const OFF_PATH = new Set(['failed', 'discarded', 'superseded', 'rolled_back']);
const MAX_TIMELINE = 2000;
const MAX_LIVE_LINES = 200;
const NOT_YET_RETRY_MS = 1000;

export function renderDeployment(view, deploymentId, app) {
  let record = null;
  let events = []; // [{seq, t, event, data}] in seq order
  const nodes = new Map(); // name → peer_results entry (merged with live peer events)
  const liveOutput = new Map(); // name → [{stream, line}] from install events
  let stream = null;
  let closed = false;
  let streamState = 'stored';

  const head = h('div', { class: 'page-head' });
  const actions = h('div', { class: 'actions', id: 'actions' });
  const summary = h('section', { class: 'summary', id: 'summary' });
  const grid = h('section', { class: 'node-grid', id: 'nodes' });
  const timeline = h('ol', { class: 'timeline', id: 'timeline' });
  const messages = h('div', { id: 'messages' });
  replace(view, head, messages, summary, actions, h('h2', {}, 'Nodes'), grid,
    h('h2', {}, 'Events'), timeline);
  replace(head, h('h1', {}, 'Deployment ', h('span', { class: 'mono' }, shortId(deploymentId))));

  function adopt(rec) {
    record = rec;
    nodes.clear();
    for (const r of Array.isArray(rec.peer_results) ? rec.peer_results : []) {
      if (r && typeof r.node === 'string') nodes.set(r.node, { ...r });
    }
    for (const n of Array.isArray(rec.expected_nodes) ? rec.expected_nodes : []) {
      if (!nodes.has(n)) nodes.set(n, { node: n, status: 'pending' });
    }
    if (Array.isArray(rec.event_log)) {
      events = [];
      liveOutput.clear();
      for (const e of rec.event_log) addEvent(e, false);
    }
  }

  function addEvent(e, live) {
    if (!e || typeof e !== 'object') return;
    if (typeof e.seq === 'number' && events.length && e.seq <= events[events.length - 1].seq) return;
    events.push(e);
    if (events.length > MAX_TIMELINE) events.splice(20, events.length - MAX_TIMELINE);
    const data = e.data && typeof e.data === 'object' ? e.data : {};
    if (e.event === 'install') {
      const node = typeof data.node === 'string' ? data.node : record && record.origin_node;
      if (node) {
        const lines = liveOutput.get(node) || [];
        lines.push({ stream: data.stream, line: data.line });
        if (lines.length > MAX_LIVE_LINES) lines.splice(0, lines.length - MAX_LIVE_LINES);
        liveOutput.set(node, lines);
      }
    }
    if (!live || !record) return;
    // Keep the record current between the stream's start and its final `done` record.
    if (e.event === 'peer' && typeof data.node === 'string') {
      const prev = nodes.get(data.node) || { node: data.node };
      nodes.set(data.node, { ...prev, status: data.status ?? prev.status,
        phase: data.phase ?? prev.phase, error: data.error ?? (data.status === 'failed' ? prev.error : null) });
    } else if (e.event === 'phase' && data.phase) {
      record.phase = data.phase;
    } else if (e.event === 'error') {
      record.error = data;
    } else if (e.event === 'finished' && data.status) {
      record.status = data.status;
    }
  }

  function draw() {
    if (closed || !record) return;
    drawSummary(summary, record, streamState);
    drawActions(actions, record, app, deploymentId, reload, messages);
    drawNodes(grid, record, nodes, liveOutput);
    drawTimeline(timeline, events);
  }

  async function reload() {
    try {
      const rec = await call('get_deployment', { deployment_id: deploymentId });
      if (closed) return null;
      adopt(rec);
      draw();
      return rec;
    } catch (e) {
      if (!closed) replace(messages, notice(e.status === 404 ? 'info' : 'error', errorText(e, deploymentId)));
      return e.status === 404 ? undefined : null;
    }
  }

  /** The record, waiting while it is unknown here: records replicate, so a deploy
   *  started on another node a moment ago may not have reached this one yet. */
  async function first() {
    for (;;) {
      const rec = await reload();
      if (rec !== undefined || closed) return rec;
      await new Promise((r) => setTimeout(r, NOT_YET_RETRY_MS));
    }
  }

  (async () => {
    const rec = await first();
    if (rec) replace(messages);
    if (!rec || closed || TERMINAL.has(rec.status)) return;
    const after = events.length ? events[events.length - 1].seq : null;
    streamState = 'live';
    draw();
    stream = followDeployment(deploymentId, after, {
      onEvent: (e) => { addEvent(e, true); draw(); },
      onReset: () => { events = []; liveOutput.clear(); draw(); },
      onDone: (result) => {
        if (result && typeof result === 'object' && result.deployment_id) adopt(result);
        streamState = 'ended';
        draw();
      },
      onError: (err) => {
        streamState = 'ended';
        replace(messages, notice('error', `The event stream ended: ${err.message}`));
        reload();
      },
      onState: (s) => { if (s !== 'ended') { streamState = s; draw(); } },
    });
  })();

  return {
    close() {
      closed = true;
      if (stream) stream.close();
    },
  };
}

function errorText(e, id) {
  if (e.status === 404) return `No deployment ${id} on this node (yet): waiting for it to replicate here…`;
  if (e.status === 403) return 'You may not read deployments (get_deployment).';
  return `Cannot load the deployment: ${e.message}`;
}

function drawSummary(el, d, streamState) {
  const end = TERMINAL.has(d.status) ? d.completed_at : Date.now();
  const idLink = (id) => id ? h('a', { href: `#/deployments/${encodeURIComponent(id)}`, class: 'mono' }, id) : dash;
  const rows = [
    ['Project', d.project],
    ['Status', [badge(d.status, 'big'), d.phase ? h('span', { class: 'muted' }, ` phase ${d.phase}`) : null,
      streamState === 'live' ? h('span', { class: 'live', id: 'live' }, 'live') : null,
      streamState === 'reconnecting' ? h('span', { class: 'live reconnecting', id: 'live' }, 'reconnecting…') : null]],
    ['Deployment', h('span', { class: 'mono', id: 'deployment-id' }, d.deployment_id)],
    d.kind && d.kind !== 'deploy' ? ['Kind', d.kind] : null,
    ['User', d.user],
    ['Origin node', d.origin_node],
    ['Started', time(d.started_at)],
    ['Completed', time(d.completed_at)],
    ['Duration', typeof d.started_at === 'number' && typeof end === 'number' ? duration(end - d.started_at) : dash],
    ['Payload', [bytes(d.payload_size), d.payload_hash ? h('span', { class: 'mono muted', title: d.payload_hash }, ` sha256 ${String(d.payload_hash).slice(0, 12)}…`) : null,
      d.payload_blob_present === false ? h('span', { class: 'tag warn', id: 'no-payload',
        title: 'pruned or dropped, or (while a deploy runs) not fetched yet' }, 'payload not on this node') : null]],
    d.package_identifier ? ['Package', d.package_identifier] : null,
    ['Restart', d.restart_mode ?? dash],
    ['Pinned', d.pinned ? 'yes' : 'no'],
    d.rollback_of ? ['Rollback of', idLink(d.rollback_of)] : null,
    d.superseded_by ? ['Superseded by', idLink(d.superseded_by)] : null,
  ].filter(Boolean);
  replace(el,
    h('dl', { class: 'record' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v ?? dash)])),
    d.error ? notice('error', h('strong', {}, 'Failed: '), errorLine(d.error)) : null);
}

function errorLine(err) {
  if (!err) return dash;
  if (typeof err !== 'object') return String(err);
  return [err.message ?? JSON.stringify(err),
    err.code ? h('span', { class: 'code' }, ` ${err.code}`) : null,
    err.phase ? h('span', { class: 'muted' }, ` in ${err.phase}`) : null];
}

function drawActions(el, d, app, id, reload, messages) {
  const buttons = [];
  const terminal = TERMINAL.has(d.status);
  if (app.may('deploy_component') && d.status === 'success' && d.kind !== 'drop' && d.payload_hash) {
    const gone = d.payload_blob_present === false;
    buttons.push(h('button', { type: 'button', id: 'rollback', disabled: gone,
      title: gone ? 'this node no longer holds the payload' : 'deploy this payload again on every node',
      onclick: async () => {
        const ok = await confirmDialog({ title: `Roll ${d.project} back to this deploy?`,
          body: [h('p', {}, 'This starts a new deploy of project ', h('strong', {}, d.project),
            ' on every node with the exact payload of deployment ', h('span', { class: 'mono' }, id), '.'),
            h('p', { class: 'muted' }, `Payload sha256 ${d.payload_hash}`)],
          confirm: 'Roll back', danger: true });
        if (!ok) return;
        try {
          const newId = await startDeploy({ project: d.project, rollback_from: id });
          app.go(`#/deployments/${encodeURIComponent(newId)}`);
        } catch (e) {
          replace(messages, notice('error', `Rollback refused: ${e.message}`));
        }
      } }, 'Roll back to this deploy'));
  }
  if (app.may('pin_deployment') && terminal) {
    const pin = !d.pinned;
    buttons.push(h('button', { type: 'button', id: 'pin', onclick: async () => {
      const ok = await confirmDialog({ title: pin ? 'Pin this deploy?' : 'Unpin this deploy?',
        body: h('p', {}, pin ? 'Retention will keep this deploy\'s payload until it is unpinned.'
          : 'Retention may then drop this deploy\'s payload like any other.'),
        confirm: pin ? 'Pin' : 'Unpin' });
      if (!ok) return;
      try {
        await call('pin_deployment', { deployment_id: id, pinned: pin });
        replace(messages);
        await reload();
      } catch (e) {
        replace(messages, notice('error', `Cannot ${pin ? 'pin' : 'unpin'}: ${e.message}`));
      }
    } }, pin ? 'Pin' : 'Unpin'));
  }
  replace(el, buttons);
}

function drawNodes(el, d, nodes, liveOutput) {
  const names = [...nodes.keys()].sort();
  if (!names.length) { replace(el, h('p', { class: 'muted' }, 'No node has reported yet.')); return; }
  replace(el, names.map((name) => nodeColumn(name, nodes.get(name), d, liveOutput.get(name))));
}

function nodeColumn(name, r, d, live) {
  const status = r.status ?? 'pending';
  const off = OFF_PATH.has(status);
  const reached = STEP_OF[status] ?? (off ? stepOfPhase(r.phase) : 0);
  const steps = h('ol', { class: 'steps' }, STEPS.map((step, i) => {
    let cls = i < reached ? 'done' : (i === reached ? 'current' : 'todo');
    if (i === reached && off) cls = `stopped s-${token(status)}`;
    if (i === reached && status === 'active') cls = 'done';
    return h('li', { class: cls }, step);
  }));
  const output = outputOf(r, live);
  const failed = status === 'failed';
  return h('article', { class: `node s-${token(status)}`, dataset: { node: name, status } },
    h('header', {}, h('h3', {}, name),
      name === d.origin_node ? h('span', { class: 'tag' }, 'origin') : null,
      r.late ? h('span', { class: 'tag', title: 'reached this deploy after it had started (a returning node)' }, 'late') : null,
      badge(status)),
    steps,
    h('div', { class: 'node-meta muted' },
      status !== 'pending' && r.phase ? `phase ${r.phase}` : null,
      r.started_at && r.completed_at ? ` · ${duration(r.completed_at - r.started_at)}` : null),
    r.error ? h('div', { class: 'node-error', role: failed ? 'alert' : null }, errorLine(r.error)) : null,
    output ? hookOutput(output, failed) : null);
}

function stepOfPhase(phase) {
  if (phase === 'activate' || phase === 'restart' || phase === 'ready') return 3;
  if (phase === 'stage' || phase === 'staged') return 2;
  if (phase === 'fetch' || phase === 'extract' || phase === 'install' || phase === 'check' || phase === 'load') return 1;
  return 0;
}

/** The node's hook output: `install_output` from its result when the record has it,
 *  else the install lines the event log attributes to it. */
function outputOf(r, live) {
  const io = r.install_output;
  if (io && typeof io === 'object' && Array.isArray(io.lines)) {
    return { lines: io.lines, truncated: Boolean(io.truncated), dropped: io.dropped_lines || 0 };
  }
  if (live && live.length) return { lines: live, truncated: false, dropped: 0 };
  return null;
}

function hookOutput(out, open) {
  return h('details', { class: 'hook-output', open },
    h('summary', {}, `hook output (${out.lines.length} line${out.lines.length === 1 ? '' : 's'})`),
    out.truncated || out.dropped ? h('p', { class: 'muted' },
      `${out.dropped ? out.dropped : 'earlier'} line${out.dropped === 1 ? '' : 's'} dropped; the last lines follow`) : null,
    h('pre', {}, out.lines.map((l) => h('span', { class: `line ${l && l.stream === 'stderr' ? 'stderr' : 'stdout'}` },
      `${l && l.line !== undefined ? l.line : String(l)}\n`))));
}

function drawTimeline(el, events) {
  replace(el, events.map((e) => h('li', { class: `ev ev-${token(e.event)}`, dataset: { seq: e.seq ?? '', event: e.event } },
    h('span', { class: 'seq' }, e.seq ?? ''),
    h('span', { class: 'when' }, typeof e.t === 'number' ? time(e.t).slice(11) : ''),
    h('span', { class: 'what' }, e.event),
    h('span', { class: 'detail' }, describe(e)))));
}

function describe(e) {
  const d = e.data && typeof e.data === 'object' ? e.data : {};
  switch (e.event) {
    case 'deployment': return [d.project ?? '', ' ', h('span', { class: 'mono muted' }, d.deployment_id ?? '')];
    case 'phase': return `${d.phase ?? '?'} ${d.status ?? ''}`;
    case 'peer': return [h('strong', {}, d.node ?? '?'), ' → ', badge(d.status), d.phase ? ` (${d.phase})` : '',
      d.error ? [' ', errorLine(d.error)] : null];
    case 'install': return h('span', { class: `mono ${d.stream === 'stderr' ? 'stderr' : ''}` },
      `${d.node ? `[${d.node}] ` : ''}${d.stream ?? ''}: ${d.line ?? ''}`);
    case 'warning': return d.message ?? JSON.stringify(d);
    case 'error': return errorLine(d);
    case 'finished': return badge(d.status);
    case 'payload_dropped': return `payload dropped, ${bytes(d.freed_bytes)} freed`;
    case 'truncated': return `${d.dropped_events ?? '?'} events dropped from the stored log`;
    default: return JSON.stringify(e.data);
  }
}
