// Open every UI workflow in ComfyUI's own front end (headless Chromium) and report what it says.
//
//   NODE_PATH=<dir with playwright-core> node workflows/browser_check.cjs URL FILE.json...
//
// Prints one JSON object: {file: {missing, dialogs, toasts, console, prompt}} where `missing` is the
// node types the front end does not know, `dialogs`/`toasts` the text of any dialog or toast shown
// after loading, `console` console errors, and `prompt` the API form the front end itself builds
// (app.graphToPrompt), which the Python test compares with the committed API twin.
const { chromium } = require("playwright-core");
const fs = require("fs");

(async () => {
  const [url, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync"],
  });
  const page = await browser.newPage();
  let consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(url, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
    Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  const startupErrors = consoleErrors; consoleErrors = [];
  const report = { _startup_console: startupErrors };
  for (const file of files) {
    const graph = JSON.parse(fs.readFileSync(file, "utf8"));
    // Close anything left from the previous file, then load as a user opening the file would.
    await page.evaluate(() => document.querySelectorAll(".p-dialog-close-button, .p-toast-close-button").forEach((b) => b.click()));
    const result = await page.evaluate(async (g) => {
      const types = g.nodes.map((n) => n.type);
      const missing = types.filter((t) => !(t in window.LiteGraph.registered_node_types));
      await window.app.loadGraphData(g, true, true, null);
      await new Promise((r) => setTimeout(r, 700));
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
    result.console = consoleErrors; consoleErrors = [];
    report[file] = result;
  }
  await browser.close();
  process.stdout.write(JSON.stringify(report));
})().catch((e) => { console.error(e); process.exit(1); });
