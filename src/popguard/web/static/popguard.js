// popguard's web page, live: one Server-Sent Events stream per tab. On each event the
// page fetches itself again and swaps in the regions marked data-live, except one
// the operator is working in (an open action form, a focused or filled field), so it
// never reloads under an open form. Without this script the page refreshes itself.
"use strict";
(function () {
  const status = document.getElementById("live-status");
  const last = document.body.dataset.lastEvent || "0";
  let pending = null;
  const ICONS = { Healthy: "✔", Degraded: "▲", Unhealthy: "✖", Repairing: "⚙", Disabled: "○",
    Unknown: "?" };

  function busy(region) {
    if (region.contains(document.activeElement) && document.activeElement !== document.body) {
      return true;
    }
    for (const details of region.querySelectorAll("details[open]")) {
      if (details.querySelector("form")) return true;
    }
    for (const input of region.querySelectorAll("input:not([type=hidden]), select, textarea")) {
      if (input.type === "checkbox" ? input.checked : input.value !== input.defaultValue) {
        return true;
      }
    }
    return false;
  }

  async function refresh() {
    pending = null;
    let response;
    try {
      response = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
    } catch (error) {
      return;
    }
    if (!response.ok || response.redirected) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const region of document.querySelectorAll("[data-live][id]")) {
      const replacement = fresh.getElementById(region.id);
      if (replacement && !busy(region)) region.replaceWith(replacement);
    }
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }

  function soon() {
    if (pending === null) pending = setTimeout(refresh, 300);
  }

  function patchCell(data) {
    // A health set's cell changes at once; the rest follows with the refresh.
    const cell = document.querySelector(
      `[data-cell="${CSS.escape(data.server)}|${CSS.escape(data.health_set)}"] .state`);
    if (cell) {
      cell.className = `state s-${data.value}`;
      cell.textContent = `${ICONS[data.value] || "?"} ${data.value}`;
    }
  }

  function show(text) {
    if (status) status.textContent = text;
  }

  const stream = new EventSource(`/stream?last=${encodeURIComponent(last)}`);
  stream.onopen = () => show("live");
  stream.onerror = () => show("reconnecting…");
  for (const kind of ["state", "recovery", "alert", "move", "operator"]) {
    stream.addEventListener(kind, (event) => {
      const data = JSON.parse(event.data);
      document.body.dataset.lastEvent = event.lastEventId;
      if (kind === "state") patchCell(data);
      show(`live: ${data.text}`);
      soon();
    });
  }
  stream.addEventListener("reset", () => soon());
})();
