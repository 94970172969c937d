// Building DOM nodes without innerHTML: every value from the API becomes text, never markup.

/** h('a', {href, class, onclick}, child, ...) → an element. Children may be strings,
 *  numbers, nodes, arrays or null/false/undefined (skipped). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(key, '');
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace everything inside `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A CSS class fragment from an API value (statuses are free text to us). */
export function token(value) {
  return String(value ?? 'unknown').toLowerCase().replace(/[^a-z0-9_-]/g, '_');
}

/** A status badge; `data-status` keeps the raw value for tests and styles. */
export function badge(status, extraClass) {
  const text = status === null || status === undefined ? 'unknown' : String(status);
  return h('span', { class: `badge s-${token(text)} ${extraClass || ''}`.trim(),
    dataset: { status: text } }, text.replace(/_/g, ' '));
}

/** A notice box: kind is 'error', 'warn' or 'info'. */
export function notice(kind, ...children) {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    ...children);
}

/** Ask before doing something: a modal <dialog>; resolves true only on confirm. */
export function confirmDialog({ title, body, confirm, danger }) {
  return new Promise((resolve) => {
    const ok = h('button', { type: 'button', class: danger ? 'danger' : 'primary',
      'data-action': 'confirm' }, confirm || 'Confirm');
    const cancel = h('button', { type: 'button', 'data-action': 'cancel' }, 'Cancel');
    const dialog = h('dialog', { class: 'confirm' },
      h('h2', {}, title), h('div', { class: 'dialog-body' }, body),
      h('div', { class: 'dialog-buttons' }, cancel, ok));
    let answer = false;
    ok.addEventListener('click', () => { answer = true; dialog.close(); });
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => { dialog.remove(); resolve(answer); });
    document.body.appendChild(dialog);
    dialog.showModal();
    cancel.focus();
  });
}
