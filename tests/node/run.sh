#!/usr/bin/env bash
# Runs the OpenAI Node.js client tests (ctest entry node_openai_client). Without node or the
# openai and ajv packages it is skipped (exit 77), except under CI=true, where that is a failure.
# Install the packages with: npm ci --prefix tests/node   (deploy/install-deps.sh does).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
missing=""
if ! command -v node >/dev/null 2>&1; then
  missing="node"
elif [ ! -f "$here/node_modules/openai/package.json" ]; then
  missing="the openai npm package (npm ci --prefix tests/node)"
elif [ ! -f "$here/node_modules/ajv/package.json" ]; then
  missing="the ajv npm package (npm ci --prefix tests/node)"
fi
if [ -n "$missing" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "moepool: missing $missing" >&2
    exit 1
  fi
  echo "moepool: skipped, missing $missing"
  exit 77
fi
# The test file to run: the first argument (default: the client test).
exec node --test "$here/${1:-openai_client.test.mjs}"
