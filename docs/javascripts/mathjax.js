// MathJax 3 configuration for the pages' mathematics.  pymdownx.arithmatex (generic mode) wraps
// every formula in an element of class "arithmatex" with \( \) or \[ \] delimiters; only those
// elements are typeset.  MathJax itself is served from the site (assets/mathjax/, copied there by
// docs/hooks.py) and loaded after this file.
//
// If material's navigation.instant is ever enabled, pages change without a reload and need
//   document$.subscribe(() => { MathJax.typesetClear(); MathJax.texReset(); MathJax.typesetPromise(); });
// (skipping the first emission, which MathJax's own start-up typesetting covers).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
