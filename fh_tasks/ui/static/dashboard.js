// fh-tasks jobs dashboard: keeps the page's live regions ([data-live] with an id) up to date.
// Job events arrive over Server-Sent Events (data-events); without them, or while the stream reconnects, it polls.
(function () {
  "use strict";
  var root = document.querySelector("[data-fh-dash]");
  if (!root) return;
  var timer = null, busy = false, again = false, polling = null;
  var every = Number(root.getAttribute("data-poll")) || 5000;

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { credentials: "same-origin", cache: "no-store", headers: { "X-FH-Tasks-Live": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh && fresh.innerHTML !== el.innerHTML) el.replaceWith(document.importNode(fresh, true));
        });
        root.setAttribute("data-updated", String(Date.now()));
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; soon(); } });
  }
  function soon() { if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, 700); }
  function poll(on) {
    if (on && !polling) polling = setInterval(refresh, every);
    if (!on && polling) { clearInterval(polling); polling = null; }
  }

  var url = root.getAttribute("data-events");
  if (url && window.EventSource) {
    var es = new EventSource(url);
    es.addEventListener("job", soon);
    es.onopen = function () { root.setAttribute("data-live-mode", "events"); poll(false); };
    es.onerror = function () { root.setAttribute("data-live-mode", "polling"); poll(true); };
  } else {
    root.setAttribute("data-live-mode", "polling");
    poll(true);
  }
  document.addEventListener("submit", function (e) {
    var msg = e.target.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) e.preventDefault();
  });
})();
