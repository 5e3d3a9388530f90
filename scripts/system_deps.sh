#!/usr/bin/env bash
# Install the Debian packages the project needs, when they are missing:
#   libportaudio2  sounddevice (microphone client)
#   espeak-ng sox  real synthesised speech for tests and benchmarks
#   nodejs npm     buf (proto lint) and the Node.js client test
#   chromium chromium-driver  the realtime page's browser test (headless, driven by selenium)
set -u
need=()
dpkg -s libportaudio2 >/dev/null 2>&1 || need+=(libportaudio2)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: please install: ${need[*]}" >&2; exit 1
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
