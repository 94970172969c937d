// Formatting of sizes, times and durations; every function accepts missing values.

const dash = '—';

export function bytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return dash;
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function duration(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms < 0) return dash;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** Epoch ms (or an ISO string) → a Date, or null. */
export function toDate(value) {
  if (value === null || value === undefined || value === '') return null;
  const d = typeof value === 'number' ? new Date(value) : new Date(String(value));
  return Number.isNaN(d.getTime()) ? null : d;
}

const pad = (n) => String(n).padStart(2, '0');

export function time(value) {
  const d = toDate(value);
  if (!d) return dash;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function ago(value, now = Date.now()) {
  const d = toDate(value);
  if (!d) return dash;
  const s = Math.round((now - d.getTime()) / 1000);
  if (s < 0) return `in ${duration(-s * 1000)}`;
  if (s < 2) return 'just now';
  if (s < 60) return `${s} s ago`;
  return `${duration(s * 1000)} ago`;
}

/** Time until `value` as "in 12 days" (or "expired 3 days ago"). */
export function until(value, now = Date.now()) {
  const d = toDate(value);
  if (!d) return dash;
  const days = Math.floor((d.getTime() - now) / 86400000);
  if (days < 0) return `expired ${-days} day${days === -1 ? '' : 's'} ago`;
  return `in ${days} day${days === 1 ? '' : 's'}`;
}

export function shortId(id) {
  return typeof id === 'string' && id.length > 8 ? id.slice(0, 8) : (id ?? dash);
}

/** A count from a number, a list or an object (fields whose shape is still settling). */
export function count(value) {
  if (typeof value === 'number') return value;
  if (Array.isArray(value)) return value.length;
  if (value && typeof value === 'object') return Object.keys(value).length;
  return 0;
}

export { dash };
