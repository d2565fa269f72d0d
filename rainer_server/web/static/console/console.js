// Progressive enhancement only: every page works without this file.
// "/" focuses the key filter; Ctrl+Enter (or Cmd+Enter) in the editor asks for the review.
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    var typing = target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" ||
                            target.tagName === "SELECT" || target.isContentEditable);
    if (event.key === "/" && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
      var filter = document.querySelector("[data-shortcut='/']");
      if (filter) {
        event.preventDefault();
        filter.focus();
        filter.select();
      }
    }
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && target &&
        target.tagName === "TEXTAREA") {
      var review = target.form && target.form.querySelector("[data-shortcut='ctrl+enter']");
      if (review) {
        event.preventDefault();
        review.click();
      }
    }
  });
})();
