// Connection indicator for the page's WebSocket, and the download button's enabled state.
(function () {
  function setConnected(connected) {
    var dot = document.getElementById("connection-dot");
    var label = document.getElementById("connection-label");
    var box = document.getElementById("connection-status");
    if (!dot || !label) return;
    dot.className = "w-2 h-2 rounded-full " + (connected ? "bg-emerald-400" : "bg-red-500");
    label.textContent = connected ? "Connected" : "Reconnecting…";
    box.dataset.state = connected ? "connected" : "disconnected";
  }
  document.addEventListener("htmx:wsOpen", function () { setConnected(true); });
  document.addEventListener("htmx:wsClose", function () { setConnected(false); });
  document.addEventListener("htmx:wsError", function () { setConnected(false); });

  function syncDownloadButton() {
    var input = document.getElementById("id_repo_id");
    var button = document.getElementById("download-button");
    if (input && button) button.disabled = input.value.trim() === "";
  }
  document.addEventListener("input", function (event) {
    if (event.target && event.target.id === "id_repo_id") syncDownloadButton();
  });
  document.addEventListener("htmx:afterSwap", syncDownloadButton);
  document.addEventListener("DOMContentLoaded", syncDownloadButton);

  // Modals: close on the X, on Escape and on a click on the backdrop itself.
  function closeModal() {
    var modal = document.getElementById("modal");
    if (modal) modal.innerHTML = "";
  }
  document.addEventListener("click", function (event) {
    if (event.target.closest(".modal-close") || (event.target.classList && event.target.classList.contains("modal-overlay"))) closeModal();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") closeModal();
  });

  // Extraction dialog: Select All / Deselect All, and Start only once a dataset, a layer
  // and a hook are chosen (the server checks every bound again).
  function syncStartButton() {
    var form = document.getElementById("extract-form");
    var button = document.getElementById("start-extraction");
    if (!form || !button) return;
    var dataset = form.querySelector("[name=dataset_id]");
    button.disabled = !(dataset && dataset.value) ||
      !form.querySelector("[name=layers]:checked") || !form.querySelector("[name=hook_types]:checked");
  }
  document.addEventListener("click", function (event) {
    var all = event.target.closest(".layers-all"), none = event.target.closest(".layers-none");
    if (!all && !none) return;
    document.querySelectorAll("#extract-form [name=layers]").forEach(function (box) { box.checked = !!all; });
    var first = document.querySelector("#extract-form [name=layers]");
    if (first) first.dispatchEvent(new Event("change", { bubbles: true }));  // refresh the estimates
    syncStartButton();
  });
  document.addEventListener("change", syncStartButton);
  document.addEventListener("htmx:afterSwap", syncStartButton);
})();
