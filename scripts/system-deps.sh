#!/usr/bin/env bash
# Installs the Debian tools the tests use as outside judges, if missing.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v faketime >/dev/null || need+=(faketime)
command -v cmsutil >/dev/null || need+=(libnss3-tools)
# the mail programs' key stores: NSS (Thunderbird, Evolution) above, gpgsm (KMail, mutt, Claws)
command -v gpgsm >/dev/null || need+=(gpgsm)
command -v gpg-connect-agent >/dev/null || need+=(gpgconf)
command -v curl >/dev/null || need+=(curl)
# CA keys in a PKCS#11 token: SoftHSM2 stands in for the HSM in the tests
command -v softhsm2-util >/dev/null || need+=(softhsm2)
# the real mail path of the end-to-end tests: Postfix relays into Dovecot (LMTP), Dovecot serves IMAP
command -v postfix >/dev/null || need+=(postfix)
command -v dovecot >/dev/null || need+=(dovecot-imapd dovecot-lmtpd)
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-lmtpd)
# log-on at session start: notifications (libnotify) on a session bus, and the units' and entry's validators
command -v notify-send >/dev/null || need+=(libnotify-bin)
command -v dbus-daemon >/dev/null || need+=(dbus-daemon)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v desktop-file-validate >/dev/null || need+=(desktop-file-utils)
# the web console's browser tests: Debian's headless Chromium, driven by Playwright (no browser download)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
mapfile -t need < <(printf "%s\n" "${need[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root: apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "installed: ${need[*]}"
