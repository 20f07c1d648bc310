#!/usr/bin/env bash
# Installs the peers' dependencies from the npm registry (pinned in package.json).
#   loadtest/peers/install.sh
set -euo pipefail
cd "$(dirname "$0")"
for peer in fastify socketio node-apn graphile-worker; do
    [ -f "$peer/package.json" ] || continue
    (cd "$peer" && npm install --no-audit --no-fund --loglevel=error)
done
