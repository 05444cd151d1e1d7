#!/usr/bin/env bash
# Installs the Debian tools the tests use as outside judges, if missing.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v faketime >/dev/null || need+=(faketime)
command -v cmsutil >/dev/null || need+=(libnss3-tools)
command -v gpgsm >/dev/null || need+=(gpgsm)
command -v gpg-connect-agent >/dev/null || need+=(gpgconf)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root: apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "installed: ${need[*]}"
