// The web console (console/, served by `moepool serve` at /) in headless Chromium, against a real
// coordinator with two joined workers on a tiny random-weight model: the API-key prompt, the
// workers table, the layer x expert grid, a streamed chat reply with its usage, Stop, a drain from
// the page, and a phone-sized viewport. Run by tests/browser/run.sh.
//
// Environment: MOEPOOL_BINARY (the moepool executable; default build/cli/moepool),
// MOEPOOL_CHROMIUM (default /usr/bin/chromium), MOEPOOL_SCREENSHOT_DIR (where the screenshots
// go; default a fixed folder under the temp dir), MOEPOOL_CONSOLE_DIR (optional: serve the page
// and its assets from this folder instead of the binary, for editing the page without a rebuild;
// the test that checks what the binary serves is then skipped).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, openSync, readFileSync, rmSync, closeSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const binary = process.env.MOEPOOL_BINARY || join(repo, 'build', 'cli', 'moepool');
const chromiumPath = process.env.MOEPOOL_CHROMIUM || '/usr/bin/chromium';
const consoleDir = process.env.MOEPOOL_CONSOLE_DIR ? resolve(process.env.MOEPOOL_CONSOLE_DIR) : '';
const shotDir = resolve(process.env.MOEPOOL_SCREENSHOT_DIR || join(tmpdir(), 'moepool-console-screenshots'));
const apiKey = 'console-test-key';

// The console's files as the binary embeds them: URL path -> [file, content type].
const consoleRoot = consoleDir || join(repo, 'console');
const assets = {
  '/': ['index.html', 'text/html'],
  '/console/app.js': ['app.js', 'javascript'],
  '/console/style.css': ['style.css', 'text/css'],
  '/console/uplot.js': ['node_modules/uplot/dist/uPlot.iife.min.js', 'javascript'],
  '/console/uplot.css': ['node_modules/uplot/dist/uPlot.min.css', 'text/css'],
};

let dir;
let base;                           // http://127.0.0.1:N
const procs = [];                   // {name, proc, exited}
let browser;
let failed = false;
const pageErrors = [];
const dialogs = [];                 // the messages of the confirm() dialogs the pages showed

// ------------------------------------------------------------------------------------------------
// Processes

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.unref();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

// Starts a moepool process with its stdout and stderr in DIR/NAME.log.
function start(name, args) {
  const log = openSync(join(dir, `${name}.log`), 'w');
  const proc = spawn(binary, args, { stdio: ['ignore', 'pipe', log] });
  closeSync(log);
  const entry = { name, proc, stdout: '' };
  entry.exited = new Promise((res) => proc.on('exit', (code, signal) => res(code ?? signal)));
  proc.stdout.on('data', (d) => { entry.stdout += d; });
  procs.push(entry);
  return entry;
}

function waitForServe(entry) {
  return new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error('moepool serve did not start in 60 s')), 60000);
    const check = () => {
      const m = entry.stdout.match(/moepool: serving on http:\/\/127\.0\.0\.1:(\d+)\n/);
      if (m) { clearTimeout(timer); res(Number(m[1])); }
    };
    entry.proc.stdout.on('data', check);
    entry.exited.then((code) => { clearTimeout(timer); rej(new Error(`moepool serve exited with ${code}`)); });
    check();
  });
}

async function apiGet(path) {
  const res = await fetch(`${base}${path}`, { headers: { Authorization: `Bearer ${apiKey}` } });
  assert.equal(res.status, 200, `GET ${path}`);
  return res.json();
}

async function waitFor(what, fn, timeoutMs = 60000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

// Kills every process left (SIGTERM, then SIGKILL after 10 s), even when the test fails.
async function stopAll() {
  await Promise.all(procs.map(async (p) => {
    if (p.proc.exitCode !== null || p.proc.signalCode !== null) return;
    p.proc.kill('SIGTERM');
    const timer = setTimeout(() => p.proc.kill('SIGKILL'), 10000);
    await p.exited;
    clearTimeout(timer);
  }));
}
process.on('exit', () => {
  for (const p of procs) if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL');
});

// A test whose failure keeps the logs (printed at the end) and the temp dir.
function step(name, fn) {
  test(name, { timeout: 180000 }, async (t) => {
    try {
      await fn(t);
    } catch (e) {
      failed = true;
      throw e;
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Browser

async function newPage(options = {}) {
  const context = await browser.newContext(options);
  if (consoleDir) {
    // Serve the console from the working tree; everything else goes to the real server.
    await context.route((url) => url.origin === base && url.pathname in assets, (route) => {
      const [file, type] = assets[new URL(route.request().url()).pathname];
      route.fulfill({
        status: 200,
        contentType: type === 'javascript' ? 'text/javascript' : type,
        body: readFileSync(join(consoleDir, file)),
      });
    });
  }
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  page.on('pageerror', (e) => pageErrors.push(`${e.message}\n${e.stack}`));
  page.on('dialog', (d) => { dialogs.push(d.message()); d.accept(); });
  return page;
}

// A full-page screenshot from the top (a sticky header would otherwise sit mid-page).
async function screenshot(page, name) {
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(shotDir, name), fullPage: true });
}

function checkNoPageErrors() {
  assert.deepEqual(pageErrors, [], 'no uncaught errors in the page');
}

// Pairs held by each worker per GET /v1/cluster, and the grid's shape.
function placement(cluster) {
  let layers = 0;
  let experts = 0;
  const holders = new Map();
  for (const w of cluster.workers) {
    for (const [l, e] of w.experts) {
      layers = Math.max(layers, l + 1);
      experts = Math.max(experts, e + 1);
      if (w.state !== 'ready') continue;
      const key = `${l},${e}`;
      holders.set(key, [...(holders.get(key) || []), w.id]);
    }
  }
  return { layers, experts, holders };
}

async function rowStates(page) {
  return page.$$eval('[data-testid="worker-row"]',
    (rows) => Object.fromEntries(rows.map((r) => [r.dataset.workerId, r.dataset.state])));
}

// ------------------------------------------------------------------------------------------------

before(async () => {
  try {
    await startCluster();
  } catch (e) {
    failed = true;
    throw e;
  }
});

async function startCluster() {
  dir = mkdtempSync(join(tmpdir(), 'moepool-console-'));
  mkdirSync(shotDir, { recursive: true });
  const model = join(dir, 'm.gguf');
  execFileSync(binary, ['synth', '--out', model, '--shape', 'tiny', '--type', 'Q8_0', '--seed', '5'],
               { stdio: 'ignore' });
  const clusterPort = await freePort();
  const serve = start('serve', ['serve', '--model', model, '--listen', '127.0.0.1:0',
    '--cluster-listen', `127.0.0.1:${clusterPort}`, '--threads', '1', '--api-key', apiKey]);
  base = `http://127.0.0.1:${await waitForServe(serve)}`;
  for (let i = 0; i < 2; i++) {
    // A joining worker needs a fixed --listen port (it is the address the coordinator dials).
    start(`worker${i}`, ['worker', '--join', `127.0.0.1:${clusterPort}`,
      '--listen', `127.0.0.1:${await freePort()}`, '--cache-dir', join(dir, `cache${i}`), '--threads', '1']);
  }
  await waitFor('two ready workers', async () => {
    const c = await apiGet('/v1/cluster');
    return c.workers.filter((w) => w.state === 'ready').length === 2;
  });
  browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
}

after(async () => {
  if (browser) await browser.close().catch(() => {});
  await stopAll();
  if (failed) {
    for (const p of procs) {
      let log = '';
      try { log = readFileSync(join(dir, `${p.name}.log`), 'utf8'); } catch { /* none */ }
      console.error(`---- ${p.name} (exit ${p.proc.exitCode ?? p.proc.signalCode}), last lines:\n` +
                    `${log.split('\n').slice(-30).join('\n')}`);
    }
    console.error(`logs kept in ${dir}`);
  } else if (dir) {
    rmSync(dir, { recursive: true, force: true });
  }
});

step('the binary serves the console and its assets without an API key', async (t) => {
  if (consoleDir) { t.skip('MOEPOOL_CONSOLE_DIR is set'); return; }
  for (const [path, [file, type]] of Object.entries(assets)) {
    const res = await fetch(`${base}${path}`);
    assert.equal(res.status, 200, `GET ${path}`);
    assert.match(res.headers.get('content-type') || '', new RegExp(type), `content type of ${path}`);
    const body = Buffer.from(await res.arrayBuffer());
    assert.ok(body.equals(readFileSync(join(consoleRoot, file))),
              `GET ${path} is console/${file} (rebuild the binary after editing the console)`);
  }
});

let page;
let cluster;

step('cluster view: workers, the expert grid, the legend', async () => {
  page = await newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${base}/`);
  // The server has a key: the page asks for it.
  await page.getByTestId('api-key-input').fill(apiKey);
  await page.getByTestId('api-key-submit').click();

  cluster = await apiGet('/v1/cluster');
  const ids = cluster.workers.map((w) => w.id).sort();
  assert.equal(ids.length, 2);
  await page.waitForFunction(
    () => document.querySelectorAll('[data-testid="worker-row"][data-state="ready"]').length === 2);
  assert.deepEqual(Object.keys(await rowStates(page)).sort(), ids);
  assert.equal(await page.getByTestId('model-id').textContent(), 'm');
  await page.waitForFunction(() => document.querySelector('[data-testid="health"]').dataset.status === 'ok');

  // The grid: one cell per (layer, expert), coloured by the worker holding it.
  const { layers, experts, holders } = placement(cluster);
  assert.ok(layers > 0 && experts > 0);
  await page.waitForFunction((n) => document.querySelectorAll('[data-testid="expert-cell"]').length === n,
                             layers * experts);
  const cells = await page.$$eval('[data-testid="expert-cell"]', (cs) => cs.map((c) => ({
    layer: Number(c.dataset.layer), expert: Number(c.dataset.expert), worker: c.dataset.worker,
    colour: getComputedStyle(c).backgroundColor,
  })));
  assert.equal(cells.length, layers * experts);
  const colourOf = new Map();
  for (const c of cells) {
    const expected = (holders.get(`${c.layer},${c.expert}`) || ['coordinator'])[0];
    assert.equal(c.worker, expected, `cell (${c.layer}, ${c.expert})`);
    if (!colourOf.has(c.worker)) colourOf.set(c.worker, new Set());
    colourOf.get(c.worker).add(c.colour);
  }
  for (const id of ids) {
    assert.equal(colourOf.get(id)?.size, 1, `${id}'s cells share one colour`);
    const legend = await page.$eval(`[data-testid="legend-item"][data-worker="${id}"] .swatch`,
                                    (s) => getComputedStyle(s).backgroundColor);
    assert.equal([...colourOf.get(id)][0], legend, `${id}'s colour is its legend colour`);
  }
  assert.notEqual([...colourOf.get(ids[0])][0], [...colourOf.get(ids[1])][0], 'the workers differ in colour');

  // Some traffic, so the charts and the load view have data (the page polls every 2 s).
  const until = Date.now() + 5000;
  while (Date.now() < until) {
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: 'Count to ten.' }], max_tokens: 48, seed: 1 }),
    });
    assert.equal(res.status, 200);
    await res.json();
  }
  await page.waitForFunction(() => Number(document.getElementById('stat-tokens').textContent.replace(/,/g, '')) > 0);
  await page.waitForTimeout(2500);

  // Load mode: each cell shows its share of the layer's routed tokens.
  await page.getByTestId('mode-load').click();
  const shares = await page.$$eval('[data-testid="expert-cell"]', (cs) => cs.map((c) => c.textContent));
  assert.ok(shares.every((s) => /^\d+$/.test(s)), 'load mode labels every cell with a share');
  await page.getByTestId('mode-placement').click();

  await screenshot(page, 'console-cluster.png');
  checkNoPageErrors();
});

step('chat: a reply streams in with its usage; Stop ends a reply', async () => {
  await page.getByTestId('tab-chat').click();
  await page.locator('#settings > summary').click();
  await page.getByTestId('set-max-tokens').fill('160');
  await page.getByTestId('set-seed').fill('7');

  // Every length the reply's text has on the page, as it changes.
  await page.evaluate(() => {
    window.replyLengths = [];
    new MutationObserver(() => {
      const all = document.querySelectorAll('[data-testid="assistant-message"]');
      if (all.length) window.replyLengths.push(all[all.length - 1].textContent.length);
    }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
  });
  const response = page.waitForResponse((r) => r.url().endsWith('/v1/chat/completions'));
  await page.getByTestId('chat-input').fill('Hello');
  await page.getByTestId('send').click();
  const res = await response;
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-type'], /^text\/event-stream/);
  const sent = res.request().postDataJSON();
  assert.equal(sent.stream, true);
  assert.deepEqual(sent.messages, [{ role: 'user', content: 'Hello' }]);
  assert.equal(sent.max_tokens, 160);
  assert.equal(sent.seed, 7);

  const usage = page.getByTestId('usage').last();
  await usage.waitFor({ state: 'visible' });
  const usageText = await usage.textContent();
  const m = usageText.match(/(\d+) prompt \+ (\d+) completion tokens/);
  assert.ok(m, `usage shown: ${usageText}`);
  assert.ok(Number(m[1]) > 0 && Number(m[2]) > 0);
  const reply = await page.getByTestId('assistant-message').last().textContent();
  assert.ok(reply.length > 0, 'the reply has text');
  const lengths = [...new Set(await page.evaluate(() => window.replyLengths))].filter((n) => n > 0);
  assert.ok(lengths.length >= 2, `the reply grew while streaming (lengths seen: ${lengths.join(', ')})`);
  assert.ok(lengths.every((n, i) => i === 0 || n > lengths[i - 1]), 'the text only grew');
  assert.equal(await page.getByTestId('user-message').last().textContent(), 'Hello');
  await screenshot(page, 'console-chat.png');

  // Stop: a reply that would run to the end of the context, stopped once it has text.
  await page.getByTestId('set-max-tokens').fill('');
  await page.getByTestId('chat-input').fill('Tell me a long story.');
  const second = page.waitForRequest((r) => r.url().endsWith('/v1/chat/completions'));
  await page.getByTestId('send').click();
  const history = (await second).postDataJSON().messages;
  assert.equal(history.length, 3, 'the first exchange is sent as history');
  assert.deepEqual(history[1], { role: 'assistant', content: reply });
  await page.waitForFunction(() => {
    const all = document.querySelectorAll('[data-testid="assistant-message"]');
    return all.length === 2 && all[1].textContent.length > 0;
  });
  await page.getByTestId('stop').click();
  await page.waitForFunction(() => {
    const msgs = document.querySelectorAll('.msg-assistant');
    return msgs.length === 2 && msgs[1].dataset.state === 'stopped';
  });
  assert.equal(await page.getByTestId('send').isEnabled(), true);
  assert.equal(await page.getByTestId('stop').isVisible(), false);
  // The server saw the disconnect: the generation was cancelled.
  await waitFor('a cancelled sequence in /metrics', async () => {
    const text = await (await fetch(`${base}/metrics`)).text();
    const c = text.match(/^moepool_sequences_finished_total\{reason="cancelled"\} (\d+)/m);
    return c && Number(c[1]) >= 1;
  }, 15000);
  checkNoPageErrors();
});

step('drain a worker from the page', async () => {
  await page.getByTestId('tab-cluster').click();
  await page.waitForFunction(
    () => document.querySelectorAll('[data-testid="worker-row"][data-state="ready"]').length === 2);
  const victim = cluster.workers[1].id;
  const row = page.locator(`[data-testid="worker-row"][data-worker-id="${victim}"]`);
  const drainCall = page.waitForResponse((r) => r.url().endsWith(`/v1/cluster/workers/${victim}/drain`));
  await row.getByTestId('drain').click();  // the confirm dialog is accepted
  await page.waitForFunction((id) => {
    const r = document.querySelector(`[data-testid="worker-row"][data-worker-id="${id}"]`);
    return r && (r.dataset.state === 'draining' || r.dataset.state === 'gone');
  }, victim);
  assert.ok(dialogs.some((m) => m.includes(`Drain worker ${victim}?`)), 'the drain was confirmed');
  const drained = await drainCall;
  assert.equal(drained.status(), 200);
  assert.equal(drained.request().method(), 'POST');
  // Once gone, no cell is coloured by it and the Drain button is gone from its row.
  await page.waitForFunction((id) => {
    const r = document.querySelector(`[data-testid="worker-row"][data-worker-id="${id}"]`);
    return r && r.dataset.state === 'gone' &&
      !document.querySelector(`[data-testid="expert-cell"][data-worker="${id}"]`);
  }, victim);
  assert.equal(await row.getByTestId('drain').isVisible(), false);
  const states = Object.fromEntries((await apiGet('/v1/cluster')).workers.map((w) => [w.id, w.state]));
  assert.equal(states[victim], 'gone');
  checkNoPageErrors();
});

step('phone viewport: nothing overflows sideways', async () => {
  const phone = await newPage({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true,
                                deviceScaleFactor: 2 });
  await phone.addInitScript((key) => localStorage.setItem('moepool.apiKey', key), apiKey);
  await phone.goto(`${base}/`);
  await phone.waitForFunction(() => document.querySelectorAll('[data-testid="worker-row"]').length === 2);
  await phone.waitForFunction(() => document.querySelectorAll('[data-testid="expert-cell"]').length > 0);
  assert.equal(await phone.getByTestId('key-dialog').isVisible(), false, 'the stored key is used');
  const width = () => phone.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(await width() <= 391, `cluster view fits 390 px (scrollWidth ${await width()})`);
  await phone.waitForSelector('#chart-tps .uplot', { timeout: 15000 });  // after three polls
  assert.ok(await width() <= 391, `with the charts (scrollWidth ${await width()})`);
  await screenshot(phone, 'console-phone.png');
  await phone.getByTestId('tab-chat').click();
  await phone.getByTestId('chat-input').fill('Hi');
  await phone.getByTestId('send').click();
  await phone.getByTestId('usage').last().waitFor({ state: 'visible' });
  assert.ok(await width() <= 391, `chat view fits 390 px (scrollWidth ${await width()})`);
  await phone.context().close();
  checkNoPageErrors();
  console.log(`screenshots in ${shotDir}`);
});
