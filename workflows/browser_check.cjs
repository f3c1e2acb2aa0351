// Open every UI workflow in ComfyUI's own front end (headless Chromium) and report what it says.
//
//   NODE_PATH=<dir with playwright-core> node workflows/browser_check.cjs URL [--shots DIR] FILE.json...
//   NODE_PATH=<dir with playwright-core> node workflows/browser_check.cjs URL --measure TYPE...
//
// Check mode prints one JSON object: {file: {missing, invalid, dialogs, toasts, console, prompt, nodes,
// overlaps, undersized, hidden_widgets, boxes}} where `missing` is the node types the front end does
// not know, `dialogs`/`toasts` the text of any dialog or toast shown after loading, `console` console
// errors, `prompt` the API form the front end itself builds (app.graphToPrompt), which the Python test
// compares with the committed API twin, and the layout as the front end shows it: `overlaps` pairs of
// node boxes (title bar included) that intersect, `undersized` nodes smaller than their computeSize()
// (the front end grows them on load), `hidden_widgets` widgets not inside their node's body,
// `covered_widgets` widgets another node's box lies on, `boxes` every node's [x, y, w, h] with the title bar. --shots DIR also saves DIR/<file stem>.png: the whole
// graph fitted into 2400 x 1400 (at most 100 %), the front end's menus hidden.
// Measure mode prints {type: [w, h]}: computeSize() of a freshly created node of each type (what
// workflows/schemas/node_sizes.json stores).
const { chromium } = require("playwright-core");
const fs = require("fs");
const path = require("path");

const VIEW = { width: 1600, height: 1000 };
const SHOT_VIEW = { width: 2400, height: 1400 }; // pictures: the docs scale them down

async function openFrontEnd(url) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: VIEW });
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
    Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  return { browser, page, consoleErrors };
}

async function measure(page, types) {
  return await page.evaluate(async (types) => {
    window.app.graph.clear();
    const nodes = types.map((t) => { const n = window.LiteGraph.createNode(t); window.app.graph.add(n); return n; });
    await new Promise((r) => setTimeout(r, 800)); // image previews and DOM widgets are added after creation
    const out = {};
    nodes.forEach((n, i) => { out[types[i]] = Array.from(n.computeSize(), (v) => Math.ceil(v)); });
    window.app.graph.clear();
    return out;
  }, types);
}

// Runs in the page after a workflow is loaded: the layout as the front end shows it.
function layoutReport() {
  const TITLE = window.LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = window.app.graph.nodes;
  const label = (n) => `${n.title || n.type} #${n.id}`;
  const boxes = {};
  for (const n of nodes) boxes[n.id] = [n.pos[0], n.pos[1] - TITLE, n.size[0], n.size[1] + TITLE];
  const overlaps = [];
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const [ax, ay, aw, ah] = boxes[nodes[i].id], [bx, by, bw, bh] = boxes[nodes[j].id];
      const w = Math.min(ax + aw, bx + bw) - Math.max(ax, bx), h = Math.min(ay + ah, by + bh) - Math.max(ay, by);
      if (w > 0 && h > 0) overlaps.push(`${label(nodes[i])} and ${label(nodes[j])} overlap by ${Math.round(w)} x ${Math.round(h)} px`);
    }
  }
  const undersized = [], hiddenWidgets = [], coveredWidgets = [];
  const hits = (a, b) => Math.min(a[0] + a[2], b[0] + b[2]) > Math.max(a[0], b[0]) &&
    Math.min(a[1] + a[3], b[1] + b[3]) > Math.max(a[1], b[1]);
  for (const n of nodes) {
    const [cw, ch] = Array.from(n.computeSize());
    if (n.size[0] + 0.5 < cw || n.size[1] + 0.5 < ch) {
      undersized.push(`${label(n)}: size ${Array.from(n.size, Math.round)} < computeSize ${[cw, ch].map(Math.round)}`);
    }
    if (n.flags && n.flags.collapsed) hiddenWidgets.push(`${label(n)} is collapsed`);
    for (const w of n.widgets || []) {
      if (w.hidden || w.type === "hidden" || w.type === "converted-widget") {
        hiddenWidgets.push(`${label(n)}.${w.name} is hidden (${w.type})`);
        continue;
      }
      const y = w.y ?? w.last_y;
      const h = w.computedHeight ?? window.LiteGraph.NODE_WIDGET_HEIGHT;
      if (y === undefined || y < 0 || y + h > n.size[1] + 0.5) {
        hiddenWidgets.push(`${label(n)}.${w.name} at y ${y} + ${h} outside the node body (height ${n.size[1]})`);
        continue;
      }
      const rect = [n.pos[0], n.pos[1] + y, n.size[0], h];
      const over = nodes.filter((m) => m !== n && hits(rect, boxes[m.id])).map(label);
      if (over.length) coveredWidgets.push(`${label(n)}.${w.name} under ${over.join(", ")}`);
    }
  }
  return { overlaps, undersized, hidden_widgets: hiddenWidgets, covered_widgets: coveredWidgets, boxes };
}

async function hideChrome(page) {
  await page.evaluate(async () => {
    const st = window.app.extensionManager.setting;
    for (const id of ["Comfy.Graph.CanvasInfo", "Comfy.Graph.CanvasMenu", "Comfy.Minimap.Visible"]) await st.set(id, false);
    await st.set("LiteGraph.Canvas.MinFontSizeForLOD", 1); // text drawn even when a wide graph is zoomed out
    await st.set("LiteGraph.Canvas.LowQualityRenderingZoomThreshold", 0.1);
  });
  await page.setViewportSize(SHOT_VIEW);
  await page.addStyleTag({ content: ".side-tool-bar-container, .comfyui-menu, .comfyui-body-top, .p-toast, " +
    ".comfyui-body-bottom, .actionbar, .workflow-tabs-container { display: none !important; }" });
}

async function fitAndShoot(page, boxes, file) {
  // The whole graph fitted into the viewport (at most 100 %), cropped to the graph.
  const clip = await page.evaluate((boxes) => {
    const all = Object.values(boxes);
    const x0 = Math.min(...all.map((b) => b[0])) - 20, y0 = Math.min(...all.map((b) => b[1])) - 20;
    const x1 = Math.max(...all.map((b) => b[0] + b[2])) + 20, y1 = Math.max(...all.map((b) => b[1] + b[3])) + 20;
    const c = window.app.canvas, [vw, vh] = [window.innerWidth, window.innerHeight];
    const s = Math.min(vw / (x1 - x0), vh / (y1 - y0), 1);
    c.ds.scale = s;
    c.ds.offset = [-x0, -y0];
    c.deselectAll && c.deselectAll();
    c.setDirty(true, true);
    return { x: 0, y: 0, width: Math.floor((x1 - x0) * s), height: Math.floor((y1 - y0) * s) };
  }, boxes);
  await page.waitForTimeout(700);
  await page.screenshot({ path: file, clip });
}

async function check(page, consoleErrors, files, shots) {
  const report = { _startup_console: consoleErrors.splice(0) };
  if (shots) await hideChrome(page);
  for (const file of files) {
    const graph = JSON.parse(fs.readFileSync(file, "utf8"));
    // Close anything left from the previous file, then load as a user opening the file would.
    await page.evaluate(() => document.querySelectorAll(".p-dialog-close-button, .p-toast-close-button").forEach((b) => b.click()));
    const result = await page.evaluate(async (g) => {
      const types = g.nodes.map((n) => n.type);
      const missing = types.filter((t) => !(t in window.LiteGraph.registered_node_types));
      await window.app.loadGraphData(g, true, true, null);
      await new Promise((r) => setTimeout(r, 1200)); // image previews load and the canvas draws widgets
      window.app.canvas.setDirty(true, true);
      await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
      const texts = (sel) => [...document.querySelectorAll(sel)].map((e) => e.innerText.trim()).filter(Boolean);
      const invalid = [];
      for (const node of window.app.graph.nodes) {
        for (const w of node.widgets || []) {
          const vals = w.options && w.options.values;
          if (w.type === "combo" && Array.isArray(vals) && vals.length && !vals.includes(w.value)) {
            invalid.push(`${node.type}.${w.name}=${JSON.stringify(w.value)} not offered`);
          }
          if (w.type === "number" && w.options && ((w.options.min !== undefined && w.value < w.options.min) ||
              (w.options.max !== undefined && w.value > w.options.max))) {
            invalid.push(`${node.type}.${w.name}=${w.value} out of range`);
          }
        }
      }
      const prompt = (await window.app.graphToPrompt()).output;
      return { missing, invalid, dialogs: texts(".p-dialog"), toasts: texts(".p-toast-message"),
               nodes: window.app.graph.nodes.length, prompt };
    }, graph);
    Object.assign(result, await page.evaluate(layoutReport));
    result.console = consoleErrors.splice(0);
    if (shots) await fitAndShoot(page, result.boxes, path.join(shots, path.basename(file, ".json") + ".png"));
    report[file] = result;
  }
  return report;
}

(async () => {
  const args = process.argv.slice(2);
  const url = args.shift();
  const { browser, page, consoleErrors } = await openFrontEnd(url);
  let out;
  if (args[0] === "--measure") {
    out = await measure(page, args.slice(1));
  } else {
    let shots = null;
    if (args[0] === "--shots") { args.shift(); shots = args.shift(); fs.mkdirSync(shots, { recursive: true }); }
    out = await check(page, consoleErrors, args, shots);
  }
  await browser.close();
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
