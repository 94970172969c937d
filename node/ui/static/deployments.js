// The deployments page: filters (project, status, user, time range) and a table paged
// with list_deployments' cursor. Filters and the page's cursor live in the URL's hash,
// so a view can be reloaded and shared (no credentials ever go there).

import { call } from './api.js';
import { badge, h, notice, replace } from './dom.js';
import { bytes, dash, duration, shortId, time } from './format.js';

export const STATUSES = ['pending', 'extracting', 'installing', 'loading', 'staging',
  'replicating', 'activating', 'restarting', 'success', 'failed', 'rolled_back'];
const TERMINAL = new Set(['success', 'failed', 'rolled_back']);
const PAGE_SIZES = [25, 50, 100];
const FILTERS = ['project', 'status', 'user', 'since', 'until', 'limit'];

// Cursors of the pages before the current one, per filter set, for "Newer".
const cursorsBefore = new Map();

/** datetime-local value ↔ epoch ms (the browser's time zone). */
function toLocalInput(ms) {
  const d = new Date(Number(ms));
  if (Number.isNaN(d.getTime())) return '';
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}
function fromLocalInput(value) {
  if (!value) return null;
  const ms = new Date(value).getTime();
  return Number.isNaN(ms) ? null : ms;
}

/** Node counts for the table: how many expected nodes are active / failed. */
export function nodeCounts(d) {
  const results = Array.isArray(d.peer_results) ? d.peer_results : [];
  const expected = Array.isArray(d.expected_nodes) && d.expected_nodes.length
    ? d.expected_nodes.length : results.length;
  const active = results.filter((r) => r && r.status === 'active').length;
  const failed = results.filter((r) => r && r.status === 'failed').length;
  return { expected, active, failed };
}

function hashFor(filters, cursor) {
  const q = new URLSearchParams();
  for (const k of FILTERS) if (filters[k] !== null && filters[k] !== undefined && filters[k] !== '') q.set(k, filters[k]);
  if (cursor) q.set('cursor', cursor);
  const s = q.toString();
  return '#/deployments' + (s ? '?' + s : '');
}

export function renderDeployments(view, params, app) {
  const filters = {};
  for (const k of FILTERS) filters[k] = params.get(k) || '';
  const cursor = params.get('cursor') || null;
  const key = FILTERS.map((k) => filters[k]).join('\u0000');
  const stack = cursorsBefore.get(key) || [];
  cursorsBefore.set(key, stack);
  let closed = false;

  const form = filterForm(filters, (next) => {
    cursorsBefore.delete(FILTERS.map((k) => next[k]).join('\u0000'));
    app.go(hashFor(next, null));
  });
  const status = h('div', { class: 'list-status muted' }, 'Loading…');
  const table = h('div', { class: 'table-wrap' });
  const pager = h('div', { class: 'pager' });
  replace(view,
    h('div', { class: 'page-head' }, h('h1', {}, 'Deployments'),
      h('button', { type: 'button', id: 'refresh', onclick: () => load() }, 'Refresh')),
    form, status, table, pager);

  async function load() {
    const fields = { limit: Number(filters.limit) || PAGE_SIZES[0] };
    if (filters.project) fields.project = filters.project;
    if (filters.status) fields.status = filters.status;
    if (filters.user) fields.user = filters.user;
    if (filters.since) fields.since = Number(filters.since);
    if (filters.until) fields.until = Number(filters.until);
    if (cursor) fields.cursor = cursor;
    let page;
    try {
      page = await call('list_deployments', fields);
    } catch (e) {
      if (!closed) replace(status, notice('error', `Cannot list deployments: ${e.message}`));
      return;
    }
    if (closed) return;
    const rows = Array.isArray(page.deployments) ? page.deployments : [];
    const total = typeof page.total === 'number' ? page.total : null;
    const first = stack.length * fields.limit;
    replace(status, rows.length
      ? `${first + 1}–${first + rows.length}${total === null ? '' : ` of ${total}`} deployments, newest first`
      : 'No deployments match these filters.');
    replace(table, rows.length ? deploymentTable(rows) : null);
    const newer = stack.length ? h('button', { type: 'button', id: 'newer', onclick: () => {
      const prev = stack.pop();
      app.go(hashFor(filters, prev));
    } }, '← Newer') : null;
    const older = page.next_cursor ? h('button', { type: 'button', id: 'older', onclick: () => {
      stack.push(cursor);
      app.go(hashFor(filters, page.next_cursor));
    } }, 'Older →') : null;
    replace(pager, newer, older);
  }
  load();
  return { close() { closed = true; } };
}

function filterForm(filters, apply) {
  const project = h('input', { name: 'project', id: 'f-project', placeholder: 'any', value: filters.project });
  const user = h('input', { name: 'user', id: 'f-user', placeholder: 'any', value: filters.user });
  const status = h('select', { name: 'status', id: 'f-status' },
    h('option', { value: '' }, 'any'),
    STATUSES.map((s) => h('option', { value: s, selected: s === filters.status }, s.replace('_', ' '))));
  const since = h('input', { type: 'datetime-local', name: 'since', id: 'f-since',
    value: filters.since ? toLocalInput(filters.since) : '' });
  const until = h('input', { type: 'datetime-local', name: 'until', id: 'f-until',
    value: filters.until ? toLocalInput(filters.until) : '' });
  const limit = h('select', { name: 'limit', id: 'f-limit' },
    PAGE_SIZES.map((n) => h('option', { value: n, selected: String(n) === String(filters.limit || PAGE_SIZES[0]) }, `${n} per page`)));
  const field = (label, input) => h('label', { class: 'field' }, h('span', {}, label), input);
  const form = h('form', { class: 'filters', id: 'filters' },
    field('Project', project), field('Status', status), field('User', user),
    field('Started from', since), field('to', until), field('Show', limit),
    h('div', { class: 'filter-buttons' },
      h('button', { type: 'submit', class: 'primary' }, 'Apply'),
      h('button', { type: 'button', onclick: () => apply({}) }, 'Clear')));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const untilMs = fromLocalInput(until.value);
    apply({
      project: project.value.trim(), status: status.value, user: user.value.trim(),
      since: fromLocalInput(since.value) ?? '',
      // The form picks minutes; "to 12:30" includes all of 12:30.
      until: untilMs === null ? '' : untilMs + 59999,
      limit: limit.value,
    });
  });
  return form;
}

function deploymentTable(rows) {
  const head = ['Started', 'Project', 'Status', 'User', 'Size', 'Duration', 'Nodes', 'Origin', 'Deployment'];
  return h('table', { class: 'deployments', id: 'deployments' },
    h('thead', {}, h('tr', {}, head.map((t) => h('th', {}, t)))),
    h('tbody', {}, rows.map((d) => {
      const n = nodeCounts(d);
      const link = `#/deployments/${encodeURIComponent(d.deployment_id)}`;
      const end = TERMINAL.has(d.status) ? d.completed_at : Date.now();
      const kind = d.kind && d.kind !== 'deploy' ? h('span', { class: 'tag' }, d.kind) : null;
      return h('tr', { dataset: { id: d.deployment_id } },
        h('td', { class: 'nowrap' }, time(d.started_at)),
        h('td', {}, h('a', { href: link }, d.project ?? dash), kind,
          d.rollback_of ? h('span', { class: 'tag', title: `rollback of ${d.rollback_of}` }, 'rollback') : null,
          d.pinned ? h('span', { class: 'tag pin' }, 'pinned') : null),
        h('td', {}, badge(d.status)),
        h('td', {}, d.user ?? dash),
        h('td', { class: 'num' }, bytes(d.payload_size)),
        h('td', { class: 'num' }, typeof d.started_at === 'number' && typeof end === 'number'
          ? duration(end - d.started_at) : dash),
        h('td', { class: 'num nodes', title: `${n.active} active, ${n.failed} failed, ${n.expected} expected` },
          `${n.active}/${n.expected}`, n.failed ? h('span', { class: 'failed-count' }, ` ${n.failed} failed`) : null),
        h('td', {}, d.origin_node ?? dash),
        h('td', { class: 'mono' }, h('a', { href: link, title: d.deployment_id }, shortId(d.deployment_id))));
    })));
}
