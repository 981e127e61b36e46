/*! Millimetric snippet v1 */
// The readable source of GET /v1/a.js; the gateway minifies it at start (gateway/snippet.py).
//   <script src="https://HOST/v1/a.js" data-key="pk_live_..." defer></script>
// sends $pageview (on load and on history-API navigation), $pageleave (with the visible time
// when the page is hidden), and exposes millimetric.track/identify/reset/page.
(() => {
  "use strict";
  const script = document.currentScript;
  const existing = window.millimetric;
  if (!script || (existing && existing.version)) return; // not a <script src>, or loaded twice
  const options = script.dataset;
  const key = options.key || "";
  const host = (options.host || new URL(script.src).origin).replace(/\/+$/, "");
  const noop = () => {};
  const api = { version: 1, track: noop, identify: noop, reset: noop, page: noop };
  window.millimetric = api;

  if (!key.startsWith("pk_")) {
    // An sk_ or rk_ key in a page is readable by every visitor: never send it anywhere.
    const leaked = /^(sk|rk)_/.test(key) ? "; this secret key is exposed, revoke it" : "";
    console.error("millimetric: data-key must be a pk_ key" + leaked + ". Nothing is sent.");
    return;
  }
  const nav = navigator;
  const privacy = nav.doNotTrack === "1" || window.doNotTrack === "1" || nav.globalPrivacyControl;
  if (privacy && options.dnt !== "ignore") return; // Do-Not-Track or GPC: send and store nothing

  const BATCH = "/v1/batch";
  const MAX_BATCH = 50; // events per request: well under fetch keepalive's 64 KiB in flight
  const FLUSH_MS = 1000; // lets a page load's events share one request
  const MAX_ATTEMPTS = 10; // about four minutes of capped backoff, then the events are dropped
  const warn = (message) => console.warn("millimetric: " + message);

  // First-party storage of the visitor's ids: localStorage (default), a cookie, or none.
  const memory = {};
  const cookieSuffix =
    "; path=/; SameSite=Lax" +
    (options.cookieDomain ? "; domain=" + options.cookieDomain : "") +
    (location.protocol === "https:" ? "; Secure" : "");
  const storage = {
    get(name) {
      try {
        if (options.storage === "cookie") {
          const found = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
          return found ? decodeURIComponent(found[1]) : null;
        }
        return options.storage === "none" ? memory[name] || null : localStorage.getItem(name);
      } catch (error) {
        return memory[name] || null; // storage blocked: keep the ids for this page only
      }
    },
    set(name, value) {
      memory[name] = value;
      try {
        if (options.storage === "cookie") {
          const max = value === null ? 0 : 31536000;
          document.cookie = name + "=" + encodeURIComponent(value || "") + "; max-age=" + max + cookieSuffix;
        } else if (options.storage !== "none") {
          value === null ? localStorage.removeItem(name) : localStorage.setItem(name, value);
        }
      } catch (error) {
        // storage blocked: `memory` holds the value
      }
    },
  };

  // A random UUID v4 as 32 hex digits, like the gateway's (crypto.randomUUID needs https).
  const newId = () => {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 15) | 64;
    bytes[8] = (bytes[8] & 63) | 128;
    return Array.from(bytes, (b) => (b + 256).toString(16).slice(1)).join("");
  };
  const newAnonymousId = () => {
    const id = newId();
    storage.set("mm_aid", id);
    return id;
  };
  let anonymousId = storage.get("mm_aid") || newAnonymousId();
  let userId = storage.get("mm_uid");

  // The queue: {path, body} in order; consecutive /v1/batch bodies travel together.
  let queue = [];
  let timer = 0;
  let attempt = 0;
  let sending = false;

  const schedule = (ms) => {
    if (!timer && !sending) timer = setTimeout(flush, ms);
  };
  const take = () => {
    if (queue[0].path !== BATCH) return queue.splice(0, 1);
    let n = 0;
    while (n < queue.length && n < MAX_BATCH && queue[n].path === BATCH) n++;
    return queue.splice(0, n);
  };
  const request = (items) => [
    host + items[0].path + "?key=" + encodeURIComponent(key),
    // A string body goes as text/plain: a CORS-simple request, no preflight, beacon-safe.
    JSON.stringify(items[0].path === BATCH ? { events: items.map((i) => i.body) } : items[0].body),
  ];

  const flush = () => {
    timer = 0;
    if (sending || !queue.length) return;
    const items = take();
    const [url, body] = request(items);
    sending = true;
    fetch(url, { method: "POST", body, keepalive: true, credentials: "omit" })
      .then((response) => {
        if (response.status === 429 || response.status >= 500) throw response;
        attempt = 0;
        if (response.ok) return;
        return response
          .json()
          .catch(noop)
          .then((answer) => {
            const details = (answer && answer.details) || [];
            if (details.some((d) => d.field === "timestamp") && items[0].body.timestamp) {
              // This browser's clock is outside the server's window: let the server time them.
              for (const item of items) delete item.body.timestamp;
              queue = items.concat(queue);
              return;
            }
            // Any other 4xx will not heal by retrying: drop these events and say why.
            const reason = answer ? answer.error + ": " + answer.message : response.status;
            warn("dropped " + items.length + " event(s): " + reason);
          });
      })
      .catch(() => {
        // 429, 5xx or the network: put them back, retry with capped exponential backoff.
        if (++attempt >= MAX_ATTEMPTS) {
          warn("dropped " + items.length + " event(s) after " + attempt + " attempts");
          attempt = 0;
        } else {
          queue = items.concat(queue);
        }
      })
      .then(() => {
        sending = false;
        if (queue.length) schedule(attempt ? Math.min(30000, 1000 * 2 ** attempt) * (0.5 + Math.random() / 2) : 0);
      });
  };

  // The tab may be closing: hand everything queued to the browser, which sends it after we go.
  const flushFinal = () => {
    clearTimeout(timer);
    timer = 0;
    while (queue.length) {
      const [url, body] = request(take());
      if (!(nav.sendBeacon && nav.sendBeacon(url, body))) {
        fetch(url, { method: "POST", body, keepalive: true, credentials: "omit" }).catch(noop);
      }
    }
  };

  const enqueue = (event, properties, fields) => {
    const body = {
      event,
      event_id: newId(),
      // Sent with the event_id, so a retried event collapses with its first copy.
      timestamp: new Date().toISOString(),
      anonymous_id: anonymousId,
      url: location.href,
      path: location.pathname,
      properties: properties || {},
      ...fields,
    };
    if (userId) body.user_id = userId;
    queue.push({ path: BATCH, body });
    const full = queue.length >= MAX_BATCH && !attempt; // a full batch goes now, unless backing off
    if (full) clearTimeout(timer), (timer = 0);
    schedule(full ? 0 : FLUSH_MS);
    return body.event_id;
  };

  // Page views: one per URL (without the #fragment), and its $pageleave with the visible time.
  let page = null;
  const withoutHash = (url) => url.split("#")[0];
  const pageview = (referrer) => {
    const id = enqueue("$pageview", { title: document.title }, { referrer: referrer || undefined });
    const visible = document.visibilityState === "visible";
    page = { id, url: location.href, path: location.pathname, ms: 0, since: visible ? Date.now() : 0 };
  };
  const leave = () => {
    if (!page || page.left) return;
    if (page.since) page.ms += Date.now() - page.since;
    page.since = 0;
    page.left = true;
    enqueue("$pageleave", { pageview_id: page.id, duration_ms: page.ms }, { url: page.url, path: page.path });
  };
  const route = (always) => {
    if (!always && page && withoutHash(location.href) === withoutHash(page.url)) return;
    const from = page && page.url;
    leave();
    pageview(from);
  };
  for (const name of ["pushState", "replaceState"]) {
    const original = history[name];
    history[name] = function (...args) {
      const result = original.apply(this, args);
      route(false);
      return result;
    };
  }
  window.addEventListener("popstate", () => route(false));
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") {
      leave();
      flushFinal();
    } else if (page) {
      page.left = false;
      page.since = Date.now();
    }
  });
  window.addEventListener("pagehide", () => {
    leave();
    flushFinal();
  });
  window.addEventListener("pageshow", (event) => event.persisted && route(true)); // back/forward cache

  api.track = (event, properties) => {
    if (typeof event !== "string" || !event) return warn("track needs an event name");
    return enqueue(event, properties);
  };
  api.identify = (id, traits) => {
    if (!id) return warn("identify needs a user id");
    userId = String(id);
    storage.set("mm_uid", userId);
    const body = { anonymous_id: anonymousId, user_id: userId, traits: traits || {} };
    queue.push({ path: "/v1/identify", body: { ...body, timestamp: new Date().toISOString() } });
    schedule(FLUSH_MS);
  };
  api.reset = () => {
    userId = null;
    storage.set("mm_uid", null);
    anonymousId = newAnonymousId();
  };
  api.page = () => route(true);

  pageview(document.referrer);
})();
