// The cluster: this node and each peer (state, last seen, lag, transfers, quarantined
// changes, certificate expiry) from cluster_status, and per project which deploy each
// node runs and whether its process is ready, from get_components. Refreshed every 5 s.

import { call } from './api.js';
import { badge, h, notice, replace } from './dom.js';
import { ago, bytes, count, dash, shortId, time, toDate, until } from './format.js';

const REFRESH_MS = 5000;
const CERT_WARN_DAYS = 14;

export function renderCluster(view, app) {
  let closed = false;
  let timer = null;
  const nodesBox = h('section', { id: 'cluster-nodes' }, h('p', { class: 'muted' }, 'Loading…'));
  const compBox = h('section', { id: 'components' });
  const stamp = h('span', { class: 'muted', id: 'refreshed' });
  replace(view, h('div', { class: 'page-head' }, h('h1', {}, 'Cluster'), stamp),
    h('h2', {}, 'Nodes'), nodesBox, h('h2', {}, 'Components'), compBox);

  async function load() {
    const [status, comps] = await Promise.allSettled([call('cluster_status'), call('get_components')]);
    if (closed) return;
    const peers = status.status === 'fulfilled' ? listOf(status.value.peers) : [];
    if (status.status === 'fulfilled') drawNodes(nodesBox, status.value, peers);
    else replace(nodesBox, refused(status.reason, 'cluster_status'));
    if (comps.status === 'fulfilled') {
      const self = status.status === 'fulfilled' ? status.value.node : comps.value.node;
      drawComponents(compBox, comps.value, [self, ...peers.map((p) => p.name)]);
    } else {
      replace(compBox, refused(comps.reason, 'get_components'));
    }
    replace(stamp, `updated ${time(Date.now()).slice(11)}`);
    timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return { close() { closed = true; clearTimeout(timer); } };
}

function listOf(v) { return Array.isArray(v) ? v.filter((x) => x && typeof x === 'object') : []; }

function refused(e, op) {
  return e && e.status === 403 ? notice('info', `Your role may not run ${op}.`)
    : notice('error', `${op} failed: ${e ? e.message : 'unknown error'}`);
}

function certCell(value) {
  const d = toDate(value);
  if (!d) return dash;
  const days = (d.getTime() - Date.now()) / 86400000;
  return h('span', { class: days < CERT_WARN_DAYS ? 'warn-text' : '', title: time(value) }, until(value));
}

function quarantineCell(value) {
  const n = count(value);
  return n ? h('span', { class: 'warn-text', title: typeof value === 'object' ? JSON.stringify(value).slice(0, 500) : '' },
    `${n} quarantined`) : '0';
}

function drawNodes(el, s, peers) {
  const self = h('dl', { class: 'record summary', id: 'self' },
    h('dt', {}, 'This node'), h('dd', {}, h('strong', {}, s.node ?? dash)),
    h('dt', {}, 'Cluster id'), h('dd', { class: 'mono' }, s.cluster_id ?? 'none (single node)'),
    s.cert_expires_at !== undefined ? [h('dt', {}, 'Certificate expires'), h('dd', {}, certCell(s.cert_expires_at))] : null,
    s.quarantined !== undefined ? [h('dt', {}, 'Quarantined changes'), h('dd', {}, quarantineCell(s.quarantined))] : null);
  if (!peers.length) { replace(el, self, h('p', { class: 'muted' }, 'No peers: this node runs alone.')); return; }
  const head = ['Node', 'State', 'Last seen', 'Lag', 'Transfers', 'Quarantined', 'Certificate', 'Last error'];
  replace(el, self, h('div', { class: 'table-wrap spaced' }, h('table', { class: 'peers', id: 'peers' },
    h('thead', {}, h('tr', {}, head.map((t) => h('th', {}, t)))),
    h('tbody', {}, peers.map((p) => h('tr', { dataset: { node: p.name ?? '', state: p.state ?? '' } },
      h('td', {}, h('strong', {}, p.name ?? dash), h('div', { class: 'muted mono small' }, p.url ?? '')),
      h('td', {}, badge(p.state)),
      h('td', { title: time(p.last_seen) }, ago(p.last_seen)),
      h('td', { class: 'num' }, `${p.lag_changes ?? dash} changes`, h('div', { class: 'muted small' }, bytes(p.lag_bytes))),
      h('td', { class: 'num' }, String(count(p.transfers))),
      h('td', { class: 'num' }, quarantineCell(p.quarantined)),
      h('td', {}, certCell(p.cert_expires_at)),
      h('td', { class: 'error-text' }, p.last_error ? String(typeof p.last_error === 'object'
        ? (p.last_error.message ?? JSON.stringify(p.last_error)) : p.last_error) : dash)))))));
}

function drawComponents(el, c, known) {
  const comps = listOf(c.components);
  if (!comps.length) { replace(el, h('p', { class: 'muted' }, 'Nothing is deployed.')); return; }
  const names = [...new Set([...known.filter(Boolean),
    ...comps.flatMap((p) => listOf(p.nodes).map((n) => n.node)).filter(Boolean)])].sort();
  replace(el, h('div', { class: 'table-wrap' }, h('table', { class: 'components', id: 'components-table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Project'), h('th', {}, 'Active deploy'),
      names.map((n) => h('th', {}, n)))),
    h('tbody', {}, comps.map((p) => {
      const byNode = new Map(listOf(p.nodes).map((n) => [n.node, n]));
      return h('tr', { dataset: { project: p.project ?? '' } },
        h('td', {}, h('strong', {}, p.project ?? dash)),
        h('td', {}, depLink(p.deployment_id), h('div', { class: 'muted small' }, time(p.activated_at))),
        names.map((n) => componentCell(byNode.get(n), p.deployment_id, n)));
    })))));
}

function depLink(id) {
  return id ? h('a', { href: `#/deployments/${encodeURIComponent(id)}`, class: 'mono', title: id }, shortId(id)) : dash;
}

function componentCell(n, active, name) {
  if (!n) return h('td', { class: 'muted', dataset: { node: name } }, dash);
  const behind = active && n.deployment_id && n.deployment_id !== active;
  const proc = n.process && typeof n.process === 'object' ? n.process : null;
  const notConverged = n.converged === false;
  const cls = ['cell', behind ? 'behind' : '', notConverged ? 'not-converged' : ''].join(' ').trim();
  return h('td', { class: cls, dataset: { node: name, deployment: n.deployment_id ?? '' } },
    depLink(n.deployment_id),
    behind ? h('span', { class: 'tag warn' }, 'not the active deploy') : null,
    proc ? h('div', { class: 'proc small' },
      proc.ready === true ? badge('ready') : (proc.running ? badge('running') : badge('stopped')),
      proc.pid ? ` pid ${proc.pid}` : '',
      proc.restarts ? ` · ${proc.restarts} restart${proc.restarts === 1 ? '' : 's'}` : '',
      proc.last_exit !== undefined && proc.last_exit !== null
        ? h('div', { class: 'muted' }, `last exit ${typeof proc.last_exit === 'object' ? JSON.stringify(proc.last_exit) : proc.last_exit}`) : null) : null,
    notConverged ? h('div', { class: 'error-text small' }, `not converged${n.reason ? `: ${n.reason}` : ''}`) : null,
    n.activated_at ? h('div', { class: 'muted small' }, time(n.activated_at)) : null);
}
