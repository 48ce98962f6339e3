// Show only the descriptors of the chosen lesion type (mass / NME). A hidden fieldset is also
// disabled, so its values are not submitted. Without this script the server does the same
// once the lesion type is saved. No inline script: the review CSP forbids it.
(function () {
  "use strict";
  function update(form) {
    var checked = form.querySelector("input[name=lesion_type]:checked");
    var lesion = checked ? checked.value : "";
    form.querySelectorAll("fieldset[data-applies]").forEach(function (fs) {
      var select = fs.querySelector("select");
      var applies = !lesion || fs.dataset.applies.split(" ").indexOf(lesion) >= 0;
      var keep = applies || (select && select.value !== "");
      fs.hidden = !keep;
      fs.disabled = !keep;
    });
  }
  document.querySelectorAll("form.descriptors").forEach(function (form) {
    form.querySelectorAll("input[name=lesion_type]").forEach(function (radio) {
      radio.addEventListener("change", function () { update(form); });
    });
    update(form);
  });
})();
