/* support-router web inbox: plain JS, no framework, no build step.
 *
 * Safety rule for the whole file: anything a customer (or a remote server)
 * wrote reaches the DOM only as text, via h() which appends Text nodes, or
 * textContent. The one exception is a message's `html`, which the server has
 * sanitized with nh3; the page's CSP forbids inline script on top of that.
 *
 * The page keeps the working set (open and pending conversations) in memory,
 * kept current by server-sent events, so filters and their counts are exact
 * and instant; closed conversations are fetched page by page when asked for.
 * The list is windowed: only the rows in view (and a few around) are in the
 * DOM, so a queue of thousands paints as fast as a queue of ten.
 */
'use strict';
(() => {
  const RANK = { critical: 0, high: 1, normal: 2, low: 3 };
  const URGENCIES = ['critical', 'high', 'normal', 'low'];
  const STATUSES = ['open', 'pending', 'closed'];
  const VIEWS = [['all', 'All'], ['mine', 'Mine'], ['team', 'My teams'], ['unassigned', 'Unassigned']];
  const CATEGORY = {
    security: 'Security', account_access: 'Account access', transaction: 'Transaction',
    complaint: 'Complaint', general: 'General',
  };
  const CHANNEL_ICON = { email: 'email', webhook: 'webhook', telegram: 'telegram' };
  const EVENTS = ['conversation.created', 'conversation.updated', 'message.created', 'message.delivery'];
  const FIRST_PAGE = 100;
  const PAGE = 500;
  const ROW_H = 72;
  const OVERSCAN = 12;
  const MAX_WORKING = 20000;
  const SVG = 'http://www.w3.org/2000/svg';

  const S = {
    me: null, csrf: '', channels: [], agents: [],
    convs: new Map(), dirty: new Set(), rows: new Map(), list: [],
    f: Object.assign({ view: 'all', status: 'open', urgency: '', channel: '' }, stored('inbox.filter')),
    q: '', sel: null, open: null, thread: null, opening: 0, drafts: new Map(),
    closed: { loaded: false, cursor: null }, alerts: [], flash: new Set(),
    early: {}, touched: new Set(), es: null, retry: 0, retryTimer: 0, stale: false, loadGen: 0, frame: 0, scrolling: 0, painted: false,
    sound: localStorage.getItem('inbox.sound') === '1', audio: null,
  };

  class SignedOut extends Error {}

  // -- small helpers ----------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function stored(key) {
    try { return JSON.parse(localStorage.getItem(key)) || {}; } catch { return {}; }
  }

  /** Build an element; children are nodes or strings (appended as text, never parsed). */
  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids.flat()) if (kid != null && kid !== false) el.append(kid);
    return el;
  }

  function icon(name) {
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('class', 'i');
    svg.setAttribute('aria-hidden', 'true');
    const use = document.createElementNS(SVG, 'use');
    use.setAttribute('href', '#i-' + name);
    svg.append(use);
    return svg;
  }

  const ms = (iso) => (iso ? Date.parse(iso) : null);
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : '');

  function span(d) {
    const m = Math.floor(Math.abs(d) / 60000);
    if (m < 1) return '<1m';
    if (m < 60) return m + 'm';
    const hr = Math.floor(m / 60);
    if (hr < 24) return hr + 'h' + (hr < 10 && m % 60 ? ' ' + (m % 60) + 'm' : '');
    return Math.floor(hr / 24) + 'd';
  }

  const age = (iso) => span(Date.now() - ms(iso));
  const who = (p) => (p && (p.name || p.address || p.id)) || 'unknown';
  const title = (c) => c.subject || c.preview || '(no text)';
  const size = (n) => (n < 1024 ? n + ' B' : n < 1048576 ? (n / 1024).toFixed(0) + ' KB' : (n / 1048576).toFixed(1) + ' MB');

  /** First-response countdown: text plus a class, so overdue is red *and* says so. */
  function sla(c) {
    if (c.status === 'closed') return null;
    if (c.first_response_at) return { text: 'answered', cls: 'ok', icon: 'check' };
    if (!c.first_response_due) return null;
    const left = ms(c.first_response_due) - Date.now();
    if (left < 0) return { text: 'overdue ' + span(left), cls: 'overdue', icon: 'alert' };
    return { text: span(left) + ' left', cls: left < 15 * 60000 ? 'soon' : '', icon: 'clock' };
  }

  function slaEl(c) {
    const s = sla(c);
    return h('span', { class: 'sla ' + (s ? s.cls : ''), title: c.first_response_due ? 'first response due ' + when(c.first_response_due) : null },
      s ? [icon(s.icon), s.text] : '');
  }

  function badge(u) {
    const mark = u === 'critical' ? icon('shield') : u === 'high' ? icon('alert') : null;
    return h('span', { class: 'badge b-' + u, title: 'urgency ' + u }, mark, u === 'critical' || u === 'high' ? u.toUpperCase() : u);
  }

  function chanEl(name) {
    const type = (S.channels.find((ch) => ch.name === name) || {}).type;
    return h('span', { class: 'chan', title: (type || 'channel') + ' ' + name }, icon(CHANNEL_ICON[type] || 'chat'), name);
  }

  let toastTimer = 0;
  function toast(text, bad) {
    const el = $('toast');
    el.textContent = text;
    el.className = 'toast show' + (bad ? ' bad' : '');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.className = 'toast'; }, 4000);
  }

  function failed(e) {
    if (!(e instanceof SignedOut)) toast(e.message, true);
  }

  // -- server ------------------------------------------------------------------

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    const init = { method, headers, credentials: 'same-origin' };
    if (method !== 'GET') headers['X-CSRF-Token'] = S.csrf;
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const data = await r.json().catch(() => ({}));
    if (r.status === 401) {
      signOut('Your session has ended (the token was rotated or removed, or it expired). Sign in again.');
      throw new SignedOut();
    }
    if (!r.ok) throw new Error((data.error && data.error.message) || r.status + ' ' + r.statusText);
    return data;
  }

  const convPath = (c, tail) => '/api/v1/conversations/' + encodeURIComponent(c.ref || c.id) + (tail ? '/' + tail : '');

  function prep(c) {
    c._rank = RANK[c.urgency] ?? 9;
    c._due = ms(c.first_response_due);
    c._created = ms(c.created_at);
    c._hay = [c.ref, who(c.customer), c.customer && c.customer.address, c.subject, c.preview, c.assignee]
      .filter(Boolean).join(' ').toLowerCase();
    return c;
  }

  function upsert(c) {
    const old = S.convs.get(c.id);
    S.convs.set(c.id, prep(c));
    S.dirty.add(c.id);
    return old;
  }

  /** The working set, page by page; the first page is painted as soon as it
   * arrives. What events brought meanwhile is kept; what neither the pages nor
   * the events mention (closed or gone while we were away) is dropped. */
  async function load() {
    const gen = ++S.loadGen;
    const seen = new Set();
    S.touched = new Set();
    for (const status of ['open', 'pending']) {
      let cursor = '';
      do {
        const url = `/api/v1/conversations?status=${status}&limit=${seen.size ? PAGE : FIRST_PAGE}&cursor=${encodeURIComponent(cursor)}`;
        const early = url === S.early.url && (await S.early.page);
        S.early = {};
        const page = early || await api('GET', url);
        if (gen !== S.loadGen) return;
        for (const c of page.conversations) { upsert(c); seen.add(c.id); }
        render();
        cursor = page.next_cursor;
      } while (cursor && seen.size < MAX_WORKING);
    }
    for (const [id, c] of S.convs) if (c.status !== 'closed' && !seen.has(id) && !S.touched.has(id)) S.convs.delete(id);
    // Also when the page starts on the Closed view it remembered: nothing else would load it.
    if (S.closed.loaded || S.f.status === 'closed') await loadClosed(false);
    render();
  }

  async function loadClosed(more) {
    const cursor = more ? S.closed.cursor : '';
    const page = await api('GET', `/api/v1/conversations?status=closed&limit=200&cursor=${encodeURIComponent(cursor || '')}`);
    page.conversations.forEach(upsert);
    S.closed = { loaded: true, cursor: page.next_cursor };
    schedule();
  }

  // -- live events -------------------------------------------------------------

  function connect() {
    const es = new EventSource('/api/v1/events');
    S.es = es;
    es.onopen = () => {
      S.retry = 0;
      setLive(true);
      if (S.stale) {
        S.stale = false;
        load().catch(failed);
        if (S.thread) openConv(S.thread.conv.id, true);
      }
    };
    es.onerror = () => {
      if (S.es !== es) return;
      es.close();
      S.es = null;
      S.stale = true;
      setLive(false);
      S.retryTimer = setTimeout(reconnect, backoff());
    };
    for (const type of EVENTS) {
      es.addEventListener(type, (ev) => onEvent(type, JSON.parse(ev.data)));
    }
  }

  const backoff = () => Math.min(5000, 250 * 2 ** S.retry++);

  /** After the stream broke: signed out (401), or the daemon is back, or try later. */
  async function reconnect() {
    if (!S.me) return;
    let r = null;
    try { r = await fetch('/session', { credentials: 'same-origin' }); } catch { r = null; }
    if (!S.me) return;
    if (r && r.status === 401) return signOut('Your session has ended (the token was rotated or removed, or it expired). Sign in again.');
    if (r && r.ok) {
      setSession(await r.json());
      connect();
      return;
    }
    S.retryTimer = setTimeout(reconnect, backoff());
  }

  function setLive(on) {
    $('live').className = 'live ' + (on ? 'on' : 'off');
    $('live-text').textContent = on ? 'Live' : 'Reconnecting…';
  }

  function onEvent(type, data) {
    if (type.startsWith('conversation.')) {
      const old = upsert(data);
      S.touched.add(data.id);
      if (data.urgency === 'critical' && data.status !== 'closed' && (!old || old.urgency !== 'critical')) alarm(data);
      if (S.thread && S.thread.conv.id === data.id) {
        S.thread.conv = data;
        renderHead();
      }
      schedule();
    } else if (S.thread && data.conversation_id === S.thread.conv.id) {
      S.thread.msgs.set(data.id, data);
      renderMsg(data);
    }
  }

  function alarm(c) {
    S.alerts = [c.id, ...S.alerts.filter((id) => id !== c.id)];
    S.flash.add(c.id);
    setTimeout(() => { S.flash.delete(c.id); S.dirty.add(c.id); schedule(); }, 8000);
    if (S.sound) beep();
  }

  function beep() {
    try {
      const ctx = S.audio || (S.audio = new AudioContext());
      const t = ctx.currentTime;
      for (const [at, hz] of [[0, 880], [0.18, 660]]) {
        const osc = ctx.createOscillator();
        const gain = ctx.createGain();
        osc.frequency.value = hz;
        gain.gain.setValueAtTime(0.0001, t + at);
        gain.gain.exponentialRampToValueAtTime(0.25, t + at + 0.02);
        gain.gain.exponentialRampToValueAtTime(0.0001, t + at + 0.16);
        osc.connect(gain).connect(ctx.destination);
        osc.start(t + at);
        osc.stop(t + at + 0.17);
      }
    } catch { /* no audio device: the banner still shows */ }
  }

  // -- the list ----------------------------------------------------------------

  function inView(c, view) {
    if (view === 'mine') return c.assignee === S.me.name;
    if (view === 'team') return S.me.teams.includes(c.team);
    if (view === 'unassigned') return !c.assignee;
    return true;
  }

  function passes(c, skip) {
    const f = S.f;
    if (S.q && !c._hay.includes(S.q)) return false;
    if (skip !== 'view' && !inView(c, f.view)) return false;
    if (skip !== 'status' && c.status !== f.status) return false;
    if (skip !== 'urgency' && f.urgency && c.urgency !== f.urgency) return false;
    return skip === 'channel' || !f.channel || c.channel === f.channel;
  }

  /** Inbox order (SPEC 4): urgency, first-response due (none last), created, id. */
  function order(a, b) {
    return a._rank - b._rank
      || (a._due === null) - (b._due === null)
      || (a._due ?? a._created) - (b._due ?? b._created)
      || a._created - b._created
      || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  }

  /** Per option, how many match it with the other filters as they are. */
  function tally() {
    const t = { view: { all: 0, mine: 0, team: 0, unassigned: 0 }, status: { open: 0, pending: 0, closed: 0 }, urgency: { '': 0 }, channel: { '': 0 } };
    for (const c of S.convs.values()) {
      if (passes(c, 'view')) for (const [v] of VIEWS) if (inView(c, v)) t.view[v]++;
      if (passes(c, 'status')) t.status[c.status]++;
      if (passes(c, 'urgency')) { t.urgency['']++; t.urgency[c.urgency] = (t.urgency[c.urgency] || 0) + 1; }
      if (passes(c, 'channel')) { t.channel['']++; t.channel[c.channel] = (t.channel[c.channel] || 0) + 1; }
    }
    return t;
  }

  function schedule() {
    if (!S.frame) S.frame = requestAnimationFrame(render);
  }

  function render() {
    cancelAnimationFrame(S.frame);
    S.frame = 0;
    if (!S.me) return;
    S.list = [...S.convs.values()].filter((c) => passes(c, null)).sort(order);
    renderFilters(tally());
    renderList();
    renderAlert();
    const critical = [...S.convs.values()].filter((c) => c.urgency === 'critical' && c.status === 'open').length;
    document.title = (critical ? `(${critical} critical) ` : '') + 'Inbox · support-router';
    if (!S.painted && S.list.length) {
      S.painted = true;
      requestAnimationFrame(() => setTimeout(() => performance.mark('inbox-painted')));
    }
  }

  function renderFilters(t) {
    const label = (s) => s[0].toUpperCase() + s.slice(1);
    const closedCount = S.closed.loaded ? t.status.closed + (S.closed.cursor ? '+' : '') : '';
    const channels = [...new Set([...S.channels.map((ch) => ch.name), ...Object.keys(t.channel).filter(Boolean)])];
    $('filters').replaceChildren(
      group('View', 'view', VIEWS.map(([v, l]) => [v, l, t.view[v]])),
      group('Status', 'status', STATUSES.map((s) => [s, label(s), s === 'closed' ? closedCount : t.status[s]])),
      group('Urgency', 'urgency', [['', 'Any', t.urgency['']], ...URGENCIES.map((u) => [u, label(u), t.urgency[u] || 0])]),
      group('Channel', 'channel', [['', 'Any', t.channel['']], ...channels.map((ch) => [ch, ch, t.channel[ch] || 0])]),
    );
    $('listtitle').textContent = VIEWS.find(([v]) => v === S.f.view)[1] + ' · ' + S.f.status;
    $('listcount').textContent = S.list.length + (S.list.length === 1 ? ' conversation' : ' conversations');
    $('empty').hidden = S.list.length > 0;
    $('more').hidden = !(S.f.status === 'closed' && S.closed.cursor);
  }

  function group(name, dim, options) {
    return h('section', { class: 'fgroup' }, h('h3', {}, name),
      options.map(([value, text, count]) => h('button', {
        class: 'fbtn' + (dim === 'urgency' && value ? ' fu-' + value : ''), 'aria-pressed': String(S.f[dim] === value),
        'data-dim': dim, 'data-value': value,
      }, dim === 'channel' && value ? chanEl(value) : h('span', { class: 'flabel' }, text), h('span', { class: 'fcount' }, String(count)))));
  }

  function setFilter(dim, value) {
    S.f[dim] = value;
    localStorage.setItem('inbox.filter', JSON.stringify(S.f));
    document.body.classList.remove('filters-open');
    if (dim === 'status' && value === 'closed' && !S.closed.loaded) loadClosed(false).catch(failed);
    render();
  }

  function rowEl(c) {
    const cls = ['row', 'u-' + c.urgency, 'st-' + c.status];
    if (c.id === S.sel) cls.push('sel');
    if (c.id === S.open) cls.push('current');
    if (S.flash.has(c.id)) cls.push('flash');
    return h('li', { class: cls.join(' '), id: 'row-' + c.id, role: 'option', 'data-id': c.id, 'aria-selected': String(c.id === S.sel) },
      h('div', { class: 'r1' }, badge(c.urgency), h('span', { class: 'cust' }, who(c.customer)),
        h('span', { class: 'cat' }, CATEGORY[c.category] || c.category), slaEl(c)),
      h('div', { class: 'r2' }, h('span', { class: 'subj' }, title(c)), h('span', { class: 'age', title: 'created ' + when(c.created_at) }, age(c.created_at))),
      h('div', { class: 'r3' }, h('span', { class: 'ref' }, c.ref), chanEl(c.channel), h('span', { class: 'team' }, c.team || 'no team'),
        h('span', { class: 'asg' + (c.assignee ? '' : ' none') }, c.assignee ? [icon('user'), c.assignee] : 'unassigned'),
        c.status !== 'open' ? h('span', { class: 'stchip' }, c.status) : null));
  }

  /** Windowed and keyed: the rows in view, rebuilt only when their
   * conversation changed, in order after a spacer as tall as the rows above. */
  function renderList() {
    const ul = $('list');
    const box = $('scroller');
    const n = S.list.length;
    const first = Math.max(0, Math.floor(box.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(n, Math.ceil((box.scrollTop + (box.clientHeight || 900)) / ROW_H) + OVERSCAN);
    ul.style.height = n * ROW_H + 'px';
    ul.style.paddingTop = first * ROW_H + 'px';
    const shown = S.list.slice(first, last);
    const want = new Set(shown.map((c) => c.id));
    for (const [id, el] of S.rows) {
      if (!want.has(id) || S.dirty.has(id)) { el.remove(); S.rows.delete(id); }
    }
    S.dirty.clear();
    let at = ul.firstChild;
    shown.forEach((c, i) => {
      let el = S.rows.get(c.id);
      if (!el) S.rows.set(c.id, (el = rowEl(c)));
      el.setAttribute('aria-posinset', String(first + i + 1));
      el.setAttribute('aria-setsize', String(n));
      if (el === at) at = at.nextSibling;
      else ul.insertBefore(el, at);
    });
  }

  function tick() {
    for (const [id, el] of S.rows) {
      const c = S.convs.get(id);
      if (!c) continue;
      el.querySelector('.sla').replaceWith(slaEl(c));
      el.querySelector('.age').textContent = age(c.created_at);
    }
    const head = document.querySelector('#chead .sla');
    if (head && S.thread) head.replaceWith(slaEl(S.thread.conv));
  }

  function renderAlert() {
    S.alerts = S.alerts.filter((id) => { const c = S.convs.get(id); return c && c.urgency === 'critical' && c.status === 'open'; });
    const box = $('alert');
    box.hidden = !S.alerts.length;
    if (!S.alerts.length) return;
    const c = S.convs.get(S.alerts[0]);
    const more = S.alerts.length > 1 ? ` (+${S.alerts.length - 1} more)` : '';
    box.replaceChildren(icon('shield'),
      h('div', { class: 'alert-body' }, h('strong', {}, 'New critical conversation' + more),
        h('span', { class: 'alert-text' }, `${c.ref} · ${who(c.customer)} — ${title(c)}`)),
      h('button', { class: 'alert-open', onclick: () => openConv(c.id) }, 'Open'),
      h('button', { class: 'icon-btn', 'aria-label': 'Dismiss', title: 'Dismiss', onclick: () => { S.alerts = []; renderAlert(); } }, icon('x')));
  }

  function select(id, scroll) {
    const prev = S.sel && S.rows.get(S.sel);
    if (prev) { prev.classList.remove('sel'); prev.setAttribute('aria-selected', 'false'); }
    S.sel = id;
    const i = S.list.findIndex((c) => c.id === id);
    const box = $('scroller');
    if (scroll && i >= 0) {
      if (i * ROW_H < box.scrollTop) box.scrollTop = i * ROW_H;
      else if ((i + 1) * ROW_H > box.scrollTop + box.clientHeight) box.scrollTop = (i + 1) * ROW_H - box.clientHeight;
      renderList();
    }
    const el = id && S.rows.get(id);
    if (!el) return;
    el.classList.add('sel');
    el.setAttribute('aria-selected', 'true');
  }

  function move(step) {
    if (!S.list.length) return;
    const i = S.list.findIndex((c) => c.id === S.sel);
    const next = i < 0 ? 0 : Math.max(0, Math.min(S.list.length - 1, i + step));
    select(S.list[next].id, true);
  }

  // -- one conversation ----------------------------------------------------------

  async function openConv(key, quiet) {
    const token = ++S.opening;
    const known = S.convs.get(key);
    if (known) select(known.id, !quiet);
    if (!quiet) document.body.classList.add('viewing');
    let data;
    try { data = await api('GET', '/api/v1/conversations/' + encodeURIComponent(known ? known.ref : key)); } catch (e) { return failed(e); }
    if (token !== S.opening) return;
    const { messages, ...conv } = data;
    const previous = S.open;
    S.open = conv.id;
    S.alerts = S.alerts.filter((id) => id !== conv.id);
    upsert(conv);
    if (previous) S.dirty.add(previous);
    S.thread = { conv, msgs: new Map(messages.map((m) => [m.id, m])) };
    history.replaceState(null, '', '#/c/' + encodeURIComponent(conv.ref));
    renderConv();
    render();
    select(conv.id, !quiet);
  }

  function renderConv() {
    const c = S.thread.conv;
    const thread = h('div', { class: 'thread', id: 'thread' }, [...S.thread.msgs.values()].map(msgEl));
    const reply = h('textarea', {
      id: 'reply', rows: 3, 'aria-label': 'Reply',
      placeholder: `Reply to ${who(c.customer)} through ${c.channel} — Ctrl+Enter sends`,
      oninput: (e) => S.drafts.set(c.id, e.target.value),
      onkeydown: (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); sendReply(); } },
    });
    reply.value = S.drafts.get(c.id) || '';
    const composer = h('form', { class: 'composer', onsubmit: (e) => { e.preventDefault(); sendReply(); } }, reply,
      h('div', { class: 'cbar' }, h('span', { class: 'muted' }, 'Goes out through ', chanEl(c.channel)),
        h('button', { type: 'submit', class: 'primary', id: 'send' }, icon('send'), 'Send')));
    $('conv').replaceChildren(h('header', { id: 'chead', class: 'chead' }), thread, composer);
    renderHead();
    thread.scrollTop = thread.scrollHeight;
  }

  function renderHead() {
    const c = S.thread.conv;
    const head = $('chead');
    if (!head) return;
    const agentNames = S.agents.map((a) => a.name);
    if (c.assignee && !agentNames.includes(c.assignee)) agentNames.push(c.assignee);
    const assign = h('select', { id: 'assignee', title: 'Assignee', 'aria-label': 'Assignee', onchange: (e) => act(c, 'assign', { agent: e.target.value || null }) },
      h('option', { value: '' }, 'Unassigned'),
      agentNames.map((name) => h('option', { value: name, selected: name === c.assignee }, 'Assignee: ' + name)));
    const urgency = h('select', { id: 'urgency', 'aria-label': 'Urgency', onchange: (e) => act(c, 'urgency', { urgency: e.target.value }) },
      URGENCIES.map((u) => h('option', { value: u, selected: u === c.urgency }, 'Urgency: ' + u)));
    head.replaceChildren(
      h('div', { class: 'ctitle' },
        h('button', { class: 'icon-btn back', 'aria-label': 'Back to the list', onclick: back }, icon('back')),
        badge(c.urgency), h('h2', {}, title(c))),
      h('div', { class: 'cmeta' }, h('span', { class: 'ref' }, c.ref), chanEl(c.channel),
        h('span', { class: 'cust' }, icon('user'), who(c.customer)),
        c.customer.address && c.customer.address !== who(c.customer) ? h('span', { class: 'muted' }, c.customer.address) : null,
        h('span', {}, CATEGORY[c.category] || c.category), h('span', {}, 'team ' + (c.team || '–')), slaEl(c)),
      h('p', { class: 'reason' }, h('strong', {}, 'Why ' + c.urgency + ': '), c.reason || 'no triage reason recorded'),
      h('div', { class: 'actions' },
        h('div', { class: 'seg', role: 'group', 'aria-label': 'Status' },
          STATUSES.map((s) => h('button', { class: 'st-' + s, 'aria-pressed': String(c.status === s), onclick: () => act(c, 'status', { status: s }) }, s[0].toUpperCase() + s.slice(1)))),
        h('button', { class: 'ghost', id: 'assign-me', disabled: c.assignee === S.me.name, onclick: () => act(c, 'assign', { agent: S.me.name }) }, 'Assign to me'),
        assign, urgency));
  }

  function msgEl(m) {
    const label = m.kind === 'customer' ? who(m.sender) : m.kind === 'agent' ? (m.author || who(m.sender)) : 'Automatic acknowledgement';
    return h('article', { class: 'msg k-' + m.kind, id: 'msg-' + m.id, 'data-kind': m.kind },
      h('header', { class: 'mhead' },
        h('span', { class: 'who' }, icon(m.kind === 'customer' ? 'user' : m.kind === 'agent' ? 'send' : 'check'), label),
        h('span', { class: 'kind' }, m.kind === 'agent' ? 'agent' : m.kind),
        chanEl(m.channel),
        h('time', { datetime: m.received_at, title: when(m.received_at) }, age(m.received_at) + ' ago'),
        m.delivery ? delivery(m) : null),
      m.subject && m.kind === 'customer' && m.subject !== S.thread.conv.subject ? h('p', { class: 'msubj' }, m.subject) : null,
      m.kind === 'ack'
        ? h('details', { class: 'acktext' }, h('summary', {}, 'What the customer was sent'), h('div', { class: 'text' }, m.text))
        : h('div', { class: 'text' }, m.text),
      m.html ? formatted(m) : null,
      m.quoted ? h('details', { class: 'quoted' }, h('summary', {}, 'Quoted history'), h('pre', {}, m.quoted)) : null,
      m.history && m.history.length ? h('details', { class: 'quoted' },
        h('summary', {}, `Edited by the customer: ${m.history.length} earlier ${m.history.length === 1 ? 'version' : 'versions'}`),
        m.history.map((earlier) => h('pre', {}, earlier))) : null,
      m.attachments && m.attachments.length ? h('ul', { class: 'atts' }, m.attachments.map((a) =>
        h('li', {}, icon('clip'), h('span', { class: 'fname' }, a.filename || '(unnamed)'), h('span', { class: 'muted' }, `${a.content_type} · ${size(a.size)}`)))) : null,
      m.direction === 'in' && m.reason ? h('p', { class: 'triage' }, h('strong', {}, `Triage: ${m.urgency} · ${CATEGORY[m.category] || m.category}`), ' — ', m.reason) : null);
  }

  /** The sanitized HTML version, on request: the text is what agents read first. */
  function formatted(m) {
    const body = h('div', { class: 'html', hidden: true });
    const toggle = h('button', { class: 'link', type: 'button', onclick: () => {
      if (!body.childNodes.length) body.innerHTML = m.html; // sanitized by the server (nh3)
      body.hidden = !body.hidden;
      toggle.textContent = body.hidden ? 'Show formatted version' : 'Hide formatted version';
    } }, 'Show formatted version');
    return h('div', { class: 'fmt' }, toggle, body);
  }

  function delivery(m) {
    const d = m.delivery;
    const mark = { queued: 'clock', sent: 'check', failed: 'x', dead: 'x' }[d.status] || 'clock';
    const retryable = d.status === 'failed' || d.status === 'dead';
    return h('span', { class: 'dlv d-' + d.status, 'data-status': d.status },
      icon(mark), h('span', { class: 'dstatus' }, d.status),
      d.error && d.status !== 'sent' ? h('span', { class: 'derr', title: d.error }, d.error) : null,
      d.status === 'queued' && d.attempts ? h('span', { class: 'muted' }, `attempt ${d.attempts + 1}`) : null,
      retryable ? h('button', { class: 'retry', onclick: () => retry(m) }, icon('retry'), 'Retry') : null);
  }

  function renderMsg(m) {
    const old = document.getElementById('msg-' + m.id);
    const el = msgEl(m);
    if (old) return old.replaceWith(el);
    const thread = $('thread');
    if (!thread) return;
    const atEnd = thread.scrollHeight - thread.scrollTop - thread.clientHeight < 80;
    thread.append(el);
    if (atEnd || m.direction === 'out') thread.scrollTop = thread.scrollHeight;
  }

  async function sendReply() {
    if (!S.thread) return;
    const c = S.thread.conv;
    const box = $('reply');
    const text = box.value;
    if (!text.trim()) return box.focus();
    $('send').disabled = true;
    try {
      const m = await api('POST', convPath(c, 'messages'), { text });
      box.value = '';
      S.drafts.delete(c.id);
      if (S.thread && S.thread.conv.id === c.id && !S.thread.msgs.has(m.id)) {
        S.thread.msgs.set(m.id, m);
        renderMsg(m);
      }
    } catch (e) { failed(e); } finally { $('send').disabled = false; }
  }

  async function retry(m) {
    try {
      const fresh = await api('POST', '/api/v1/messages/' + encodeURIComponent(m.id) + '/retry');
      const now = S.thread && S.thread.msgs.get(m.id);
      if (now && (now.delivery.status === 'failed' || now.delivery.status === 'dead')) {
        S.thread.msgs.set(m.id, fresh);
        renderMsg(fresh);
      }
    } catch (e) { failed(e); }
  }

  async function act(c, what, body) {
    try {
      const conv = await api('POST', convPath(c, what), body);
      upsert(conv);
      if (S.thread && S.thread.conv.id === conv.id) { S.thread.conv = conv; renderHead(); }
      schedule();
      return conv;
    } catch (e) {
      failed(e);
      if (S.thread && S.thread.conv.id === c.id) renderHead();
      return null;
    }
  }

  /** `e`: close the open conversation (else the selected one) and go on to the next. */
  async function closeCurrent() {
    const c = S.thread ? S.thread.conv : S.convs.get(S.sel);
    if (!c || c.status === 'closed') return;
    const i = S.list.findIndex((x) => x.id === c.id);
    const done = await act(c, 'status', { status: 'closed' });
    if (!done) return;
    toast(`${c.ref} closed`);
    render();
    const next = S.list[Math.min(Math.max(i, 0), S.list.length - 1)];
    if (next && S.thread && S.thread.conv.id === c.id) openConv(next.id);
    else if (next) select(next.id, true);
  }

  async function focusReply() {
    if (!S.thread || S.thread.conv.id !== S.sel) {
      if (!S.sel) return;
      await openConv(S.sel);
    }
    const box = $('reply');
    if (box) box.focus();
  }

  function resetConv() {
    S.thread = null;
    S.open = null;
    $('conv').replaceChildren(h('div', { class: 'placeholder' }, h('p', {}, 'Select a conversation'),
      h('p', { class: 'muted' }, h('kbd', {}, 'j'), ' ', h('kbd', {}, 'k'), ' to move, ', h('kbd', {}, 'Enter'), ' to open, ', h('kbd', {}, '?'), ' for all keys')));
  }

  function back() {
    document.body.classList.remove('viewing');
    $('scroller').focus();
    schedule();
  }

  // -- session -----------------------------------------------------------------

  function setSession(sess) {
    S.me = sess.agent;
    S.csrf = sess.csrf;
    S.channels = sess.channels;
  }

  function start(sess) {
    setSession(sess);
    $('signin').hidden = true;
    $('app').hidden = false;
    $('me').replaceChildren(icon('user'), sess.agent.name);
    $('scroller').focus();
    setLive(false);
    connect();
    const wanted = location.hash.startsWith('#/c/') ? decodeURIComponent(location.hash.slice(4)) : null;
    load().then(() => wanted && openConv(wanted)).catch(failed);
    api('GET', '/api/v1/agents').then((d) => { S.agents = d.agents; if (S.thread) renderHead(); }).catch(failed);
  }

  function signOut(message) {
    if (S.es) S.es.close();
    clearTimeout(S.retryTimer);
    Object.assign(S, { me: null, csrf: '', es: null, stale: false, list: [], alerts: [], sel: null, painted: false, closed: { loaded: false, cursor: null } });
    S.convs.clear();
    S.rows.clear();
    S.drafts.clear();
    S.loadGen++;
    $('list').replaceChildren();
    $('scroller').scrollTop = 0;
    resetConv();
    history.replaceState(null, '', location.pathname);
    document.title = 'Sign in · support-router';
    $('app').hidden = true;
    $('signin').hidden = false;
    $('signin-error').textContent = message || '';
    $('token').focus();
  }

  async function signIn(ev) {
    ev.preventDefault();
    const button = ev.target.querySelector('button');
    button.disabled = true;
    try {
      const r = await fetch('/session', {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ token: $('token').value.trim() }),
      });
      const data = await r.json().catch(() => ({}));
      if (!r.ok) {
        $('signin-error').textContent = (data.error && data.error.message) || 'Sign-in failed';
        return;
      }
      $('token').value = '';
      start(data);
    } catch {
      $('signin-error').textContent = 'Cannot reach the server.';
    } finally { button.disabled = false; }
  }

  async function signOutClicked() {
    try { await api('DELETE', '/session'); } catch (e) { if (e instanceof SignedOut) return; }
    signOut('Signed out.');
  }

  // -- keys and wiring ---------------------------------------------------------

  function toggleHelp(show) {
    $('help').hidden = show === undefined ? !$('help').hidden : !show;
  }

  function onKey(e) {
    const t = e.target;
    const typing = t.closest && t.closest('input, textarea, select');
    if (e.key === 'Escape') {
      if (!$('help').hidden) return toggleHelp(false);
      if (typing) return t.blur();
      return back();
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey || !S.me) return;
    if (e.key === 'Enter' && t.closest('button')) return;
    const run = {
      j: () => move(1), k: () => move(-1), Enter: () => S.sel && openConv(S.sel), r: focusReply,
      e: closeCurrent, a: () => { const c = S.thread && S.thread.conv; if (c) act(c, 'assign', { agent: S.me.name }); },
      '/': () => $('search').focus(), '?': () => toggleHelp(),
    }[e.key];
    if (run) { e.preventDefault(); run(); }
  }

  function setSound(on) {
    S.sound = on;
    localStorage.setItem('inbox.sound', on ? '1' : '0');
    const button = $('sound');
    button.setAttribute('aria-pressed', String(on));
    button.replaceChildren(icon(on ? 'bell' : 'bell-off'));
    button.title = on ? 'Sound on critical: on' : 'Sound on critical: off';
  }

  function wire() {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', signOutClicked);
    $('filters').addEventListener('click', (e) => {
      const b = e.target.closest('button[data-dim]');
      if (b) setFilter(b.dataset.dim, b.dataset.value);
    });
    $('list').addEventListener('click', (e) => {
      const row = e.target.closest('li[data-id]');
      if (row) openConv(row.dataset.id);
    });
    $('scroller').addEventListener('scroll', () => {
      if (!S.scrolling) S.scrolling = requestAnimationFrame(() => { S.scrolling = 0; renderList(); });
    }, { passive: true });
    window.addEventListener('resize', schedule);
    window.addEventListener('hashchange', () => {
      if (S.me && location.hash.startsWith('#/c/')) openConv(decodeURIComponent(location.hash.slice(4)));
    });
    $('search').addEventListener('input', (e) => { S.q = e.target.value.trim().toLowerCase(); schedule(); });
    $('more').addEventListener('click', () => loadClosed(true).catch(failed));
    $('sound').addEventListener('click', () => { setSound(!S.sound); if (S.sound) beep(); });
    $('help-btn').addEventListener('click', () => toggleHelp());
    $('help-close').addEventListener('click', () => toggleHelp(false));
    $('help').addEventListener('click', (e) => { if (e.target === $('help')) toggleHelp(false); });
    $('menu').addEventListener('click', () => document.body.classList.toggle('filters-open'));
    document.addEventListener('keydown', onKey);
    setSound(S.sound);
    setInterval(tick, 15000);
  }

  /** The first page is asked for alongside the session, one round trip sooner. */
  function fetchEarly() {
    const url = `/api/v1/conversations?status=open&limit=${FIRST_PAGE}&cursor=`;
    const page = fetch(url, { credentials: 'same-origin' }).then((r) => (r.ok ? r.json() : null)).catch(() => null);
    S.early = { url, page };
  }

  async function boot() {
    wire();
    fetchEarly();
    try {
      const r = await fetch('/session', { credentials: 'same-origin' });
      if (r.ok) return start(await r.json());
    } catch { /* the daemon is down: sign-in shows and says so when tried */ }
    signOut('');
  }

  boot();
})();
