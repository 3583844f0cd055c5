// clipsearch web UI: infinite scroll, search by dropped/pasted/chosen image. Pages work without it too.
(function () {
  "use strict";

  // --- Search by image: choose, drop or paste; the upload form posts and the server redirects to the results.
  var uploadForm = document.getElementById("upload-form");
  var imageInput = document.getElementById("image-input");
  function searchWithFiles(files) {
    if (!uploadForm || !imageInput || !files || !files.length) return false;
    var file = files[0];
    if (file.type && file.type.indexOf("image/") !== 0) {
      alert("That is not an image: drop or paste a JPEG, PNG, WebP, HEIC… file.");
      return false;
    }
    if (imageInput.files !== files) {
      var transfer = new DataTransfer();
      transfer.items.add(file);
      imageInput.files = transfer.files;
    }
    uploadForm.submit();
    return true;
  }
  if (imageInput) {
    imageInput.addEventListener("change", function () { searchWithFiles(imageInput.files); });
  }
  var dragDepth = 0;
  function hasFiles(event) {
    return event.dataTransfer && Array.prototype.indexOf.call(event.dataTransfer.types || [], "Files") >= 0;
  }
  document.addEventListener("dragenter", function (event) {
    if (!uploadForm || !hasFiles(event)) return;
    dragDepth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", function () {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) document.body.classList.remove("dragging");
  });
  document.addEventListener("dragover", function (event) {
    if (uploadForm && hasFiles(event)) event.preventDefault();
  });
  document.addEventListener("drop", function (event) {
    dragDepth = 0;
    document.body.classList.remove("dragging");
    if (!uploadForm || !hasFiles(event)) return;
    event.preventDefault();
    searchWithFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", function (event) {
    var data = event.clipboardData;
    if (!uploadForm || !data || !data.files || !data.files.length) return;
    if (searchWithFiles(data.files)) event.preventDefault();
  });

  // --- Filters apply as soon as a choice changes.
  var filtersForm = document.getElementById("filters-form");
  if (filtersForm) {
    filtersForm.addEventListener("change", function (event) {
      if (event.target.matches("select, input[type=checkbox]")) filtersForm.requestSubmit();
    });
  }

  // --- More results: fetch the next page from the JSON API when the "More results" link comes into view.
  var more = document.getElementById("more");
  var grid = document.getElementById("results");
  var template = document.getElementById("card-template");
  if (!more || !grid || !template || !("IntersectionObserver" in window) || !window.fetch) return;
  var loading = false;
  var divided = !!document.getElementById("weak-divider");
  var sortedByRelevance = new URL(more.href).searchParams.get("sort") === null;

  function card(hit) {
    var node = template.content.firstElementChild.cloneNode(true);
    var link = node.querySelector("a.thumb");
    link.href = hit.urls.page;
    link.title = hit.path + " — score " + hit.score.toFixed(3);
    var img = node.querySelector("img");
    img.src = hit.urls.thumbnail;
    img.alt = hit.name;
    node.querySelector(".name").textContent = hit.name;  // textContent: file names are never parsed as markup
    node.querySelector(".score").textContent = hit.score.toFixed(3);
    node.querySelector("a.like").href = hit.urls.similar;
    node.dataset.id = hit.id;
    if (hit.relevant === false) node.classList.add("weak");
    return node;
  }

  function loadMore() {
    if (loading || !more.dataset.api) return;
    loading = true;
    more.textContent = "Loading…";
    fetch(more.dataset.api, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
          return body;
        });
      })
      .then(function (page) {
        page.results.forEach(function (hit) {
          if (sortedByRelevance && !divided && hit.relevant === false) {
            var divider = document.createElement("div");
            divider.className = "divider";
            divider.id = "weak-divider";
            divider.textContent = "Less relevant results below";
            grid.appendChild(divider);
            divided = true;
          }
          grid.appendChild(card(hit));
        });
        if (page.next_offset === null) {
          more.remove();
          observer.disconnect();
          return;
        }
        var api = new URL(more.dataset.api, location.href);
        api.searchParams.set("offset", page.next_offset);
        more.dataset.api = api.pathname + api.search;
        var html = new URL(more.href, location.href);
        html.searchParams.set("offset", page.next_offset);
        more.href = html.pathname + html.search;
        more.textContent = "More results";
      })
      .catch(function (error) {
        more.textContent = "Could not load more results (" + error.message + "): click to retry";
      })
      .finally(function () { loading = false; });
  }

  var observer = new IntersectionObserver(function (entries) {
    if (entries.some(function (entry) { return entry.isIntersecting; })) loadMore();
  }, { rootMargin: "600px 0px" });
  observer.observe(more);
  more.addEventListener("click", function (event) { event.preventDefault(); loadMore(); });
})();
