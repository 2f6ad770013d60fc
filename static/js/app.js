// Connection indicator for the page's WebSocket, and the download button's enabled state.
(function () {
  // Socket messages swap cards out-of-band by id. A page applies only what it shows: a
  // card it does not list, or an added card for a list filtered to another model, is
  // skipped instead of raising htmx:oobErrorNoTarget.
  if (window.htmx) htmx.defineExtension("present", {
    transformResponse: function (text, xhr) {
      if (xhr) return text;  // an ordinary htmx response: swapped as asked
      var template = document.createElement("template");
      template.innerHTML = text;
      Array.prototype.slice.call(template.content.children).forEach(function (el) {
        var spec = el.getAttribute("hx-swap-oob") || "true";
        var colon = spec.indexOf(":");
        var target = colon >= 0 ? document.querySelector(spec.slice(colon + 1)) : (el.id ? document.getElementById(el.id) : null);
        var filter = target && target.getAttribute("data-model-filter");
        // An added card (or a format's row added to its snapshot's card) this page already
        // lists (it loaded after the row was made) is not added twice: the row's own updates keep the one it has.
        var card = (spec.indexOf("afterbegin:") === 0 || spec.indexOf("beforeend:") === 0) && el.firstElementChild;
        var listed = card && card.id && document.getElementById(card.id);
        // A filtered list takes no added card: it may not match (a reload or a new filter shows it).
        var narrowed = spec.indexOf("afterbegin:") === 0 && target && target.hasAttribute("data-filtered");
        // A whole list for other filters than the page shows now (the socket was opened with
        // the filters the page loaded with; they changed since) is not swapped in.
        var otherFilters = target && el.id && el.id === target.id &&
          (el.getAttribute("data-filtered") || "") !== (target.getAttribute("data-filtered") || "");
        if (!target || listed || narrowed || otherFilters || (filter && el.getAttribute("data-list-model") !== filter)) el.remove();
      });
      return template.innerHTML;
    }
  });
  function setConnected(connected) {
    var dot = document.getElementById("connection-dot");
    var label = document.getElementById("connection-label");
    var box = document.getElementById("connection-status");
    if (!dot || !label) return;
    dot.className = "w-2 h-2 rounded-full " + (connected ? "bg-emerald-400" : "bg-red-500");
    label.textContent = connected ? "Connected" : "Reconnecting…";
    box.dataset.state = connected ? "connected" : "disconnected";
  }
  // Only pages with a socket show the indicator; until it opens it says so, in grey.
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("connection-status");
    // (the class too: the attribute alone loses to the element's own display:flex)
    if (box && !document.querySelector("[ws-connect]")) { box.hidden = true; box.classList.add("hidden"); }
  });
  // The indicator follows the page's own socket, not one a dialog opens for a while.
  function pageSocket(event) { return event.target === document.querySelector("[ws-connect]"); }
  document.addEventListener("htmx:wsOpen", function (event) { if (pageSocket(event)) setConnected(true); });
  document.addEventListener("htmx:wsClose", function (event) { if (pageSocket(event)) setConnected(false); });
  document.addEventListener("htmx:wsError", function (event) { if (pageSocket(event)) setConnected(false); });

  // A started extraction: the dialog shows it until it leaves the queue, then opens its page.
  document.addEventListener("htmx:wsAfterMessage", function () {
    var started = document.querySelector("#start-status .extract-started");
    var row = started && started.querySelector("[id^=extraction-detail-]");
    if (row && row.dataset.status !== "queued" && !started.dataset.leaving) {
      started.dataset.leaving = "1";
      setTimeout(function () { window.location.assign(started.querySelector(".start-open").href); }, 600);
    }
  });
  // Start's refusal stays until the request changes (not only until the next estimate).
  var refusalShown = 0;
  document.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail && event.detail.target && event.detail.target.id === "start-status") refusalShown = Date.now();
  });
  function clearRefusal(event) {
    var status = document.getElementById("start-status");
    if (!status || !status.querySelector(".start-refusal") || !event.target.closest || !event.target.closest("#extract-form")) return;
    if (Date.now() - refusalShown > 100) status.innerHTML = "";
  }
  document.addEventListener("input", clearRefusal);
  document.addEventListener("change", clearRefusal);

  // A copy button copies the text of the element its data-copy names, and says so.
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.dataset.copy);
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent).then(function () { button.textContent = "Copied"; }, function () { button.textContent = "Select and copy"; });
  });

  function syncDownloadButton() {
    var input = document.getElementById("id_repo_id");
    var button = document.getElementById("download-button");
    // A refusal the estimate already knows (gated without a token, encoder-only, not
    // found) blocks Download until the repo id or the token changes it.
    var blocked = document.querySelector("#format-estimates [data-blocks-download]");
    if (input && button) button.disabled = input.value.trim() === "" || !!blocked;
  }
  document.addEventListener("input", function (event) {
    if (event.target && event.target.id === "id_repo_id") syncDownloadButton();
  });
  document.addEventListener("htmx:afterSwap", syncDownloadButton);
  document.addEventListener("DOMContentLoaded", syncDownloadButton);

  // Modals: take focus when they open, keep Tab inside, close on the X, on Escape and on a
  // click on the backdrop itself, and give focus back to what opened them.
  var opener = null;
  var FOCUSABLE = "a[href], button:not([disabled]), input:not([disabled]):not([type=hidden]), select:not([disabled]), " +
    "textarea:not([disabled]), summary, [tabindex]:not([tabindex='-1'])";
  function closeModal() {
    var modal = document.getElementById("modal");
    if (!modal || !modal.innerHTML) return;
    modal.innerHTML = "";
    if (opener && document.contains(opener)) opener.focus();
    opener = null;
  }
  document.addEventListener("htmx:beforeRequest", function (event) {
    var target = event.detail && event.detail.target;
    // A dialog that re-renders itself (a template loaded) keeps the opener it had.
    if (target && target.id === "modal" && !target.contains(event.detail.elt)) opener = event.detail.elt;
  });
  var modalFocusId = null;
  document.addEventListener("htmx:beforeRequest", function (event) {
    var target = event.detail && event.detail.target;
    modalFocusId = target && target.id === "modal" && target.contains(event.detail.elt) ? event.detail.elt.id || null : null;
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    if (!event.detail || !event.detail.target || event.detail.target.id !== "modal") return;
    var dialog = event.detail.target.querySelector("[role=dialog]") || event.detail.target;
    // Re-rendered from a control inside it: focus stays on that control; else the first one.
    var again = modalFocusId && document.getElementById(modalFocusId);
    var first = again && dialog.contains(again) ? again : dialog.querySelector(FOCUSABLE);
    if (first) first.focus();
    syncStartButton();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Tab") return;
    var modal = document.getElementById("modal");
    if (!modal || !modal.innerHTML) return;
    var items = Array.prototype.filter.call(modal.querySelectorAll(FOCUSABLE), function (el) { return el.offsetParent !== null; });
    if (!items.length) return;
    var first = items[0], last = items[items.length - 1];
    if (!modal.contains(document.activeElement)) { event.preventDefault(); first.focus(); }
    else if (event.shiftKey && document.activeElement === first) { event.preventDefault(); last.focus(); }
    else if (!event.shiftKey && document.activeElement === last) { event.preventDefault(); first.focus(); }
  });
  // Elements that act as buttons without being one answer Enter and Space as a button does.
  document.addEventListener("keydown", function (event) {
    var el = event.target.closest && event.target.closest("[role=button]:not(button)");
    if (!el) return;
    if (event.key === " ") event.preventDefault();  // no page scroll
    if (event.key === "Enter") { event.preventDefault(); el.click(); }
  });
  document.addEventListener("keyup", function (event) {
    var el = event.target.closest && event.target.closest("[role=button]:not(button)");
    if (el && event.key === " ") el.click();
  });
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
    // A run started from this dialog is followed here until its page opens: not a second.
    button.disabled = !!document.querySelector("#start-status .extract-started") || !(dataset && dataset.value) ||
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

  // After a swap replaced the focused control (a submitted form, a card's button), focus
  // stays in place: the control of the same id again, else the first one in what came in.
  var focusedId = null;
  document.addEventListener("htmx:beforeRequest", function () {
    focusedId = document.activeElement && document.activeElement !== document.body ? document.activeElement.id || null : null;
  });
  document.addEventListener("htmx:afterSettle", function (event) {
    // Only the answer to a request the user made; a live update never moves focus.
    if (!event.detail || !event.detail.xhr) return;
    if (document.activeElement && document.activeElement !== document.body) return;
    var again = focusedId && document.getElementById(focusedId);
    var target = event.detail && event.detail.target;
    var container = target && (document.contains(target) ? target : target.id && document.getElementById(target.id));
    var first = again && !again.disabled ? again : container && container.querySelector && container.querySelector(FOCUSABLE);
    if (first) first.focus();
  });

  // Tabs (role=tab): a click or Enter shows its panel; arrow keys move between tabs.
  function selectTab(tab) {
    var list = tab.closest("[role=tablist]");
    list.querySelectorAll("[role=tab]").forEach(function (other) {
      var on = other === tab;
      other.setAttribute("aria-selected", on ? "true" : "false");
      other.tabIndex = on ? 0 : -1;
      var panel = document.getElementById(other.getAttribute("aria-controls"));
      if (panel) panel.hidden = !on;
    });
    tab.focus();
  }
  document.addEventListener("click", function (event) {
    var tab = event.target.closest && event.target.closest("[role=tab]");
    if (tab) selectTab(tab);
  });
  document.addEventListener("keydown", function (event) {
    var tab = event.target.closest && event.target.closest("[role=tab]");
    if (!tab || (event.key !== "ArrowRight" && event.key !== "ArrowLeft")) return;
    var tabs = Array.prototype.slice.call(tab.closest("[role=tablist]").querySelectorAll("[role=tab]"));
    var next = tabs[(tabs.indexOf(tab) + (event.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
    event.preventDefault();
    selectTab(next);
  });
  document.addEventListener("htmx:afterSwap", syncStartButton);

  // Every POST is sent once and with the CSRF token. Cards and the detail page are rendered
  // once for every open page, without a request, so their own token field is empty: the
  // page's token is put in at submit. A second click while the first is in flight is
  // dropped, and each submit carries an Idempotency-Key the server answers once
  // (mistudio.hardening.AnswerOnce), for the clicks that get through anyway.
  function csrfToken() {
    var meta = document.querySelector("meta[name=csrf-token]");
    return meta ? meta.content : "";
  }
  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(16) + "-" + Math.random().toString(16).slice(2);
  }
  function hiddenField(form, name) {
    var field = form.querySelector("input[name=" + name + "]");
    if (!field) {
      field = document.createElement("input");
      field.type = "hidden";
      field.name = name;
      form.appendChild(field);
    }
    return field;
  }
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if ((form.getAttribute("method") || "").toLowerCase() !== "post" || form.hasAttribute("hx-post")) return;
    if (form.dataset.submitting) { event.preventDefault(); return; }
    var token = hiddenField(form, "csrfmiddlewaretoken");
    if (!token.value) token.value = csrfToken();
    hiddenField(form, "idempotency_key").value = newKey();
    form.dataset.submitting = "1";
    form.setAttribute("aria-busy", "true");
  }, true);
  window.addEventListener("pageshow", function () {  // back to a page kept in the cache
    document.querySelectorAll("form[data-submitting]").forEach(function (form) {
      delete form.dataset.submitting;
      form.removeAttribute("aria-busy");
    });
  });
  function userAction(event) {
    var trigger = event.detail && event.detail.requestConfig && event.detail.requestConfig.triggeringEvent;
    return trigger && (trigger.type === "submit" || trigger.type === "click");
  }
  function actionOf(elt) { return (elt.closest && elt.closest("form")) || elt; }
  document.addEventListener("htmx:configRequest", function (event) {
    if (event.detail.verb !== "post") return;
    event.detail.headers["X-CSRFToken"] = csrfToken();
    if (!event.detail.triggeringEvent || ["submit", "click"].indexOf(event.detail.triggeringEvent.type) < 0) return;
    var owner = actionOf(event.detail.elt);
    if (!owner.dataset.idempotencyKey) owner.dataset.idempotencyKey = newKey();
    event.detail.headers["Idempotency-Key"] = owner.dataset.idempotencyKey;
  });
  // htmx queues a click made while the element's request is in flight and sends it when
  // that one ends: a click older than the last answer is such a leftover, and is dropped.
  document.addEventListener("htmx:beforeRequest", function (event) {
    if (!userAction(event)) return;
    var owner = actionOf(event.detail.elt);
    var clickedAt = event.detail.requestConfig.triggeringEvent.timeStamp;
    if (owner.dataset.inFlight || clickedAt <= Number(owner.dataset.answeredAt || -1)) { event.preventDefault(); return; }
    owner.dataset.inFlight = "1";
    owner.setAttribute("aria-busy", "true");
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    var owner = event.detail && event.detail.elt && actionOf(event.detail.elt);
    if (!owner || !owner.dataset || !owner.dataset.inFlight) return;
    delete owner.dataset.inFlight;
    delete owner.dataset.idempotencyKey;
    owner.dataset.answeredAt = String(performance.now());
    owner.removeAttribute("aria-busy");
  });
})();
