#!/usr/bin/env bash
# Runs the web console test (tests/browser/console.test.mjs): headless Chromium, driven by
# playwright-core, against a real coordinator with two joined workers. Without node, the
# playwright-core package or Chromium it is skipped (exit 77), except under CI=true, where that is
# a failure. Install: npm ci --prefix tests/browser && npm ci --prefix console (uPlot, embedded in
# the binary) and apt-get install chromium (deploy/install-deps.sh does).
# MOEPOOL_BINARY names the moepool executable (default build/cli/moepool); MOEPOOL_CHROMIUM the
# browser (default /usr/bin/chromium); MOEPOOL_SCREENSHOT_DIR where screenshots go.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
chromium="${MOEPOOL_CHROMIUM:-/usr/bin/chromium}"
missing=""
if ! command -v node >/dev/null 2>&1; then
  missing="node"
elif [ ! -f "$here/node_modules/playwright-core/package.json" ]; then
  missing="the playwright-core npm package (npm ci --prefix tests/browser)"
elif [ ! -x "$chromium" ]; then
  missing="chromium at $chromium (apt-get install chromium)"
fi
if [ -n "$missing" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "moepool: missing $missing" >&2
    exit 1
  fi
  echo "moepool: skipped, missing $missing"
  exit 77
fi
export MOEPOOL_CHROMIUM="$chromium"
exec node --test "$here/${1:-console.test.mjs}"
