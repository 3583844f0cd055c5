// clipsearch label pages: reviews (confirm / reject) sent through the JSON API so the page updates in place,
// and confirmation before deleting. Without JavaScript the same forms post and the server redirects back.
(function () {
  "use strict";

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-confirm]");
    if (button && !window.confirm(button.getAttribute("data-confirm"))) event.preventDefault();
  });

  function percent(x) { return Math.round(x * 100) + "%"; }

  function precisionText(p) {
    if (!p) return "no reviews yet: confirm (✓) or reject (✗) photos to teach this label and estimate its precision";
    return "about " + percent(p.precision) + " right: " + p.confirmed + " of " + p.reviewed + " reviewed photo" +
      (p.reviewed === 1 ? "" : "s") + " (95% interval " + Math.round(p.low * 100) + "–" + percent(p.high) + ")";
  }

  function setText(id, text) {
    var node = document.getElementById(id);
    if (node) node.textContent = text;
  }

  function showState(form, verdict, answer) {
    var card = form.closest(".card");
    if (card) {
      card.classList.remove("reviewed-confirm", "reviewed-reject");
      if (verdict) card.classList.add("reviewed-" + verdict);
    }
    form.querySelectorAll("button[name=verdict]").forEach(function (button) {
      if (button.value === "clear") button.hidden = !verdict;
      else button.setAttribute("aria-pressed", String(button.value === verdict));
    });
    var item = form.closest("li[data-label]");
    if (item && verdict === "reject" && !answer.holds_label) item.remove();
    else if (item && verdict === "confirm") form.replaceWith(document.createTextNode(" ✓ confirmed"));
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var url = form.getAttribute("data-review-url");
    if (!url || !window.fetch) return;
    var submitter = event.submitter;
    if (!submitter || submitter.name !== "verdict") return;
    event.preventDefault();
    var verdict = submitter.value === "clear" ? null : submitter.value;
    var imageId = Number(form.querySelector("input[name=image_id]").value);
    form.classList.add("busy");
    fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify({ image_id: imageId, verdict: verdict || "clear" })
    })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body.error ? body.error.message + (body.error.hint ? " — " + body.error.hint : "") : response.statusText);
          return body;
        });
      })
      .then(function (answer) {
        showState(form, verdict, answer);
        var q = answer.quality;
        setText("label-precision", precisionText(q.precision));
        setText("confirmed-count", String(q.confirmed));
        setText("rejected-count", String(q.rejected));
        setText("label-count", answer.photos + " photo" + (answer.photos === 1 ? "" : "s"));
      })
      .catch(function (error) { window.alert("Could not save the review: " + error.message); })
      .finally(function () { form.classList.remove("busy"); });
  });
})();
