// tests/test_book.py appends this script to a copy of a built page, opens it in headless Chromium
// (--dump-dom) and reads back the JSON it leaves in <pre id="minilora-probe">: what a reader sees
// once MathJax has typeset the page.
(function () {
  var TEX = /\\\(|\\\)|\\\[|\\\]|\$\$|\\(frac|top|sum|mathrm|mathbf|text|cdot|alpha|sqrt|left|right|operatorname)\b/;
  function report() {
    var out = {}, article = document.querySelector(".bd-article") || document.body;
    out.window_width = window.innerWidth;
    out.page_width = document.documentElement.scrollWidth;
    out.column = article.clientWidth;
    // math: every math span typeset by MathJax, and no TeX left as text outside code
    out.math = document.querySelectorAll("span.math, div.math").length;
    out.math_rendered = document.querySelectorAll("span.math mjx-container, div.math mjx-container").length;
    out.mathjax_errors = document.querySelectorAll("mjx-merror").length;
    var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT), raw = [];
    while (walker.nextNode()) {
      var node = walker.currentNode, text = node.nodeValue;
      if (node.parentElement.closest("pre, code, script, style, mjx-container, #minilora-probe")) continue;
      if (TEX.test(text)) raw.push(text.trim().slice(0, 120));
    }
    out.raw_tex = raw;
    // code blocks (inputs, outputs, listings): wider than their box means a sideways scrollbar
    out.code_blocks = 0; out.wide_code = [];
    article.querySelectorAll("pre").forEach(function (pre) {
      out.code_blocks++;
      if (pre.scrollWidth > pre.clientWidth + 1) {
        var longest = pre.textContent.split("\n").reduce(function (a, b) { return b.length > a.length ? b : a; }, "");
        out.wide_code.push({scroll: pre.scrollWidth, box: pre.clientWidth, line: longest.slice(0, 120)});
      }
    });
    // figures: alt text, a caption with a number, shown at >= 60 % of their pixel size
    out.images = [];
    article.querySelectorAll("img").forEach(function (img) {
      var fig = img.closest("figure"), cap = fig && fig.querySelector("figcaption");
      out.images.push({src: img.getAttribute("src") || "", alt: (img.getAttribute("alt") || "").trim(),
                       caption: cap ? cap.textContent.trim().slice(0, 160) : "",
                       number: cap ? !!cap.querySelector(".caption-number") : false,
                       natural: img.naturalWidth, shown: img.getBoundingClientRect().width});
    });
    // source listings (show_source): collapsed until the reader opens them
    out.listings = article.querySelectorAll("details.minilora-source").length;
    out.open_listings = article.querySelectorAll("details.minilora-source[open]").length;
    out.title = document.title;
    var pre = document.createElement("pre");
    pre.id = "minilora-probe";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", function () {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      MathJax.startup.promise.then(report, report);
    } else {
      report();
    }
  });
})();
