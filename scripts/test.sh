#!/usr/bin/env bash
# Install flashdistill with its test extras and the app into .venv, make sure Debian's chromium is
# there for the app's browser test, and run the test suite (CPU, offline).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv || exit 1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,app]" || exit 1
if ! command -v chromium >/dev/null 2>&1; then
  # Playwright's own browser download is not reachable from these machines: use Debian's package.
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; }
  if ! command -v chromium >/dev/null 2>&1; then
    echo "scripts/test.sh: could not install Debian's chromium (apt-get install chromium), which the app's browser" \
         "test needs; install it and rerun" >&2
    exit 1
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
