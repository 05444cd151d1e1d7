"""Log-on when the user's session starts: the autostart files, and how the question reaches the user.

`mailkms-client install-autostart` writes a systemd user service + timer (at the start of the
user's session, then daily while a session lasts) and an XDG autostart entry (desktops that start
programs from ~/.config/autostart). Both run `logon --auto`: the question goes to the terminal if
there is one, else to a desktop notification with Yes/No actions (freedesktop notifications via
libnotify's `notify-send`). A notification that cannot be shown or is closed unanswered sends
nothing; the question comes again at the next log-on. Nothing ever answers for the user.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SERVICE_NAME = "mailkms-logon.service"
TIMER_NAME = "mailkms-logon.timer"
DESKTOP_NAME = "mailkms-logon.desktop"
NOTIFY_TIMEOUT_SECONDS = 15 * 60  # a question nobody answers is dropped, never answered


class Reply(StrEnum):
    YES = "yes"
    NO = "no"
    UNANSWERED = "unanswered"  # shown, closed without an answer
    NOT_SHOWN = "not-shown"  # no terminal and no notification service


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def logon_command(home: Path) -> list[str]:
    """The command the session runs: this Python and this client, whatever PATH the session has."""
    return [sys.executable, "-m", "mailkms.client", "--home", str(home), "logon", "--auto"]


def _desktop_exec(argv: list[str]) -> str:
    # Desktop Entry spec: arguments with reserved characters are double-quoted, with \ " ` $ escaped
    def quote(arg: str) -> str:
        if arg and not any(c in arg for c in " \t\n\"'\\><~|&;$*?#()`%"):
            return arg
        escaped = "".join("\\" + c if c in '"`$\\' else c for c in arg)
        return f'"{escaped.replace("%", "%%")}"'

    return " ".join(quote(a) for a in argv)


def _systemd_exec(argv: list[str]) -> str:
    # systemd.syntax: shell-like quoting; '%' starts a specifier and is doubled
    return " ".join(shlex.quote(a).replace("%", "%%") for a in argv)


def autostart_files(home: Path, *, with_xdg: bool = True) -> dict[str, str]:
    """Relative path under the XDG config folder -> file content. With the XDG entry (which runs
    at log-in) the timer only asks again daily, so the two never ask twice at the session's start."""
    argv = logon_command(home)
    at_start = "" if with_xdg else "OnStartupSec=1min\n"
    service = f"""[Unit]
Description=mailkms: log on to advanced security (new certificates, the update question)
After=graphical-session.target

[Service]
Type=oneshot
ExecStart={_systemd_exec(argv)}
# a question nobody answers is dropped, never answered: the unit ends and the next run asks again
TimeoutStartSec={NOTIFY_TIMEOUT_SECONDS // 60 + 5}min
"""
    timer = f"""[Unit]
Description=mailkms: log on to advanced security, daily while the session lasts

[Timer]
{at_start}OnCalendar=*-*-* 10:00
Unit=mailkms-logon.service

[Install]
WantedBy=timers.target
"""
    desktop = f"""[Desktop Entry]
Type=Application
Name=mailkms log-on
Comment=Log on to advanced security: install new certificates and ask when they approach expiration
Exec={_desktop_exec(argv)}
Terminal=false
NoDisplay=true
X-GNOME-Autostart-enabled=true
"""
    return {
        f"systemd/user/{SERVICE_NAME}": service,
        f"systemd/user/{TIMER_NAME}": timer,
        f"autostart/{DESKTOP_NAME}": desktop,
    }


@dataclass(frozen=True)
class Installed:
    written: list[Path]
    enabled: bool  # the timer was enabled through a running systemd user manager
    enable_hint: str


def install_autostart(home: Path, *, systemd: bool = True, xdg: bool = True) -> Installed:
    written: list[Path] = []
    for rel, content in autostart_files(home, with_xdg=xdg).items():
        if rel.startswith("systemd/") and not systemd:
            continue
        if rel.startswith("autostart/") and not xdg:
            continue
        path = config_home() / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        written.append(path)
    enabled = False
    hint = ""
    if systemd:
        # Enabling is the user manager's job; without one (a container, a root shell) say how instead.
        timer_link = config_home() / "systemd/user/timers.target.wants" / TIMER_NAME
        timer_link.parent.mkdir(parents=True, exist_ok=True)
        if not timer_link.exists():
            timer_link.symlink_to(config_home() / "systemd/user" / TIMER_NAME)
        written.append(timer_link)
        if shutil.which("systemctl") and os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            done = subprocess.run(
                ["systemctl", "--user", "daemon-reload"], capture_output=True, timeout=30, check=False
            )
            enabled = done.returncode == 0
        if not enabled:
            hint = "systemctl --user daemon-reload   (at your next session start the timer runs by itself)"
    return Installed(written, enabled, hint)


def remove_autostart() -> list[Path]:
    removed = []
    for rel in [*autostart_files(Path()).keys(), f"systemd/user/timers.target.wants/{TIMER_NAME}"]:
        path = config_home() / rel
        if path.exists() or path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def has_terminal() -> bool:
    return sys.stdin.isatty()


def ask_by_notification(summary: str, question: str, timeout: float = NOTIFY_TIMEOUT_SECONDS) -> Reply:
    """A desktop notification with Yes/No actions; waits for the click. Closed, expired or
    unanswered is UNANSWERED; no notification service (no session bus, no notify-send) is NOT_SHOWN."""
    tool = shutil.which("notify-send")
    if tool is None or not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return Reply.NOT_SHOWN
    # The notification server expires the question; some (GNOME) ignore that, so we stop waiting too.
    try:
        done = subprocess.run(
            [
                tool,
                "--app-name=mailkms",
                "--urgency=normal",
                f"--expire-time={int(timeout * 1000)}",
                "--action=yes=Yes",
                "--action=no=No",
                summary,
                question,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout + 60,
        )
    except subprocess.TimeoutExpired:
        return Reply.UNANSWERED
    if done.returncode != 0:
        return Reply.NOT_SHOWN
    answer = done.stdout.strip()
    if answer == "yes":
        return Reply.YES
    if answer == "no":
        return Reply.NO
    return Reply.UNANSWERED


def notify(summary: str, text: str) -> bool:
    """A plain notification (what happened); False when none can be shown."""
    tool = shutil.which("notify-send")
    if tool is None or not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return False
    try:
        done = subprocess.run([tool, "--app-name=mailkms", summary, text], capture_output=True, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@contextlib.contextmanager
def single_auto_logon(home: Path) -> Iterator[bool]:
    """The timer and the autostart entry may both fire at the start of a session: one asks, the
    other sees the lock taken and leaves quietly (yields False)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(home / ".autologon.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def askpass_passphrase() -> bytes | None:
    """The key store passphrase from an askpass program (`MAILKMS_ASKPASS`, as SSH_ASKPASS and
    SUDO_ASKPASS work: it prints the passphrase on stdout), for log-ons without a terminal."""
    program = os.environ.get("MAILKMS_ASKPASS")
    if not program:
        return None
    try:
        done = subprocess.run(
            [*shlex.split(program), "mailkms: key store passphrase"], capture_output=True, check=False
        )
    except OSError:
        return None
    value = done.stdout.rstrip(b"\r\n")
    return value if done.returncode == 0 and value else None
