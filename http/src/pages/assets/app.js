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
});
