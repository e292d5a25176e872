// The meterkit usage dashboard: every number comes from meterkit's own HTTP endpoints, read
// with the API key kept in sessionStorage (this tab only; never put in a URL).
"use strict";

(function () {
  const KEY = "meterkit.api_key";
  const DAY = 86400;
  // The API lives where the dashboard does: /x/dashboard -> /x/v1/...
  const BASE = window.location.pathname.replace(/\/dashboard\/?$/, "");
  // The organization's meters (GET /v1/organization/meters): path, group_by, measures.
  const METERS = new Map();
  const COLORS = [
    "#2f6fde", "#e8743b", "#19a979", "#ed4a7b", "#945ecf", "#13a4b4",
    "#525df4", "#bf399e", "#6c8893", "#ee6868", "#2f6497", "#9b9b00",
  ];
  const charts = {};
  // The server's "now" (it may run on another clock than this browser's): ranges end there.
  let serverNow = Math.floor(Date.now() / 1000);

  const $ = (id) => document.getElementById(id);
  const fmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 6 });
  const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD", maximumFractionDigits: 4 });
  const short = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });
  const IEC = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

  // Bytes in binary units (2.11 GiB), every other number with its unit.
  function amount(value, unit) {
    if (unit !== "bytes") return unit ? `${fmt.format(value)} ${unit}` : fmt.format(value);
    let scaled = value;
    let step = 0;
    while (Math.abs(scaled) >= 1024 && step < IEC.length - 1) { scaled /= 1024; step += 1; }
    return step === 0 ? `${fmt.format(value)} bytes` : `${short.format(scaled)} ${IEC[step]}`;
  }

  // The exact figure, for a title (shown on hover) beside a rounded one.
  function exact(value, unit) {
    return `${fmt.format(value)} ${unit || ""}`.trim();
  }

  class Refused extends Error {}

  async function api(path, params) {
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(params || {})) {
      for (const v of [].concat(value)) query.append(name, String(v));
    }
    const url = BASE + path + (query.toString() ? "?" + query : "");
    const response = await fetch(url, {
      headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) },
      cache: "no-store",
    });
    if (response.status === 401) throw new Refused("That key was refused: check it and try again.");
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (body.error && body.error.message) || body.detail || response.statusText;
      throw new Error(message);
    }
    return body;
  }

  // Every page of a paged endpoint, buckets concatenated.
  async function pages(path, params) {
    const out = [];
    let page = null;
    do {
      const body = await api(path, page ? { ...params, page } : params);
      out.push(...body.data);
      page = body.has_more ? body.next_page : null;
    } while (page);
    return out;
  }

  function label(ts, width) {
    const d = new Date(ts * 1000).toISOString();
    return width === "1h" ? d.slice(5, 13).replace("T", " ") + "h" : d.slice(0, 10);
  }

  function draw(id, type, data, options) {
    if (charts[id]) charts[id].destroy();
    charts[id] = new Chart($(id), { type, data, options: { animation: false, maintainAspectRatio: false, ...options } });
    return charts[id];
  }

  // The palette first, then hues a golden angle apart: every series its own colour.
  function color(i) {
    return i < COLORS.length ? COLORS[i] : `hsl(${Math.round((i * 137.508) % 360)}, 55%, 48%)`;
  }

  function stacked(labels, series) {
    return {
      labels,
      datasets: series.map(([name, values], i) => ({
        label: name, data: values, backgroundColor: color(i), stack: "all",
      })),
    };
  }

  // -- usage ----------------------------------------------------------------------------------

  // Meters in use (or limited) first, under their own heading; the rest after.
  function fillKinds(listed) {
    METERS.clear();
    const select = $("usage-kind");
    const used = document.createElement("optgroup");
    used.label = "In use";
    const rest = document.createElement("optgroup");
    rest.label = `No usage in ${listed.days} days`;
    for (const meter of listed.data) {
      METERS.set(meter.name, meter);
      (meter.in_use || meter.limited ? used : rest).append(new Option(meter.name, meter.name));
    }
    select.replaceChildren(...[used, rest].filter((g) => g.children.length));
  }

  function measureOf(kind, measure) {
    const found = METERS.get(kind).measures.find((m) => m.name === measure);
    return found ? found : { unit: "", gauge: false };
  }

  async function showUsage() {
    const kind = $("usage-kind").value;
    const meter = METERS.get(kind);
    const width = $("usage-width").value;
    const allowed = meter.group_by;
    for (const option of $("usage-stack").options) {
      option.disabled = option.value !== "" && !allowed.includes(option.value);
    }
    if ($("usage-stack").selectedOptions[0].disabled) $("usage-stack").value = allowed[0] || "";
    const stack = $("usage-stack").value;
    const now = serverNow;
    const span = width === "1h" ? 7 * DAY : 30 * DAY;
    const start = width === "1h" ? now - (now % 3600) - span + 3600 : now - (now % DAY) - span + DAY;
    const params = { start_time: start, bucket_width: width, limit: width === "1h" ? 168 : 31 };
    if (stack) params.group_by = stack;
    const buckets = await pages(meter.path, params);
    const measures = new Set();
    for (const b of buckets) for (const r of b.results) {
      for (const [k, v] of Object.entries(r)) if (typeof v === "number" && k !== "object") measures.add(k);
    }
    const select = $("usage-measure");
    const wanted = select.value;
    const names = [...measures].sort();
    select.replaceChildren(...names.map((m) => new Option(m, m)));
    if (names.includes(wanted)) select.value = wanted;
    else if (names.length) select.value = names.find((m) => /^input_tokens$|^num_/.test(m)) || names[0];
    const measure = select.value;
    const { unit, gauge } = measureOf(kind, measure);
    const groups = new Map();
    buckets.forEach((b, i) => {
      for (const r of b.results) {
        const name = stack ? String(r[stack] ?? "(none)") : measure;
        // A gauge's bucket before its first reading is unknown (null), not zero.
        if (!groups.has(name)) groups.set(name, new Array(buckets.length).fill(gauge ? null : 0));
        groups.get(name)[i] = (groups.get(name)[i] || 0) + (r[measure] || 0);
      }
    });
    const total = $("usage-total");
    const empty = !measure || groups.size === 0;
    $("usage-empty").hidden = !empty;
    $("usage-chart").parentElement.hidden = empty;
    total.textContent = "";
    total.removeAttribute("title");
    for (const key of ["total", "latest"]) delete total.dataset[key];
    if (empty) return;
    if (gauge) {
      // A level holds until its next reading: carried across buckets without one, never summed.
      for (const values of groups.values()) {
        for (let i = 1; i < values.length; i += 1) if (values[i] === null) values[i] = values[i - 1];
      }
      const latest = [...groups.values()].reduce((a, v) => a + (v[v.length - 1] || 0), 0);
      total.textContent = `Now: ${amount(latest, unit)} of ${measure} (a level: charted as held over time, not summed)`;
      total.title = exact(latest, unit);
      total.dataset.latest = String(latest);
    } else {
      const sum = [...groups.values()].flat().reduce((a, b) => a + b, 0);
      total.textContent = `Total ${measure}: ${amount(sum, unit)}`;
      total.title = exact(sum, unit);
      total.dataset.total = String(sum);
    }
    const series = [...groups.entries()].sort((a, b) => a[0].localeCompare(b[0]));
    const labels = buckets.map((b) => label(b.start_time, width));
    const ticks = { callback: (v) => amount(v, unit === "bytes" ? unit : "") };
    const tooltip = { callbacks: { label: (c) => `${c.dataset.label}: ${amount(c.parsed.y, unit)}` } };
    if (gauge) {
      draw("usage-chart", "line", {
        labels,
        datasets: series.map(([name, values], i) => ({
          label: name, data: values, borderColor: color(i), backgroundColor: color(i),
          stepped: "after", pointRadius: 0, fill: false, spanGaps: false,
        })),
      }, {
        scales: { y: { beginAtZero: true, ticks } },
        plugins: { title: { display: true, text: `${kind}: ${measure} (${unit}, level)` }, tooltip },
      });
      return;
    }
    draw("usage-chart", "bar", stacked(labels, series), {
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks } },
      plugins: { title: { display: true, text: `${kind}: ${measure} (${unit})` }, tooltip },
    });
  }

  // -- costs ----------------------------------------------------------------------------------

  async function showCosts() {
    const now = serverNow;
    const start = now - (now % DAY) - 29 * DAY;
    const buckets = await pages("/v1/organization/costs", { start_time: start, group_by: "line_item", limit: 30 });
    const items = new Map();
    buckets.forEach((b, i) => {
      for (const r of b.results) {
        const name = r.line_item || "(none)";
        if (!items.has(name)) items.set(name, new Array(buckets.length).fill(0));
        items.get(name)[i] += r.amount.value;
      }
    });
    const total = [...items.values()].flat().reduce((a, b) => a + b, 0);
    const empty = items.size === 0;
    $("costs-empty").hidden = !empty;
    $("costs-chart").parentElement.hidden = empty;
    $("costs-total").textContent = empty ? "" : `Total: ${money.format(total)} over ${items.size} line items`;
    $("costs-total").dataset.total = String(total);
    if (empty) return;
    const series = [...items.entries()].sort((a, b) => a[0].localeCompare(b[0]));
    draw("costs-chart", "bar", stacked(buckets.map((b) => label(b.start_time, "1d")), series), {
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { callback: (v) => money.format(v) } } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
    });
  }

  // -- quotas ---------------------------------------------------------------------------------

  function gauge(id, title, used, limit, lines, hover) {
    const box = document.createElement("div");
    box.className = "gauge";
    box.id = id;
    if (hover) box.title = hover;
    const heading = document.createElement("h3");
    heading.textContent = title;
    const canvas = document.createElement("canvas");
    canvas.id = id + "-chart";
    box.append(heading, canvas);
    for (const [cls, text] of lines) {
      const p = document.createElement("p");
      p.className = cls;
      p.textContent = text;
      box.append(p);
    }
    box.dataset.used = String(used);
    box.dataset.limit = String(limit);
    $("gauges").append(box);
    const unlimited = limit < 0;
    const filled = unlimited ? 0 : Math.min(used, limit);
    draw(canvas.id, "doughnut", {
      labels: ["used", "remaining"],
      datasets: [{
        data: unlimited ? [0, 1] : [filled, Math.max(0, limit - filled)],
        backgroundColor: [used >= limit && !unlimited ? "#b42318" : "#2f6fde", "#e4e8ee"],
      }],
    }, { rotation: -90, circumference: 180, cutout: "70%", plugins: { legend: { display: false }, tooltip: { enabled: false } } });
  }

  function when(ts) {
    return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 16) + " UTC";
  }

  async function showQuota(status) {
    $("gauges").replaceChildren();
    for (const id of Object.keys(charts)) if (id.startsWith("gauge-")) { charts[id].destroy(); delete charts[id]; }
    for (const line of status.limits) {
      const unlimited = line.limit < 0;
      const u = line.unit;
      gauge("gauge-" + line.metric, line.metric, line.used, line.limit, [
        ["used", `${amount(line.used, u)} of ${unlimited ? "unlimited" : amount(line.limit, u)}`],
        ["remaining", unlimited ? "no limit" : `${amount(line.remaining, u)} remaining`],
        ["reset", line.reset_at ? `resets ${when(line.reset_at)}` : "a level: frees up when something is removed"],
      ], `${exact(line.used, u)} of ${unlimited ? "unlimited" : exact(line.limit, u)}`);
    }
    for (const rate of status.rate_limits) {
      const box = document.createElement("div");
      box.className = "gauge rate";
      box.id = "rate-" + rate.window;
      box.dataset.limit = String(rate.limit);
      box.innerHTML = "<h3></h3><p></p>";
      box.querySelector("h3").textContent = `requests per ${rate.window}`;
      box.querySelector("p").textContent = `at most ${fmt.format(rate.limit)}`;
      $("gauges").append(box);
    }
    const spend = status.spend_limit;
    if (spend) {
      gauge("gauge-spend", "spend this month", spend.used, spend.limit, [
        ["used", `${money.format(spend.used)} of ${money.format(spend.limit)}`],
        ["remaining", spend.enforcing ? "limit reached: requests are refused" : `${money.format(spend.remaining)} remaining`],
        ["reset", `resets ${when(spend.reset_at)}`],
      ]);
    }
    $("quota-empty").hidden = status.limits.length + status.rate_limits.length > 0 || !!spend;
  }

  // -- flow -----------------------------------------------------------------------------------

  async function load() {
    // One call first: a refused key costs one error in the console, not one per call.
    const status = await api("/v1/organization/quota");
    const listed = await api("/v1/organization/meters");
    serverNow = status.as_of;
    fillKinds(listed);
    $("who").textContent = status.organization_id + (status.plan ? ` · plan ${status.plan}` : "");
    $("who").hidden = false;
    $("signout").hidden = false;
    $("signin").hidden = true;
    $("app").hidden = false;
    await Promise.all([showQuota(status), showUsage(), showCosts()]);
    document.body.dataset.state = "ready";
  }

  function signedOut(message) {
    sessionStorage.removeItem(KEY);
    for (const id of Object.keys(charts)) { charts[id].destroy(); delete charts[id]; }
    $("app").hidden = true;
    $("who").hidden = true;
    $("signout").hidden = true;
    $("signin").hidden = false;
    $("signin-error").hidden = !message;
    $("signin-error").textContent = message || "";
    document.body.dataset.state = message ? "refused" : "signed-out";
  }

  async function start() {
    try {
      await load();
    } catch (error) {
      if (error instanceof Refused) signedOut(error.message);
      else {
        $("signin-error").hidden = false;
        $("signin-error").textContent = "Could not load: " + error.message;
        document.body.dataset.state = "error";
      }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $("key").value.trim());
      $("key").value = "";
      start();
    });
    $("signout").addEventListener("click", () => signedOut(""));
    for (const id of ["usage-kind", "usage-measure", "usage-stack", "usage-width"]) {
      $(id).addEventListener("change", () => {
        document.body.dataset.state = "loading";
        showUsage().then(() => { document.body.dataset.state = "ready"; }).catch((e) => {
          $("usage-empty").hidden = false;
          $("usage-empty").textContent = e.message;
          document.body.dataset.state = "ready";
        });
      });
    }
    if (sessionStorage.getItem(KEY)) start();
    else signedOut("");
  });
})();
