#!/usr/bin/env bash
# Runs every test of the project (unit, conformance replay in-process and over gRPC,
# contract tests including the Python client) in Release.
# The conformance replay reads ../shared/conformance/scenarios when it exists, plus the
# project's own real-kernel scenarios in tests/conformance/scenarios.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf artifacts/TestResults
dotnet test UffdGrpc.sln -c Release
if [ -f artifacts/conformance-report.txt ]; then
  grep -E '^(FAIL|NOTE)' artifacts/conformance-report.txt || true
  tail -n 1 artifacts/conformance-report.txt
fi
if [ -f artifacts/conformance-server-report.txt ]; then
  grep -E '^(FAIL|DIFFER)' artifacts/conformance-server-report.txt || true
  tail -n 1 artifacts/conformance-server-report.txt
fi
