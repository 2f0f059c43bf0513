#!/usr/bin/env bash
# Install what the project needs into ./.venv; with --test also what the tests need:
# the test extras from PyPI and, when running as root on Debian, Orthanc (+DICOMweb plugin),
# DCMTK, Chromium (headless page tests) and 7-Zip (opens the encrypted package zips) from Debian. Safe to run again: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[ "${1:-}" = "--test" ] && with_test=1

if [ "$with_test" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  for pkg in orthanc orthanc-dicomweb dcmtk chromium 7zip; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing" >&2
    # Install without starting the packaged Orthanc service: tests start their own.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if [ "$with_test" = 1 ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi

# The Medplum FHIR peer for tests (tests/peers/medplum): only when npm is there; the tests
# that need it skip, saying why, when it is not.
if [ "$with_test" = 1 ] && command -v npm >/dev/null 2>&1 \
    && [ ! -d tests/peers/medplum/node_modules/@medplum/fhir-router ]; then
  echo "installing the Medplum FHIR test peer (npm ci)" >&2
  (cd tests/peers/medplum && npm ci --no-audit --no-fund --silent)
fi
