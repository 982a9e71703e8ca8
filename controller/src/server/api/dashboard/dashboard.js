// edgefleet dashboard: the little script it needs, no framework.
// 1. A <main data-live="ms"> is fetched again every so often and swapped in,
//    while the tab is visible and no form field in it has the focus.
// 2. A form with data-confirm asks before it posts.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var period = main && parseInt(main.getAttribute("data-live") || "0", 10);
  function busy() {
    var a = document.activeElement;
    return a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }
  function refresh() {
    if (document.hidden || busy()) return;
    fetch(location.href, { credentials: "same-origin", headers: { "x-edgefleet-live": "1" } })
      .then(function (r) {
        if (r.redirected || !r.ok) { return null; }
        return r.text();
      })
      .then(function (html) {
        if (!html) return;
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        if (next) { main.innerHTML = next.innerHTML; }
      })
      .catch(function () {});
  }
  if (period > 0) { setInterval(refresh, period); }
  document.addEventListener("submit", function (e) {
    var q = e.target.getAttribute("data-confirm");
    if (q && !window.confirm(q)) { e.preventDefault(); }
  });
})();
