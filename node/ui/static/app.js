// The web view's entry point: sign-in, the header, and a hash router over three pages.
// Routes: #/deployments?filters, #/deployments/<id>, #/cluster.

import { ApiError, authorization, call, nodeName, onUnauthorized, signIn, signOut }
  from './api.js';
import { h, notice, replace } from './dom.js';
import { renderCluster } from './cluster.js';
import { renderDeployment } from './deployment.js';
import { renderDeployments } from './deployments.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');

const app = {
  session: null, // {username, role, super_user, operations}
  node: null, // the name of the node serving this page
  /** Whether the signed-in user may run `operation` (the server checks again). */
  may(operation) {
    const s = this.session;
    return Boolean(s && (s.super_user || (Array.isArray(s.operations) && s.operations.includes(operation))));
  },
  go(hash) { if (location.hash === hash) route(); else location.hash = hash; },
};

let current = null; // the page on screen: {close()}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?', 2);
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent),
    params: new URLSearchParams(query || '') };
}

async function route() {
  if (current && current.close) current.close();
  current = null;
  if (!authorization()) { showSignIn(); return; }
  if (!app.session) {
    try {
      app.session = await call('get_session');
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return; // the sign-in form is up
      replace(main, notice('error', `Cannot reach this node: ${e.message}`));
      return;
    }
    renderWho();
  }
  const { parts, params } = parseHash();
  const page = parts[0] || 'deployments';
  for (const a of nav.querySelectorAll('a')) {
    a.classList.toggle('current', a.dataset.page === page);
  }
  nav.hidden = false;
  const view = h('div', { class: 'page' });
  replace(main, view);
  if (page === 'deployments' && parts[1]) current = renderDeployment(view, parts[1], app);
  else if (page === 'deployments') current = renderDeployments(view, params, app);
  else if (page === 'cluster') current = renderCluster(view, app);
  else replace(view, notice('error', 'No such page. ', h('a', { href: '#/deployments' }, 'Deployments')));
}

function renderWho() {
  const s = app.session;
  replace(who,
    app.node ? h('span', { class: 'served', title: 'the node serving this page' }, `node ${app.node}`) : null,
    s ? h('span', { class: 'user', 'data-user': s.username },
      `${s.username} · ${s.super_user ? 'super user' : s.role}`) : null,
    s ? h('button', { type: 'button', class: 'link', id: 'sign-out',
      onclick: () => { signOut(); app.session = null; renderWho(); showSignIn(); } }, 'Sign out') : null);
}

function showSignIn(message) {
  if (current && current.close) current.close();
  current = null;
  app.session = null;
  nav.hidden = true;
  renderWho();
  const error = h('div', { class: 'form-error', role: 'alert' });
  if (message) replace(error, message);
  const user = h('input', { name: 'username', id: 'username', autocomplete: 'username', required: true });
  const password = h('input', { name: 'password', id: 'password', type: 'password',
    autocomplete: 'current-password', required: true });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'signin', id: 'signin' },
    h('h1', {}, 'Sign in'),
    h('p', { class: 'muted' }, `to the cairn web view${app.node ? ` on node ${app.node}` : ''}. ` +
      'Use an operations API user; the credentials stay in this tab until you sign out or close it.'),
    h('label', { for: 'username' }, 'User'), user,
    h('label', { for: 'password' }, 'Password'), password,
    error, submit);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    replace(error);
    try {
      app.session = await signIn(user.value, password.value);
      password.value = '';
      renderWho();
      route();
    } catch (e) {
      const retry = e.body && e.body.retry_after ? ` Try again in ${e.body.retry_after} s.` : '';
      replace(error, e.status === 401 ? 'Wrong user or password.' : `${e.message}.${retry}`);
    } finally {
      submit.disabled = false;
    }
  });
  replace(main, form);
  user.focus();
}

onUnauthorized(() => showSignIn('Your credentials were refused; sign in again.'));
window.addEventListener('hashchange', route);
nodeName().then((name) => { app.node = name; renderWho(); });
route();
