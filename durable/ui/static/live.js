// Progressive enhancement: the pages work without this. With it, a page listens to the
// dashboard's server-sent events and, when told something changed, fetches itself again
// and swaps in its live regions ([data-live] elements with an id).
(function () {
  "use strict";
  var source = document.body.getAttribute("data-events");
  if (!source || !window.EventSource) return;
  var dot = document.getElementById("live");
  var pending = false, busy = false;
  function refresh() {
    if (busy) { pending = true; return; }
    busy = true;
    fetch(window.location.href, {headers: {"X-Requested-With": "live"}, credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh && fresh.innerHTML !== el.innerHTML) {
            // Keep what the reader opened (an expanded value) open.
            var open = Array.prototype.map.call(el.querySelectorAll("details"), function (d) { return d.open; });
            el.innerHTML = fresh.innerHTML;
            el.querySelectorAll("details").forEach(function (d, i) { if (open[i]) d.open = true; });
          }
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (pending) { pending = false; setTimeout(refresh, 250); }
      });
  }
  var events = new EventSource(source);
  // On every (re)connection: look once, for what changed while no stream was open.
  events.addEventListener("open", function () { if (dot) dot.className = "live on"; refresh(); });
  events.addEventListener("error", function () { if (dot) dot.className = "live"; });
  events.addEventListener("change", refresh);
})();
