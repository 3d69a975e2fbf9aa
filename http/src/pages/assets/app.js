// tapgate pages: the little that needs a script. Everything works without it.
document.addEventListener("DOMContentLoaded", function () {
  // Receipts: a Print button.
  document.querySelectorAll("[data-print]").forEach(function (b) {
    b.addEventListener("click", function () { window.print(); });
  });
  // A pending top-up's page reloads itself until the load is completed or voided.
  var r = document.querySelector("[data-autorefresh]");
  if (r) {
    var ms = parseInt(r.getAttribute("data-autorefresh"), 10) || 5000;
    setTimeout(function () { window.location.reload(); }, ms);
  }
  // A live figure (block propagation on the gateway's console, a card's block reaching the
  // validators on the charging server's pages): [data-poll] fetches its JSON
  // every data-poll-ms and writes each of its "shown" texts into the page's [data-field=NAME].
  var live = document.querySelector("[data-poll]");
  if (live) {
    var url = live.getAttribute("data-poll");
    var every = parseInt(live.getAttribute("data-poll-ms"), 10) || 2000;
    var note = live.querySelector("[data-live-note]");
    if (note) { note.textContent = "Updating every " + every / 1000 + " seconds."; }
    var tick = function () {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (j) {
          if (!j || !j.shown) { return; }
          Object.keys(j.shown).forEach(function (k) {
            document.querySelectorAll('[data-field="' + k + '"]').forEach(function (e) {
              e.textContent = j.shown[k];
            });
          });
          var bar = live.querySelector("progress");
          if (bar) { bar.max = j.max; bar.value = j.holding; bar.textContent = j.shown.percent || j.shown.reach_percent; }
          // A table whose lines come with the figure ("rows": a list of cells, the first the
          // line's heading): its body is rebuilt as text (never markup).
          var body = live.querySelector("tbody[data-rows]");
          if (body && Array.isArray(j.rows)) {
            while (body.firstChild) { body.removeChild(body.firstChild); }
            j.rows.forEach(function (cells) {
              var tr = document.createElement("tr");
              cells.forEach(function (c, i) {
                var cell = document.createElement(i === 0 ? "th" : "td");
                if (i === 0) { cell.setAttribute("scope", "row"); }
                cell.textContent = c;
                tr.appendChild(cell);
              });
              body.appendChild(tr);
            });
          }
        })
        .catch(function () {});
    };
    setInterval(tick, every);
  }
});
