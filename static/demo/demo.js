// The demo page's script: posts the forms to the API with fetch and draws the answers.
// Without it the forms post to the page itself, which renders the same answers on the server.
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("demo-config").textContent);
  var messages = config.messages;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      if (name === "text") node.textContent = attrs[name];
      else if (name === "style") node.style.cssText = attrs[name];
      else node.setAttribute(name, attrs[name]);
    });
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function show(target, node) {
    target.replaceChildren(node);
  }

  function errorNode(code) {
    return el("p", { class: "message message-error", role: "alert", text: messages[code] || messages.unknown });
  }

  function busyNode(text) {
    return el("p", { class: "message message-busy", text: text });
  }

  // POST a FormData to the API; resolves to the JSON body, or rejects with an error code.
  function postForm(url, data) {
    var headers = { Accept: "application/json" };
    // With API keys required, the page speaks for its logged-in staff user (a token only this page holds).
    if (config.demoToken) headers["X-Demo-Token"] = config.demoToken;
    return fetch(url, { method: "POST", body: data, headers: headers }).then(
      function (response) {
        return response.json().then(
          function (body) {
            if (response.ok) return body;
            throw { code: (body && body.error && body.error.code) || "unknown" };
          },
          function () {
            throw { code: response.status === 413 ? "request_too_large" : "unknown" };
          }
        );
      },
      function () {
        throw { code: "network" };
      }
    );
  }

  function heatStyle(value, low, high) {
    // clipsite/demo.py's heat_style draws the same scale for the page without script.
    var t = high === low ? 0.5 : (value - low) / (high - low);
    var lightness = Math.round(96 - 48 * t);
    return "background-color: hsl(205, 75%, " + lightness + "%); color: " + (t > 0.55 ? "#fff" : "#0b2540");
  }

  // Post a form's data to the API, showing a busy line, then the drawn answer or the error in words.
  function send(form, result, url, data, busyText, draw) {
    var button = form.querySelector("button[type=submit]");
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    show(result, busyNode(busyText));
    postForm(url, data)
      .then(
        function (body) {
          show(result, draw(body));
        },
        function (error) {
          show(result, errorNode(error.code));
        }
      )
      .then(function () {
        button.disabled = false;
        form.setAttribute("aria-busy", "false");
      });
  }

  function tooLarge(file) {
    return file.size > config.maxFileBytes;
  }

  function wireDropzone(zone, onFiles) {
    ["dragenter", "dragover"].forEach(function (type) {
      zone.addEventListener(type, function (event) {
        event.preventDefault();
        zone.classList.add("is-over");
      });
    });
    ["dragleave", "drop"].forEach(function (type) {
      zone.addEventListener(type, function (event) {
        event.preventDefault();
        zone.classList.remove("is-over");
      });
    });
    zone.addEventListener("drop", function (event) {
      if (event.dataTransfer && event.dataTransfer.files.length) onFiles(event.dataTransfer.files);
    });
  }

  // --- What does it wear? ---------------------------------------------------------------------
  function wearablePanel() {
    var form = document.getElementById("wearable-form");
    var input = document.getElementById("wearable-file");
    var result = document.getElementById("wearable-result");
    var previewUrl = null;

    function answerNode(file, body) {
      if (previewUrl) URL.revokeObjectURL(previewUrl);
      previewUrl = URL.createObjectURL(file);
      var rows = body.scores.slice(0, 3).map(function (row) {
        var percent = Math.round(row.probability * 1000) / 10;
        return el("li", { class: "category" }, [
          el("div", { class: "category-head" }, [
            el("span", { class: "category-name", text: row.category }),
            el("span", { class: "category-numbers" }, [
              percent + "% ",
              el("span", { class: "quiet", text: "\u00b7 score " + row.score.toFixed(2) }),
            ]),
          ]),
          el("div", { class: "bar", "aria-hidden": "true" }, [
            el("span", { style: "width: " + Math.max(1, percent) + "%" }),
          ]),
        ]);
      });
      return el("div", { class: "wearable-answer" }, [
        el("figure", { class: "preview" }, [
          el("img", { src: previewUrl, alt: "Your photo: " + file.name }),
          el("figcaption", { text: file.name }),
        ]),
        el("ol", { class: "categories", "aria-label": "Best matching categories" }, rows),
      ]);
    }

    function run() {
      var file = input.files[0];
      if (!file) return show(result, errorNode("no_image"));
      if (tooLarge(file)) return show(result, errorNode("file_too_large"));
      var data = new FormData();
      data.append("image", file, file.name);
      send(form, result, config.wearableUrl, data, "Looking at " + file.name + "\u2026", function (body) {
        return answerNode(file, body);
      });
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      run();
    });
    input.addEventListener("change", run);
    wireDropzone(form.querySelector("[data-dropzone]"), function (files) {
      var transfer = new DataTransfer();
      transfer.items.add(files[0]);
      input.files = transfer.files;
      run();
    });
  }

  // --- Compare images and texts -----------------------------------------------------------------
  function comparePanel() {
    var form = document.getElementById("compare-form");
    var input = document.getElementById("compare-files");
    var list = document.getElementById("compare-file-list");
    var textarea = document.getElementById("compare-texts");
    var result = document.getElementById("compare-result");
    var chosen = []; // {file, url}

    function renderList() {
      list.hidden = chosen.length === 0;
      list.replaceChildren.apply(
        list,
        chosen.map(function (item, index) {
          var remove = el("button", { type: "button", "aria-label": "Remove " + item.file.name, text: "\u00d7" });
          remove.addEventListener("click", function () {
            URL.revokeObjectURL(item.url);
            chosen.splice(index, 1);
            renderList();
            input.focus();
          });
          return el("li", {}, [
            el("img", { src: item.url, alt: "" }),
            el("span", { class: "file-name", title: item.file.name, text: item.file.name }),
            remove,
          ]);
        })
      );
    }

    function add(files) {
      Array.prototype.forEach.call(files, function (file) {
        chosen.push({ file: file, url: URL.createObjectURL(file) });
      });
      input.value = ""; // the list holds them; choosing again adds more
      renderList();
    }

    function texts() {
      return textarea.value
        .split("\n")
        .map(function (line) {
          return line.trim();
        })
        .filter(Boolean);
    }

    function matrixNode(body, items, lines) {
      var matrix = body.similarity_matrix;
      var flat = [].concat.apply([], matrix);
      var low = Math.min.apply(null, flat);
      var high = Math.max.apply(null, flat);
      var head = el("tr", {}, [el("th", { scope: "col", text: "Image" })].concat(
        lines.map(function (text) {
          return el("th", { scope: "col", text: text });
        })
      ));
      var bestTexts = [];
      var rows = matrix.map(function (row, i) {
        var best = row.indexOf(Math.max.apply(null, row));
        bestTexts.push(lines[best]);
        var cells = row.map(function (score, j) {
          var children = [el("span", { class: "score", text: score.toFixed(2) })];
          if (j === best) children.push(el("span", { class: "visually-hidden", text: " (best)" }));
          var attrs = { style: heatStyle(score, low, high) };
          if (j === best) attrs.class = "best";
          return el("td", attrs, children);
        });
        var name = el("th", { scope: "row" }, [
          el("img", { class: "thumb", src: items[i].url, alt: "" }),
          el("span", { text: items[i].file.name }),
        ]);
        return el("tr", {}, [name].concat(cells));
      });
      var table = el("table", { class: "matrix" }, [
        el("caption", {
          id: "matrix-caption",
          text:
            "Similarity of each image (rows) with each text (columns), 100 \u00d7 cosine. " +
            "The best text for each image is outlined.",
        }),
        el("thead", {}, [head]),
        el("tbody", {}, rows),
      ]);
      var bestList = el(
        "ul",
        { class: "best-list" },
        items.map(function (item, i) {
          return el("li", {}, [
            el("strong", { text: item.file.name }),
            " ",
            el("span", { "aria-hidden": "true", text: "\u2192" }),
            el("span", { class: "visually-hidden", text: ":" }),
            " \u201c" + bestTexts[i] + "\u201d",
          ]);
        })
      );
      var fragment = document.createDocumentFragment();
      fragment.appendChild(
        el("div", { class: "table-scroll", role: "region", "aria-labelledby": "matrix-caption", tabindex: "0" }, [
          table,
        ])
      );
      fragment.appendChild(el("h3", { class: "best-title", text: "Best text for each image" }));
      fragment.appendChild(bestList);
      return fragment;
    }

    function run() {
      var items = chosen.slice();
      var lines = texts();
      if (!items.length || !lines.length) return show(result, errorNode("compare_incomplete"));
      if (items.some(function (item) { return tooLarge(item.file); })) return show(result, errorNode("file_too_large"));
      var data = new FormData();
      items.forEach(function (item, i) {
        data.append("image-" + (i + 1), item.file, item.file.name);
      });
      lines.forEach(function (text, j) {
        data.append("text-" + (j + 1), text);
      });
      var busyText = "Comparing " + items.length + " \u00d7 " + lines.length + "\u2026";
      send(form, result, config.embeddingsUrl, data, busyText, function (body) {
        return matrixNode(body, items, lines);
      });
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      run();
    });
    input.addEventListener("change", function () {
      add(input.files);
    });
    wireDropzone(form.querySelector("[data-dropzone]"), add);
  }

  document.querySelectorAll(".js-hint").forEach(function (hint) {
    hint.hidden = false;
  });
  wearablePanel();
  comparePanel();
})();
