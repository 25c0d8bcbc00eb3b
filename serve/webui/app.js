// The chat page of `llama serve`: plain JavaScript, no build step, no dependency.
//
// Safety rule: text from the model, the server or an imported file only ever enters the
// page as text nodes (`textContent`, `append(string)`) or as attributes this file sets
// itself; HTML is never parsed from a string. Links keep only http(s) and mailto targets.
// The server's Content-Security-Policy (no inline script, same-origin only) is the second
// wall.
'use strict';

(() => {
  const API_KEY_KEY = 'llama.apiKey';
  // Bounds on what the page keeps and accepts, so a large import or a runaway reply cannot
  // freeze the tab or fill the browser's storage unnoticed.
  const LIMITS = {
    importBytes: 20 * 1024 * 1024,
    conversations: 1000,
    messages: 10000,
    contentChars: 4 * 1024 * 1024,
    titleChars: 200,
    settingChars: 100000,
    inlineChars: 20000,
    quoteDepth: 8,
  };
  const BUSY_RETRY_MS = 120000;
  const RENDER_EVERY_MS = 50;
  const MODELS_EVERY_MS = 15000;
  const NUMERIC = {
    temperature: { id: 'temperature', min: 0, max: 5, int: false },
    top_p: { id: 'top-p', min: 0, max: 1, int: false },
    top_k: { id: 'top-k', min: 0, max: 1000, int: true },
    min_p: { id: 'min-p', min: 0, max: 1, int: false },
    max_tokens: { id: 'max-tokens', min: 1, max: 1000000, int: true },
    seed: { id: 'seed', min: 0, max: 4294967295, int: true },
  };

  const $ = (id) => document.getElementById(id);

  // An element with properties and children; strings become text nodes.
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  // ---- stored state ------------------------------------------------------------------

  const str = (v, max) => (typeof v === 'string' ? v.slice(0, max) : '');
  const num = (v, lo, hi, int) => (typeof v === 'number' && Number.isFinite(v) && v >= lo && v <= hi && (!int || Number.isInteger(v)) ? v : null);
  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 10);

  // Extra request fields: kept only when they are a JSON object.
  function cleanExtra(v) {
    const text = str(v, LIMITS.settingChars);
    try {
      const o = text.trim() ? JSON.parse(text) : null;
      return o && typeof o === 'object' && !Array.isArray(o) ? text : '';
    } catch (_) {
      return '';
    }
  }

  function cleanSettings(s) {
    const o = { system: str(s && s.system, LIMITS.settingChars), extra: cleanExtra(s && s.extra) };
    for (const [k, f] of Object.entries(NUMERIC)) o[k] = num(s && s[k], f.min, f.max, f.int);
    return o;
  }

  function cleanStats(s) {
    if (!s || typeof s !== 'object') return null;
    const o = {};
    for (const k of ['completion_tokens', 'prompt_tokens', 'tps', 'ttft_ms', 'ms']) o[k] = num(s[k], 0, 1e12, false);
    o.finish = str(s.finish, 40) || null;
    o.approximate = s.approximate === true;
    return o;
  }

  function cleanMessage(m) {
    if (!m || typeof m !== 'object' || (m.role !== 'user' && m.role !== 'assistant') || typeof m.content !== 'string') return null;
    const o = { role: m.role, content: m.content.slice(0, LIMITS.contentChars) };
    if (typeof m.reasoning === 'string' && m.reasoning) o.reasoning = m.reasoning.slice(0, LIMITS.contentChars);
    if (typeof m.error === 'string' && m.error) o.error = m.error.slice(0, 2000);
    const stats = cleanStats(m.stats);
    if (stats) o.stats = stats;
    return o;
  }

  // A conversation from storage or a file, or null when it is not one.
  function cleanConversation(c) {
    if (!c || typeof c !== 'object' || !Array.isArray(c.messages) || c.messages.length > LIMITS.messages) return null;
    const messages = c.messages.map(cleanMessage);
    if (messages.includes(null)) return null;
    const now = Date.now();
    return {
      id: typeof c.id === 'string' && /^[A-Za-z0-9_-]{1,64}$/.test(c.id) ? c.id : newId(),
      title: str(c.title, LIMITS.titleChars) || 'Untitled',
      created: num(c.created, 0, 1e15, true) ?? now,
      updated: num(c.updated, 0, 1e15, true) ?? now,
      model: str(c.model, 256) || null,
      settings: cleanSettings(c.settings),
      messages,
    };
  }

  // Storage: each conversation under its own key, so two tabs that change different
  // conversations never overwrite each other; the open conversation is per tab
  // (sessionStorage); the settings a new chat starts with and the last model are shared.
  const CONV_PREFIX = 'llama.chat.conv.';
  const PREFS_KEY = 'llama.chat.prefs';
  const CURRENT_KEY = 'llama.chat.current';

  // sessionStorage, or nothing where the browser blocks it (the page still works).
  const session = {
    get(k) {
      try {
        return sessionStorage.getItem(k);
      } catch (_) {
        return null;
      }
    },
    set(k, v) {
      try {
        if (v === null) sessionStorage.removeItem(k);
        else sessionStorage.setItem(k, v);
      } catch (_) {
        // Kept for this page view only.
      }
    },
  };

  function readPrefs() {
    try {
      const p = JSON.parse(localStorage.getItem(PREFS_KEY) || '{}') || {};
      return { defaults: cleanSettings(p.defaults), model: str(p.model, 256) || null };
    } catch (_) {
      return { defaults: cleanSettings({}), model: null };
    }
  }

  function readConversation(key) {
    try {
      return cleanConversation(JSON.parse(localStorage.getItem(key) || 'null'));
    } catch (_) {
      return null;
    }
  }

  function loadState() {
    const conversations = [];
    try {
      for (let i = 0; i < localStorage.length; i++) {
        const key = localStorage.key(i);
        if (!key || !key.startsWith(CONV_PREFIX)) continue;
        const c = readConversation(key);
        if (c && c.id === key.slice(CONV_PREFIX.length)) conversations.push(c);
      }
    } catch (e) {
      // Storage blocked (cookies off): the page works, nothing is kept.
      console.warn('localStorage unavailable', e);
    }
    conversations.sort((x, y) => y.updated - x.updated);
    const prefs = readPrefs();
    const want = session.get(CURRENT_KEY);
    const current = conversations.some((c) => c.id === want) ? want : conversations.length ? conversations[0].id : null;
    return { conversations: conversations.slice(0, LIMITS.conversations), current, defaults: prefs.defaults, model: prefs.model };
  }

  let state = loadState();
  const unsaved = new Set();
  let saveTimer = null;

  // Writes one conversation; false (and the reason shown) when the browser refused.
  function writeConversation(c) {
    try {
      localStorage.setItem(CONV_PREFIX + c.id, JSON.stringify(c));
      return true;
    } catch (e) {
      showBanner(`This browser would not store the conversation "${c.title}" (${e.name}): export it to keep it.`);
      return false;
    }
  }

  function flush() {
    clearTimeout(saveTimer);
    saveTimer = null;
    for (const c of unsaved) if (state.conversations.includes(c)) writeConversation(c);
    unsaved.clear();
  }

  // Stores `conv` now, or coalesced (while a reply streams in).
  function save(conv, now) {
    if (conv) unsaved.add(conv);
    if (now) flush();
    else if (!saveTimer) saveTimer = setTimeout(flush, 500);
  }

  function savePrefs() {
    try {
      localStorage.setItem(PREFS_KEY, JSON.stringify({ defaults: state.defaults, model: state.model }));
    } catch (_) {
      // Only the next chat's defaults are lost.
    }
  }

  function setCurrent(id) {
    state.current = id;
    session.set(CURRENT_KEY, id);
  }

  const current = () => state.conversations.find((c) => c.id === state.current) || null;

  function newConversation() {
    const now = Date.now();
    const c = { id: newId(), title: 'New chat', created: now, updated: now, model: selectedModel(), settings: cleanSettings(state.defaults), messages: [] };
    state.conversations.unshift(c);
    setCurrent(c.id);
    return c;
  }

  // ---- talking to the server -----------------------------------------------------------

  let models = [];
  let busy = null; // { controller, conv, msg } while a reply streams

  function headers(json) {
    const h = {};
    if (json) h['Content-Type'] = 'application/json';
    const key = session.get(API_KEY_KEY);
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function api(method, path, body, signal) {
    return fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body), signal, cache: 'no-store' });
  }

  // The error a response carries, in any of the server's dialects.
  async function errorOf(r) {
    const e = { status: r.status, message: `${r.status} ${r.statusText}`.trim(), code: null, retryAfter: Number(r.headers.get('Retry-After')) || null };
    try {
      const j = await r.json();
      const err = j && j.error;
      if (typeof err === 'string') e.message = err;
      else if (err && typeof err.message === 'string') {
        e.message = err.message;
        e.code = typeof err.code === 'string' ? err.code : null;
      }
    } catch (_) {
      // Not JSON: the status line says it.
    }
    return e;
  }

  function needKey(refused) {
    // Focus moves to the field only when the prompt appears, not on every poll after.
    const appearing = $('key-prompt').hidden;
    $('key-prompt').hidden = false;
    showBanner(refused ? 'The server refused the API key: enter the right one.' : 'This server needs an API key.');
    if (appearing) $('api-key').focus();
  }

  async function refreshModels() {
    let r;
    try {
      r = await api('GET', '/v1/models');
    } catch (e) {
      $('model-status').textContent = `server unreachable (${e.message})`;
      return;
    }
    if (r.status === 401) {
      needKey(Boolean(session.get(API_KEY_KEY)));
      return;
    }
    if (!r.ok) {
      const e = await errorOf(r);
      $('model-status').textContent = `models unavailable: ${e.message}`;
      return;
    }
    const j = await r.json().catch(() => null);
    models = cleanModels(j && Array.isArray(j.data) ? j.data : []);
    $('key-prompt').hidden = true;
    renderModels();
  }

  function selectedModel() {
    const v = $('model').value;
    return v || null;
  }

  // The models as the page uses them: each field of the type it expects, ids unique.
  function cleanModels(list) {
    const seen = new Set();
    const out = [];
    for (const m of list.slice(0, 1000)) {
      if (!m || typeof m.id !== 'string' || !m.id || seen.has(m.id)) continue;
      seen.add(m.id);
      const count = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
      out.push({
        id: m.id.slice(0, 256),
        status: typeof m.status === 'string' ? m.status.slice(0, 40) : 'unknown',
        reason: typeof m.reason === 'string' ? m.reason.slice(0, 300) : null,
        slots_busy: count(m.slots_busy),
        slots_total: count(m.slots_total),
        ctx_size: count(m.ctx_size),
      });
    }
    return out;
  }

  function describe(m) {
    if (!m) return '';
    const parts = [m.status];
    if (m.status === 'loaded' && m.slots_total !== null) parts.push(`${m.slots_busy || 0}/${m.slots_total} slots busy`);
    if (m.ctx_size !== null) parts.push(`context ${m.ctx_size}`);
    if (m.reason) parts.push(m.reason);
    return parts.join(' · ');
  }

  function renderModels() {
    const sel = $('model');
    const own = current() && current().model;
    const want = own || state.model || sel.value;
    // A conversation's model the server no longer lists stays picked, marked as such, rather
    // than the next message quietly going to another model.
    const shown = own && models.length && !models.some((m) => m.id === own) ? [...models, { id: own, status: 'not served', reason: null, slots_busy: null, slots_total: null, ctx_size: null }] : models;
    // Options are updated in place: replacing them would close a list the user has open.
    const have = new Map([...sel.options].map((o) => [o.value, o]));
    shown.forEach((m, i) => {
      const o = have.get(m.id) || el('option', { value: m.id });
      const label = `${m.id} (${m.status})`;
      if (o.textContent !== label) o.textContent = label;
      if (sel.options[i] !== o) sel.insertBefore(o, sel.options[i] || null);
      have.delete(m.id);
    });
    for (const o of have.values()) o.remove();
    if (shown.some((m) => m.id === want)) sel.value = want;
    const m = shown.find((x) => x.id === sel.value);
    $('model-status').textContent = describe(m);
  }

  // A pick loads the model now, so the first message does not wait for it.
  async function pickModel() {
    const id = selectedModel();
    state.model = id;
    savePrefs();
    const conv = current();
    if (conv) {
      conv.model = id;
      save(conv, true);
    }
    const m = models.find((x) => x.id === id);
    $('model-status').textContent = describe(m);
    if (!m || m.status === 'loaded' || m.status === 'loading') return;
    $('model-status').textContent = 'loading…';
    try {
      const r = await api('POST', '/models/load', { model: id });
      if (r.status === 401) needKey(true);
      else if (!r.ok) showBanner(`Could not load ${id}: ${(await errorOf(r)).message}`);
    } catch (e) {
      showBanner(`Could not reach the server: ${e.message}`);
    }
    await refreshModels();
  }

  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      if (signal.aborted) {
        reject(new DOMException('stopped', 'AbortError'));
        return;
      }
      const t = setTimeout(resolve, ms);
      signal.addEventListener('abort', () => {
        clearTimeout(t);
        reject(new DOMException('stopped', 'AbortError'));
      }, { once: true });
    });
  }

  // The request's body: the extra fields first, then what the page itself decides.
  function requestBody(conv, pending) {
    const s = conv.settings;
    const body = s.extra.trim() ? JSON.parse(s.extra) : {};
    const messages = [];
    if (s.system.trim()) messages.push({ role: 'system', content: s.system });
    for (const m of conv.messages) {
      if (m === pending || (m.role === 'assistant' && !m.content)) continue;
      messages.push({ role: m.role, content: m.content });
    }
    for (const k of Object.keys(NUMERIC)) if (s[k] !== null) body[k] = s[k];
    const model = selectedModel();
    if (model) body.model = model;
    body.messages = messages;
    body.stream = true;
    body.stream_options = { include_usage: true };
    return body;
  }

  // Stopped before anything arrived (while waiting to retry, or for a model to load).
  const stoppedEarly = () => cleanStats({ finish: 'stopped', completion_tokens: 0, approximate: true });

  async function generate(conv) {
    const msg = { role: 'assistant', content: '' };
    conv.messages.push(msg);
    conv.updated = Date.now();
    const controller = new AbortController();
    busy = { controller, conv, msg };
    try {
      renderAll();
      await converse(conv, msg, controller);
    } catch (e) {
      // A bug here must not leave the page stuck in "busy".
      msg.error = msg.error || `The page failed: ${e && e.message}`;
      console.error(e);
    } finally {
      busy = null;
      // The full render below shows the final text; a pending partial one must not follow it.
      clearTimeout(renderTimer);
      renderTimer = null;
      conv.updated = Date.now();
      save(conv, true);
      renderAll();
      announce(msg.error ? 'The reply failed.' : msg.stats && msg.stats.finish === 'stopped' ? 'Stopped.' : 'Reply complete.');
      refreshModels();
    }
  }

  // One reply: the request (retried while the server is busy), then its stream.
  async function converse(conv, msg, controller) {
    let body;
    try {
      body = requestBody(conv, msg);
    } catch (e) {
      msg.error = `The extra request fields are not valid JSON: ${e.message}`;
    }
    const started = performance.now();
    for (let attempt = 0; body; attempt++) {
      const t0 = performance.now();
      let r;
      try {
        r = await api('POST', '/v1/chat/completions', body, controller.signal);
      } catch (e) {
        if (e.name === 'AbortError') msg.stats = stoppedEarly();
        else msg.error = `Could not reach the server: ${e.message}`;
        break;
      }
      const e = r.ok ? null : await errorOf(r);
      // Busy (a full queue, no room to load) or loading: retried, backing off, for a while.
      // A model that failed to load or does not fit is not going to change by retrying.
      const passing = r.status === 503 && !['model_load_failed', 'insufficient_memory', 'engine_stopped', 'shutting_down', 'cancelled'].includes(e.code);
      // 1, 2, 4, 8, then 10 s between tries; longer when Retry-After asks, up to 10 s.
      const wait = Math.min(10, Math.max(e && e.retryAfter ? e.retryAfter : 1, 2 ** Math.min(attempt, 4)));
      if (passing && performance.now() - started + wait * 1000 <= BUSY_RETRY_MS) {
        const what = e.code === 'loading' ? 'The model is loading' : 'The server is busy';
        showBanner(`${what} (${e.message}); retrying in ${wait} s.`);
        try {
          await sleep(wait * 1000, controller.signal);
        } catch (_) {
          msg.stats = stoppedEarly();
          break;
        }
        continue;
      }
      if (!r.ok) {
        hideBanner();
        if (r.status === 401) needKey(Boolean(session.get(API_KEY_KEY)));
        msg.error = passing ? `The server stayed busy for ${BUSY_RETRY_MS / 1000} s (${e.message}). Try again later.` : `Error ${e.status}: ${e.message}`;
        break;
      }
      hideBanner();
      await readStream(r, msg, controller.signal, t0);
      break;
    }
    // A "retrying" notice must not outlive the retries (a key prompt's notice stays).
    if ($('key-prompt').hidden) hideBanner();
  }

  // Reads the server-sent events of a streamed chat completion into `msg`.
  async function readStream(r, msg, signal, t0) {
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let first = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    const onEvent = (block) => {
      for (const line of block.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]' || !data) continue;
        let j;
        try {
          j = JSON.parse(data);
        } catch (_) {
          continue;
        }
        if (!j || typeof j !== 'object') continue;
        if (j.error) msg.error = (typeof j.error === 'string' ? j.error : typeof j.error.message === 'string' ? j.error.message : 'the generation failed').slice(0, 2000);
        if (j.usage && typeof j.usage === 'object') usage = j.usage;
        const ch = Array.isArray(j.choices) ? j.choices[0] : null;
        if (!ch) continue;
        const d = ch.delta && typeof ch.delta === 'object' ? ch.delta : {};
        if (typeof d.content === 'string' && d.content) {
          first = first ?? performance.now();
          chunks++;
          msg.content = (msg.content + d.content).slice(0, LIMITS.contentChars);
        }
        if (typeof d.reasoning_content === 'string' && d.reasoning_content) {
          first = first ?? performance.now();
          msg.reasoning = ((msg.reasoning || '') + d.reasoning_content).slice(0, LIMITS.contentChars);
        }
        if (Array.isArray(d.tool_calls)) {
          for (const t of d.tool_calls) {
            const f = t && t.function;
            const name = f && typeof f.name === 'string' ? f.name : '';
            const args = f && typeof f.arguments === 'string' ? f.arguments : '';
            if (name || args) msg.content = (msg.content + `${name ? `\n[tool call ${name}] ` : ''}${args}`).slice(0, LIMITS.contentChars);
          }
        }
        if (typeof ch.finish_reason === 'string' && ch.finish_reason) finish = ch.finish_reason.slice(0, 40);
      }
    };
    let stopped = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          onEvent(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
        if (buf.length > 1024 * 1024) throw new Error('an event over 1 MiB');
        scheduleRender(msg);
        save(busy && busy.conv, false);
      }
      if (buf.trim()) onEvent(buf);
    } catch (e) {
      if (signal.aborted || e.name === 'AbortError') stopped = true;
      else msg.error = `The reply was cut off: ${e.message}`;
      // Whatever went wrong here, the server must not go on generating for nobody.
      reader.cancel().catch(() => {});
    }
    const end = performance.now();
    const n = usage && typeof usage.completion_tokens === 'number' ? usage.completion_tokens : chunks;
    const genSecs = first !== null ? (end - first) / 1000 : 0;
    msg.stats = {
      completion_tokens: n,
      prompt_tokens: usage && typeof usage.prompt_tokens === 'number' ? usage.prompt_tokens : null,
      // Generation speed: the tokens after the first over the time since the first.
      tps: n > 1 && genSecs > 0 ? (n - 1) / genSecs : null,
      ttft_ms: first !== null ? first - t0 : null,
      ms: end - t0,
      finish: stopped ? 'stopped' : finish || (msg.error ? 'error' : null),
      approximate: !usage,
    };
  }

  // ---- Markdown, as DOM nodes ------------------------------------------------------------

  // Only absolute http(s) and mailto targets become links.
  function safeUrl(href) {
    try {
      const u = new URL(href);
      if (u.protocol === 'http:' || u.protocol === 'https:' || u.protocol === 'mailto:') return u.href;
    } catch (_) {
      // Not an absolute URL.
    }
    return null;
  }

  // A link's label is Markdown without links: an anchor inside an anchor is not a link.
  function link(label, href, depth, raw) {
    const url = safeUrl(href);
    if (!url) return raw;
    return el('a', { href: url, target: '_blank', rel: 'noopener noreferrer nofollow' }, ...(label === href ? [label] : inline(label, depth + 1, true)));
  }

  // Inline Markdown of one paragraph: code spans, links, bold, italic, strike, bare URLs.
  // Nothing crosses a line, which keeps the matching linear in practice.
  const INLINE = /(?<!`)(`{1,16})([^`\n]+?)\1(?!`)|(!?)\[([^\][\n]{1,500})\]\(\s*([^()\s]{1,2000})\s*\)|\*\*([^*\s](?:[^*\n]*?[^*\s])?)\*\*|(?<![\w_])__([^_\s](?:[^_\n]*?[^_\s])?)__(?![\w_])|~~([^~\n]+?)~~|(?<![\w*])\*([^*\s](?:[^*\n]*?[^*\s])?)\*(?![\w*])|(?<![\w_])_([^_\s](?:[^_\n]*?[^_\s])?)_(?![\w_])|(https?:\/\/[^\s<>()[\]`]*[^\s<>()[\]`.,;:!?'"])/g;

  function inline(text, depth = 0, inLink = false) {
    if (depth > 6 || text.length > LIMITS.inlineChars) return [text];
    const out = [];
    const re = new RegExp(INLINE.source, 'g');
    let last = 0;
    let m;
    while ((m = re.exec(text))) {
      if (m.index > last) out.push(text.slice(last, m.index));
      if (m[1]) out.push(el('code', { text: m[2] }));
      else if (m[4] !== undefined) out.push(inLink ? m[0] : link(m[4], m[5], depth, m[0]));
      else if (m[6] !== undefined || m[7] !== undefined) out.push(el('strong', null, ...inline(m[6] ?? m[7], depth + 1, inLink)));
      else if (m[8] !== undefined) out.push(el('del', null, ...inline(m[8], depth + 1, inLink)));
      else if (m[9] !== undefined || m[10] !== undefined) out.push(el('em', null, ...inline(m[9] ?? m[10], depth + 1, inLink)));
      else if (m[11]) out.push(inLink ? m[0] : link(m[11], m[11], depth, m[0]));
      last = re.lastIndex;
    }
    if (last < text.length) out.push(text.slice(last));
    return out;
  }

  function codeBlock(code, lang) {
    const copy = el('button', { type: 'button', class: 'copy-code', text: 'Copy' });
    copy.addEventListener('click', async () => {
      copy.textContent = (await copyText(code)) ? 'Copied' : 'Copy failed';
      setTimeout(() => (copy.textContent = 'Copy'), 1500);
    });
    return el('div', { class: 'code-block' }, el('div', { class: 'code-head' }, el('span', { text: lang || 'code' }), copy), el('pre', null, el('code', { text: code })));
  }

  // Every block pattern matches in linear time: none ends a lazy or open-ended capture with
  // `$`, and no two runs that can match the same characters sit side by side with a way to
  // fail after them (a reply is re-parsed every 50 ms while it streams, so a pattern that
  // backtracks over a long line would freeze the tab).
  const LIST_ITEM = /^ {0,3}([-*+]|\d{1,9}[.)])[ \t]+([\s\S]*)/;
  const TABLE_RULE = /^\|? *:?-{2,}:? *(\| *:?-{2,}:? *)*\|?$/;
  const HEADING = /^ {0,3}(#{1,6})[ \t]+([\s\S]*)/;
  const RULE = /^ {0,3}([-*_])( *\1){2,} *$/;
  // Lines longer than this are paragraph text, whatever they start with.
  const BLOCK_LINE_CHARS = 8000;
  const cells = (line) => line.trim().replace(/^\|/, '').replace(/\|$/, '').split('|').map((c) => c.trim());

  // A heading's optional closing `#`s, cut by hand: the obvious regex backtracks
  // cubically on a long run of spaces.
  function closingHashes(text) {
    let end = text.length;
    while (end > 0 && /\s/.test(text[end - 1])) end--;
    let hashes = end;
    while (hashes > 0 && text[hashes - 1] === '#') hashes--;
    if (hashes < end && (hashes === 0 || /\s/.test(text[hashes - 1]))) end = hashes;
    return text.slice(0, end).trimEnd();
  }

  function markdown(src, depth = 0) {
    const frag = document.createDocumentFragment();
    const lines = src.replace(/\r\n?/g, '\n').split('\n');
    let para = [];
    // Inline Markdown never crosses a line: each line is parsed on its own.
    const flush = () => {
      if (para.length) frag.append(el('p', null, ...para.flatMap((l, k) => (k ? ['\n', ...inline(l)] : inline(l)))));
      para = [];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (line.length > BLOCK_LINE_CHARS) {
        para.push(line);
        i++;
      } else if ((m = /^ {0,3}(`{3,}|~{3,}) *([\w+#.-]{0,40})/.exec(line)) && !(m[1][0] === '`' && line.indexOf('`', m[0].length) >= 0)) {
        // (A backtick fence's info string holds no backtick: "```js x```" is inline code.)
        // It closes at a line of only the same fence character, at least as many; a fence
        // still open (a reply streaming in) runs to the end.
        flush();
        const fence = m[1];
        const closes = (l) => {
          const t = l.trim();
          return t.length >= fence.length && (fence[0] === '`' ? /^`+$/ : /^~+$/).test(t);
        };
        const body = [];
        for (i++; i < lines.length && !closes(lines[i]); i++) body.push(lines[i]);
        i++;
        frag.append(codeBlock(body.join('\n'), m[2]));
      } else if ((m = HEADING.exec(line))) {
        flush();
        frag.append(el(`h${m[1].length}`, null, ...inline(closingHashes(m[2]))));
        i++;
      } else if (RULE.test(line)) {
        flush();
        frag.append(el('hr'));
        i++;
      } else if (/^ {0,3}>/.test(line) && depth < LIMITS.quoteDepth) {
        flush();
        const quoted = [];
        for (; i < lines.length && /^ {0,3}>/.test(lines[i]) && lines[i].length <= BLOCK_LINE_CHARS; i++) quoted.push(lines[i].replace(/^ {0,3}> ?/, ''));
        frag.append(el('blockquote', null, markdown(quoted.join('\n'), depth + 1)));
      } else if ((m = LIST_ITEM.exec(line))) {
        flush();
        const ordered = /\d/.test(m[1]);
        const list = el(ordered ? 'ol' : 'ul', ordered && parseInt(m[1], 10) !== 1 ? { start: parseInt(m[1], 10) } : null);
        let mm;
        while (i < lines.length && lines[i].length <= BLOCK_LINE_CHARS && (mm = LIST_ITEM.exec(lines[i])) && /\d/.test(mm[1]) === ordered) {
          let item = mm[2];
          for (i++; i < lines.length && lines[i].length <= BLOCK_LINE_CHARS && /^ {2,}\S/.test(lines[i]) && !LIST_ITEM.exec(lines[i]); i++) item += `\n${lines[i].trim()}`;
          list.append(el('li', null, ...inline(item)));
        }
        frag.append(list);
      } else if (line.includes('|') && i + 1 < lines.length && lines[i + 1].length <= BLOCK_LINE_CHARS && TABLE_RULE.test(lines[i + 1].trim())) {
        flush();
        const head = el('tr', null, ...cells(line).map((c) => el('th', null, ...inline(c))));
        const rows = [];
        for (i += 2; i < lines.length && lines[i].length <= BLOCK_LINE_CHARS && lines[i].includes('|') && lines[i].trim(); i++) rows.push(el('tr', null, ...cells(lines[i]).map((c) => el('td', null, ...inline(c)))));
        frag.append(el('div', { class: 'table-wrap' }, el('table', null, el('thead', null, head), el('tbody', null, ...rows))));
      } else if (!line.trim()) {
        flush();
        i++;
      } else {
        para.push(line);
        i++;
      }
    }
    flush();
    return frag;
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) {
      // No clipboard API (a page not served from localhost or https): the old way.
      const ta = el('textarea', { readonly: true, class: 'visually-hidden' });
      ta.value = text;
      document.body.append(ta);
      ta.select();
      let ok = false;
      try {
        ok = document.execCommand('copy');
      } catch (_) {
        ok = false;
      }
      ta.remove();
      return ok;
    }
  }

  // ---- rendering ---------------------------------------------------------------------------

  const nodes = new WeakMap(); // message -> its element
  let renderTimer = null;

  function scheduleRender(msg) {
    if (renderTimer) return;
    renderTimer = setTimeout(() => {
      renderTimer = null;
      updateMessage(msg);
    }, RENDER_EVERY_MS);
  }

  function statsText(s) {
    const parts = [];
    const n = (v) => typeof v === 'number' && Number.isFinite(v);
    if (n(s.completion_tokens)) parts.push(`${s.approximate ? '≈' : ''}${s.completion_tokens} tokens`);
    if (n(s.tps)) parts.push(`${s.tps.toFixed(1)} tok/s`);
    if (n(s.prompt_tokens)) parts.push(`prompt ${s.prompt_tokens} tokens`);
    if (n(s.ttft_ms)) parts.push(`first token ${Math.round(s.ttft_ms)} ms`);
    if (typeof s.finish === 'string' && s.finish) parts.push(s.finish);
    return parts.join(' · ');
  }

  function fillMessage(node, msg, index, conv) {
    const streaming = busy && busy.msg === msg;
    const parts = [el('div', { class: 'role', text: msg.role === 'user' ? 'You' : 'Assistant' })];
    // A reasoning block the reader opened stays open through the re-renders.
    const wasOpen = Boolean(node.querySelector('details.reasoning[open]'));
    if (msg.reasoning) parts.push(el('details', { class: 'reasoning', open: wasOpen }, el('summary', { text: 'Reasoning' }), el('div', { text: msg.reasoning })));
    const body = el('div', { class: `body${streaming ? ' cursor' : ''}` });
    if (msg.role === 'user') body.textContent = msg.content;
    else body.append(markdown(msg.content));
    parts.push(body);
    if (msg.error) parts.push(el('div', { class: 'error', text: msg.error }));
    if (msg.stats && !streaming) parts.push(el('div', { class: 'stats', text: statsText(msg.stats) }));
    if (!streaming) {
      const actions = el('div', { class: 'actions' });
      if (msg.role === 'user') actions.append(el('button', { type: 'button', class: 'edit', text: 'Edit', disabled: Boolean(busy), onclick: () => editMessage(node, conv, index) }));
      if (msg.role === 'assistant') {
        actions.append(el('button', { type: 'button', class: 'copy-msg', text: 'Copy', onclick: async (e) => (e.target.textContent = (await copyText(msg.content)) ? 'Copied' : 'Copy failed') }));
        if (index === conv.messages.length - 1) actions.append(el('button', { type: 'button', class: 'regenerate', text: 'Regenerate', disabled: Boolean(busy), onclick: () => regenerate(conv) }));
      }
      parts.push(actions);
    }
    node.replaceChildren(...parts);
  }

  function updateMessage(msg) {
    const conv = current();
    const node = nodes.get(msg);
    if (!conv || !node || !node.isConnected) return;
    const box = $('messages');
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    fillMessage(node, msg, conv.messages.indexOf(msg), conv);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function renderMessages() {
    const conv = current();
    const box = $('messages');
    if (!conv || !conv.messages.length) {
      box.replaceChildren(el('p', { class: 'empty', text: 'Pick a model and send a message.' }));
      return;
    }
    box.replaceChildren(
      ...conv.messages.map((m, i) => {
        const node = el('div', { class: `msg ${m.role}`, 'data-index': i });
        nodes.set(m, node);
        fillMessage(node, m, i, conv);
        return node;
      }),
    );
    box.scrollTop = box.scrollHeight;
  }

  function renderConversations() {
    const list = $('conversations');
    // A title being edited is not thrown away by a render.
    if (list.querySelector('.conv-title-edit')) return;
    list.replaceChildren(
      ...state.conversations.map((c) => {
        const open = el('button', { type: 'button', class: 'conv-open', text: c.title, title: c.title, 'aria-current': c.id === state.current ? 'true' : null });
        open.addEventListener('click', () => openConversation(c.id));
        const li = el('li', { class: `conv${c.id === state.current ? ' current' : ''}`, 'data-id': c.id }, open);
        li.append(
          el('button', { type: 'button', class: 'conv-rename', text: '✎', title: 'Rename', 'aria-label': `Rename ${c.title}`, onclick: () => renameConversation(li, c) }),
          el('button', { type: 'button', class: 'conv-delete', text: '✕', title: 'Delete', 'aria-label': `Delete ${c.title}`, disabled: Boolean(busy && busy.conv === c), onclick: () => deleteConversation(c) }),
        );
        return li;
      }),
    );
  }

  function renderSettings() {
    // Not while the user is typing in them: a value not yet committed would be lost.
    if ($('settings').contains(document.activeElement)) return;
    const s = (current() || {}).settings || state.defaults;
    $('system-prompt').value = s.system;
    $('extra').value = s.extra;
    for (const [k, f] of Object.entries(NUMERIC)) $(f.id).value = s[k] === null ? '' : String(s[k]);
    $('settings-error').hidden = true;
  }

  function renderBusy() {
    $('send').hidden = Boolean(busy);
    $('stop').hidden = !busy;
    $('new-chat').disabled = false;
  }

  function renderAll() {
    renderConversations();
    renderMessages();
    renderSettings();
    renderBusy();
    renderModels();
  }

  // ---- actions -------------------------------------------------------------------------------

  function showBanner(text) {
    $('banner-text').textContent = text;
    $('banner').hidden = false;
  }

  function hideBanner() {
    $('banner').hidden = true;
  }

  // For screen readers: the end of a reply, not every re-render of it.
  function announce(text) {
    $('announce').textContent = text;
  }

  function openSidebar() {
    $('sidebar').classList.add('open');
    $('scrim').hidden = false;
    $('new-chat').focus();
  }

  function closeSidebar() {
    const sidebar = $('sidebar');
    if (!sidebar.classList.contains('open')) return;
    const hadFocus = sidebar.contains(document.activeElement);
    sidebar.classList.remove('open');
    $('scrim').hidden = true;
    if (hadFocus && getComputedStyle($('open-sidebar')).display !== 'none') $('open-sidebar').focus();
  }

  // A reply streaming in another conversation goes on (and is stored) in the background.
  function openConversation(id) {
    if (id !== state.current) {
      setCurrent(id);
      const conv = current();
      if (conv && conv.model && models.some((m) => m.id === conv.model)) $('model').value = conv.model;
      renderAll();
    }
    closeSidebar();
  }

  async function send() {
    const input = $('input');
    const text = input.value;
    if (busy || !text.trim()) return;
    if (text.length > LIMITS.contentChars) {
      showBanner('The message is too long for this page.');
      return;
    }
    const conv = current() || newConversation();
    if (!conv.messages.length || conv.title === 'New chat') conv.title = text.trim().replace(/\s+/g, ' ').slice(0, 60);
    conv.model = selectedModel();
    conv.messages.push({ role: 'user', content: text });
    input.value = '';
    await generate(conv);
  }

  function regenerate(conv) {
    if (busy) return;
    const last = conv.messages[conv.messages.length - 1];
    if (last && last.role === 'assistant') conv.messages.pop();
    generate(conv);
  }

  function editMessage(node, conv, index) {
    if (busy) return;
    const area = el('textarea', { class: 'edit-input', rows: 3 });
    area.value = conv.messages[index].content;
    const resend = () => {
      if (busy || !area.value.trim()) return;
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: 'user', content: area.value.slice(0, LIMITS.contentChars) });
      generate(conv);
    };
    area.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        resend();
      } else if (e.key === 'Escape') renderMessages();
    });
    const box = el(
      'div',
      { class: 'edit-box' },
      area,
      el('div', null, el('button', { type: 'button', class: 'edit-send primary', text: 'Save & send', onclick: resend }), el('button', { type: 'button', class: 'edit-cancel', text: 'Cancel', onclick: renderMessages })),
    );
    node.replaceChildren(el('div', { class: 'role', text: 'You' }), box);
    area.focus();
  }

  function renameConversation(li, c) {
    const input = el('input', { class: 'conv-title-edit', maxlength: LIMITS.titleChars, 'aria-label': 'Conversation title' });
    input.value = c.title;
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      if (keep && input.value.trim()) {
        c.title = input.value.trim().slice(0, LIMITS.titleChars);
        save(c, true);
      }
      input.remove();
      renderConversations();
    };
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') finish(true);
      else if (e.key === 'Escape') finish(false);
    });
    input.addEventListener('blur', () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  function deleteConversation(c) {
    if (busy && busy.conv === c) return;
    if (!window.confirm(`Delete "${c.title}"?`)) return;
    state.conversations = state.conversations.filter((x) => x !== c);
    try {
      localStorage.removeItem(CONV_PREFIX + c.id);
    } catch (_) {
      // Storage blocked: it was never stored.
    }
    if (state.current === c.id) setCurrent(state.conversations.length ? state.conversations[0].id : null);
    renderAll();
  }

  function download(conversations, name) {
    const data = { format: 'llama-chat', version: 1, exported: new Date().toISOString(), conversations };
    const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: 'application/json' }));
    const a = el('a', { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  function slug(s) {
    return s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '').slice(0, 40) || 'chat';
  }

  async function importFile(file) {
    if (file.size > LIMITS.importBytes) throw new Error(`the file is over ${LIMITS.importBytes / 1048576} MiB`);
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch (e) {
      throw new Error(`it is not JSON (${e.message})`);
    }
    const list = Array.isArray(data) ? data : data && Array.isArray(data.conversations) ? data.conversations : [data];
    if (!list.length) throw new Error('it holds no conversation');
    const cleaned = list.map(cleanConversation);
    const bad = cleaned.indexOf(null);
    if (bad >= 0) throw new Error(`conversation ${bad + 1} is not a conversation (each needs a "messages" list of {"role": "user"|"assistant", "content": text}, at most ${LIMITS.messages})`);
    if (state.conversations.length + cleaned.length > LIMITS.conversations) throw new Error(`this page keeps at most ${LIMITS.conversations} conversations`);
    // An id already here (the same export imported twice) gets a new one: nothing is
    // replaced.
    const taken = new Set(state.conversations.map((c) => c.id));
    const stored = (id) => {
      try {
        return localStorage.getItem(CONV_PREFIX + id) !== null;
      } catch (_) {
        return false;
      }
    };
    for (const c of cleaned) {
      if (taken.has(c.id) || stored(c.id)) c.id = newId();
      taken.add(c.id);
    }
    // All or nothing: a file the browser's storage cannot hold leaves no half import.
    const written = [];
    for (const c of cleaned) {
      if (!writeConversation(c)) {
        for (const w of written) localStorage.removeItem(CONV_PREFIX + w.id);
        throw new Error("the browser's storage is full (export and delete some conversations first)");
      }
      written.push(c);
    }
    state.conversations.unshift(...cleaned);
    setCurrent(cleaned[0].id);
    renderAll();
    return cleaned.length;
  }

  // A settings field changed: stored in the conversation (and as the next chat's default).
  function settingChanged() {
    const s = cleanSettings((current() || {}).settings || state.defaults);
    const errors = [];
    s.system = $('system-prompt').value.slice(0, LIMITS.settingChars);
    for (const [k, f] of Object.entries(NUMERIC)) {
      const raw = $(f.id).value.trim();
      if (!raw) {
        s[k] = null;
        continue;
      }
      const v = num(Number(raw), f.min, f.max, f.int);
      if (v === null) errors.push(`${$(f.id).parentElement.firstChild.textContent.trim()} must be ${f.int ? 'a whole number' : 'a number'} from ${f.min} to ${f.max}`);
      else s[k] = v;
    }
    const extra = $('extra').value;
    if (extra.trim()) {
      try {
        const v = JSON.parse(extra);
        if (!v || typeof v !== 'object' || Array.isArray(v)) errors.push('Extra request fields must be a JSON object');
        else s.extra = extra;
      } catch (e) {
        errors.push(`Extra request fields: ${e.message}`);
      }
    } else s.extra = '';
    $('settings-error').textContent = errors.join('. ');
    $('settings-error').hidden = !errors.length;
    const conv = current();
    if (conv) {
      conv.settings = s;
      save(conv, true);
    }
    state.defaults = cleanSettings(s);
    savePrefs();
  }

  // ---- wiring ----------------------------------------------------------------------------------

  function wire() {
    $('composer').addEventListener('submit', (e) => {
      e.preventDefault();
      send();
    });
    $('input').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      }
    });
    $('stop').addEventListener('click', () => busy && busy.controller.abort());
    $('new-chat').addEventListener('click', () => {
      // An empty new chat is stored with its first message.
      newConversation();
      renderAll();
      closeSidebar();
      $('input').focus();
    });
    $('model').addEventListener('change', pickModel);
    $('settings-toggle').addEventListener('click', () => {
      const open = $('settings').hidden;
      $('settings').hidden = !open;
      $('settings-toggle').setAttribute('aria-expanded', String(open));
    });
    $('settings-close').addEventListener('click', () => {
      $('settings').hidden = true;
      $('settings-toggle').setAttribute('aria-expanded', 'false');
    });
    for (const id of ['system-prompt', 'extra', ...Object.values(NUMERIC).map((f) => f.id)]) $(id).addEventListener('change', settingChanged);
    $('banner-close').addEventListener('click', hideBanner);
    $('key-prompt').addEventListener('submit', (e) => {
      e.preventDefault();
      const key = $('api-key').value.trim();
      if (!key) return;
      if (/[^\x21-\x7e]/.test(key)) {
        showBanner('An API key is printable ASCII without spaces.');
        return;
      }
      session.set(API_KEY_KEY, key);
      $('api-key').value = '';
      hideBanner();
      refreshModels();
    });
    $('export').addEventListener('click', () => {
      const c = current();
      if (!c) showBanner('There is no conversation to export.');
      else download([c], `llama-chat-${slug(c.title)}.json`);
    });
    $('export-all').addEventListener('click', () => download(state.conversations, 'llama-chats.json'));
    $('import-label').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        $('import-file').click();
      }
    });
    $('import-file').addEventListener('change', async (e) => {
      const file = e.target.files && e.target.files[0];
      e.target.value = '';
      if (!file) return;
      try {
        const n = await importFile(file);
        showBanner(`Imported ${n} conversation${n === 1 ? '' : 's'}.`);
      } catch (err) {
        showBanner(`Nothing was imported: ${err.message}.`);
      }
    });
    $('open-sidebar').addEventListener('click', openSidebar);
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') closeSidebar();
    });
    $('close-sidebar').addEventListener('click', closeSidebar);
    $('scrim').addEventListener('click', closeSidebar);
    // Another tab changed a conversation: take its copy, unless this tab is streaming a
    // reply into that one (this tab's copy is the newer then).
    window.addEventListener('storage', (e) => {
      if (e.key === PREFS_KEY) {
        const prefs = readPrefs();
        state.defaults = prefs.defaults;
        state.model = prefs.model;
        return;
      }
      if (!e.key || !e.key.startsWith(CONV_PREFIX)) return;
      const id = e.key.slice(CONV_PREFIX.length);
      if (busy && busy.conv.id === id) return;
      const fresh = e.newValue === null ? null : readConversation(e.key);
      const at = state.conversations.findIndex((c) => c.id === id);
      if (at >= 0) state.conversations.splice(at, 1);
      if (fresh && fresh.id === id) state.conversations.splice(at >= 0 ? at : 0, 0, fresh);
      if (id === state.current) {
        // Its messages, settings and model all change with it.
        if (!fresh) setCurrent(state.conversations.length ? state.conversations[0].id : null);
        renderAll();
      } else renderConversations();
    });
    setInterval(() => {
      if (!document.hidden) refreshModels();
    }, MODELS_EVERY_MS);
  }

  wire();
  renderAll();
  refreshModels();
})();
