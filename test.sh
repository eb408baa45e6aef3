#!/usr/bin/env bash
# Runs every test of the project (unit, conformance replay in-process and over gRPC,
# contract tests including the Python client) in Release.
# The conformance replay reads ../shared/conformance/scenarios when it exists, plus the
# project's own real-kernel scenarios in tests/conformance/scenarios.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages the suite uses (the non-.NET gRPC client test): installed when missing.
missing=""
for p in $(grep -v '^#' .ci/apt-packages); do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "test.sh: missing Debian packages:$missing (apt-get install them, or run as root)" >&2
  fi
fi
rm -rf artifacts/TestResults
# One summary line per test project, plus each failure (tests/Directory.Build.props: console
# verbosity minimal, a trx per project in artifacts/TestResults).
rc=0
dotnet test UffdGrpc.sln -c Release || rc=$?
# Each skipped test with its reason (the console logger names skipped tests only).
python3 - <<'PY' || true
import glob, xml.etree.ElementTree as ET
ns = "{http://microsoft.com/schemas/VisualStudio/TeamTest/2010}"
for t in sorted(glob.glob("artifacts/TestResults/*.trx")):
    for r in ET.parse(t).getroot().iter(ns + "UnitTestResult"):
        if r.get("outcome") == "NotExecuted":
            reason = r.find(f"{ns}Output/{ns}ErrorInfo/{ns}Message")
            print(f"SKIPPED {r.get('testName')}: {reason.text.strip() if reason is not None and reason.text else 'no reason given'}")
PY
if [ -f artifacts/conformance-report.txt ]; then
  grep -E '^(FAIL|NOTE)' artifacts/conformance-report.txt || true
  tail -n 1 artifacts/conformance-report.txt
fi
if [ -f artifacts/conformance-server-report.txt ]; then
  grep -E '^(FAIL|DIFFER)' artifacts/conformance-server-report.txt || true
  tail -n 1 artifacts/conformance-server-report.txt
fi
# The Linux 6.1 goldens with the 6.1 profile: KNOWN lines are the "6.1: not yet modelled"
# list of tests/conformance/README.md.
for r in artifacts/conformance-k61-report.txt artifacts/conformance-k61-server-report.txt; do
  if [ -f "$r" ]; then
    grep -E '^(FAIL|KNOWN|NOW-PASSES|MISSING|DIFFER|NOTE)' "$r" || true
    tail -n 1 "$r"
  fi
done
# The coverage of the kernel's own uffd-unit-tests.c (tests/conformance/uffd-unit-tests-coverage.tsv).
if [ -f artifacts/uffd-unit-tests-coverage.txt ]; then
  grep -E 'DIVERGES' artifacts/uffd-unit-tests-coverage.txt || true
  tail -n 1 artifacts/uffd-unit-tests-coverage.txt
fi
exit $rc
