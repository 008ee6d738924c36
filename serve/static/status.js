// The model line of the page: which model is live (GET /v1/model) and, while the demo trains one
// in the background, how far it got. Polled, so the line follows the switch-over without a reload.
(function () {
  "use strict";
  var line = document.getElementById("model-status");
  if (!line) { return; }

  function short(hash) { return hash ? String(hash).slice(0, 12) : "unknown"; }

  function describe(body) {
    var text = "model: " + (body.kind || "unknown") + " " + short(body.model);
    var t = body.training;
    if (t && t.state && t.state !== "live") {
      if (t.state === "failed") {
        text += " · background training failed: " + (t.error || "unknown error");
      } else {
        text += " · training a better model: " + t.state;
        if (t.state === "training" && t.epochs) { text += " (epoch " + (t.epoch || 0) + "/" + t.epochs + ")"; }
        if (typeof t.eta_s === "number") { text += ", about " + Math.max(1, Math.round(t.eta_s / 60)) + " min left"; }
      }
    }
    return { text: text, done: !t || t.state === "live" || t.state === "failed" };
  }

  function poll() {
    fetch("/v1/model").then(function (r) { return r.json(); }).then(function (body) {
      var d = describe(body);
      line.textContent = d.text;
      // Once training is over, one more look is enough: the server may still be switching.
      setTimeout(poll, d.done ? 30000 : 5000);
    }).catch(function () { setTimeout(poll, 10000); });
  }
  poll();
})();
