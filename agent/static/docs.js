// Renders /v1/openapi.json as a list of operations with their request/response schemas.
(function () {
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
    kids.forEach(k => e.append(k));
    return e;
  };
  function schemaText(spec, s) {
    if (!s) return "";
    if (s.$ref) { const name = s.$ref.split("/").pop(); return name + " " + JSON.stringify(spec.components.schemas[name], null, 2); }
    return JSON.stringify(s, null, 2);
  }
  function render(spec) {
    const main = document.getElementById("spec");
    main.replaceChildren(el("p", {}, spec.info.description || ""));
    Object.entries(spec.paths).forEach(([path, ops]) => {
      Object.entries(ops).forEach(([method, op]) => {
        const m = method.toUpperCase();
        const d = el("details", {class: "op"}, el("summary", {}, el("span", {class: "m " + m}, m), path + " — " + op.summary));
        const body = op.requestBody && op.requestBody.content["application/json"];
        if (body) d.append(el("h4", {}, "Request body"), el("pre", {}, schemaText(spec, body.schema)));
        (op.parameters || []).forEach(p => d.append(el("div", {}, `${p.in} ${p.name}: ${JSON.stringify(p.schema)} ${p.description || ""}`)));
        Object.entries(op.responses).forEach(([code, r]) => {
          const c = r.content && (r.content["application/json"] || Object.values(r.content)[0]);
          d.append(el("h4", {}, code + " " + r.description));
          if (c && code < 400) d.append(el("pre", {}, schemaText(spec, c.schema)));
        });
        main.append(d);
      });
    });
  }
  document.getElementById("auth").addEventListener("submit", async ev => {
    ev.preventDefault();
    const status = document.getElementById("status");
    const r = await fetch("/v1/openapi.json", {headers: {Authorization: "Bearer " + document.getElementById("token").value}});
    if (!r.ok) { status.textContent = "Failed: HTTP " + r.status; return; }
    status.textContent = "";
    render(await r.json());
  });
})();
