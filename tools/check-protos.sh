#!/usr/bin/env bash
# buf lint (STANDARD, no exceptions) and buf breaking against the commit that froze API v1
# (protos/V1_FROZEN_AT): v1 only grows. buf comes from npm (tools/package-lock.json pins it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x tools/node_modules/.bin/buf ]; then
  npm ci --prefix tools --silent --no-audit --no-fund
fi
buf=tools/node_modules/.bin/buf
"$buf" lint protos
frozen=$(cat protos/V1_FROZEN_AT)
# A shallow clone may lack the frozen commit: fetch it (or the whole history) first.
if ! git cat-file -e "$frozen^{commit}" 2>/dev/null; then
  git fetch --quiet --unshallow 2>/dev/null || git fetch --quiet origin "$frozen" 2>/dev/null || true
fi
"$buf" breaking protos --against ".git#ref=$frozen,subdir=protos"
echo "protos: buf lint and buf breaking (against $frozen) pass"
