// A real `moepool serve` on a synthesized tiny random-weight model, for the Node.js tests:
// startServer() synthesizes the model in a temporary directory, starts the server with an API
// key and waits for its "serving on" line; stop() ends it with SIGTERM (expecting exit 0) and
// removes the directory. MOEPOOL_BINARY names the moepool executable.
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function waitForReady(proc) {
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/moepool: serving on http:\/\/127\.0\.0\.1:(\d+)\n/);
      if (m) resolve(Number(m[1]));
    });
    proc.stderr.on('data', (d) => { err += d; });
    proc.on('exit', (code) => reject(new Error(`moepool serve exited with ${code}: ${err}`)));
  });
}

// Options: prefix (temporary directory name), apiKey, serveArgs (extra flags).
export async function startServer({ prefix, apiKey, serveArgs = [] }) {
  const binary = process.env.MOEPOOL_BINARY;
  assert.ok(binary, 'MOEPOOL_BINARY must name the moepool executable');
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const model = join(dir, 'tiny-Q8_0.gguf');
  execFileSync(binary, ['synth', '--out', model, '--shape', 'tiny', '--type', 'Q8_0', '--seed', '5'],
               { stdio: 'inherit' });
  const proc = spawn(binary, ['serve', '--model', model, '--listen', '127.0.0.1:0', '--threads', '1',
                              '--api-key', apiKey, ...serveArgs],
                     { stdio: ['ignore', 'pipe', 'pipe'] });
  const port = await waitForReady(proc);
  return {
    port,
    modelId: 'tiny-Q8_0',
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
        proc.kill('SIGTERM');
        assert.equal(await exited, 0, 'moepool serve stops cleanly on SIGTERM');
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
