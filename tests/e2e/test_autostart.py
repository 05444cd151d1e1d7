"""Log-on at the start of the session: the autostart files, and the question as a desktop
notification when there is no terminal.

The session bus is a real dbus-daemon; the notifications go through libnotify's real
`notify-send`; the notification server is the test's own (jeepney), standing in for the desktop
and for the user who clicks Yes or No, and recording what was shown.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from jeepney import DBusAddress, HeaderFields, MessageType, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from tests.e2e.conftest import BIN, CLIENT_PASSPHRASE, ClientHome, Deployment, _env, enrolled

PROMPT = (
    "Your security certificates are approaching expiration.\n"
    "Do you want to send a certificate update request to the\n"
    "Key Management Server?"
)
DUE = 380  # days: past the 12-month reminder point, before the 18-month expiry
NOTIFICATIONS = DBusAddress("/org/freedesktop/Notifications", interface="org.freedesktop.Notifications")


@dataclass
class NotificationServer:
    """org.freedesktop.Notifications on a private session bus; clicks `click` on every question
    (None: closes it unanswered)."""

    address: str
    click: str | None = "yes"
    shown: list[tuple[str, str, list[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def serve(self, ready: threading.Event) -> None:
        conn = open_dbus_connection(bus=self.address)
        conn.send_and_get_reply(message_bus.RequestName("org.freedesktop.Notifications"))
        ready.set()
        next_id = 0
        while not self._stop.is_set():
            try:
                msg = conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            if msg.header.message_type != MessageType.method_call:
                continue
            member = msg.header.fields.get(HeaderFields.member)
            if member == "GetCapabilities":
                conn.send(new_method_return(msg, "as", (["actions", "body"],)))
            elif member == "GetServerInformation":
                conn.send(new_method_return(msg, "ssss", ("test", "mailkms-tests", "1", "1.2")))
            elif member == "Notify":
                _app, _replaces, _icon, summary, body, actions, _hints, _timeout = msg.body
                next_id += 1
                self.shown.append((summary, body, list(actions)))
                conn.send(new_method_return(msg, "u", (next_id,)))
                if actions:
                    if self.click is not None:
                        conn.send(new_signal(NOTIFICATIONS, "ActionInvoked", "us", (next_id, self.click)))
                    conn.send(new_signal(NOTIFICATIONS, "NotificationClosed", "uu", (next_id, 2)))
            elif member == "CloseNotification":
                conn.send(new_method_return(msg, "", ()))
        conn.close()

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1", f"--address=unix:dir={tmp_path}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address.startswith("unix:"), address
    yield address
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def notifications(session_bus: str) -> Iterator[NotificationServer]:
    server = NotificationServer(session_bus)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(ready,), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield server
    server.stop()
    thread.join(timeout=5)


def _auto_logon(client: ClientHome, extra: dict[str, str], offset_days: float) -> subprocess.CompletedProcess[str]:
    """`logon --auto` as the session starts it: no terminal (stdin is not a TTY)."""
    env = _env({"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE, **extra}, offset_days)
    env["FAKETIME_DONT_FAKE_MONOTONIC"] = "0"  # timed waits (notify-send) under libfaketime
    cmd = [str(BIN / "mailkms-client"), "--home", str(client.home), "logon", "--auto"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def due_user(deployment: Deployment, tmp_path: Path) -> ClientHome:
    deployment.start()
    alice = enrolled(deployment, tmp_path, "alice@example.org")
    deployment.stop()
    deployment.start(offset_days=DUE)
    return alice


def test_no_answers_no_sends_nothing_yes_sends_the_request(
    deployment: Deployment, due_user: ClientHome, notifications: NotificationServer, session_bus: str
) -> None:
    env = {"DBUS_SESSION_BUS_ADDRESS": session_bus}

    notifications.click = "no"
    res = _auto_logon(due_user, env, DUE)
    assert res.returncode == 0, res.stderr
    assert notifications.shown[0][1] == PROMPT
    assert notifications.shown[0][2] == ["yes", "Yes", "no", "No"]
    assert "No update request was sent" in res.stdout
    assert due_user.run("status", "--json", offset_days=DUE).json()["pending"] is None  # type: ignore[index]

    notifications.click = None  # closed without an answer: nothing is answered for the user
    res = _auto_logon(due_user, env, DUE)
    assert res.returncode == 0, res.stderr
    assert "closed unanswered" in res.stdout
    assert due_user.run("status", "--json", offset_days=DUE).json()["pending"] is None  # type: ignore[index]

    notifications.click = "yes"
    res = _auto_logon(due_user, env, DUE)
    assert res.returncode == 0, res.stderr
    assert "The certificate update request was sent" in res.stdout
    pending = due_user.run("status", "--json", offset_days=DUE).json()["pending"]  # type: ignore[index]
    assert pending is not None and pending["kind"] == "renewal"
    # the user was told, by a notification without actions, what happened
    assert notifications.shown[-1][0] == "Certificate update request sent"
    assert notifications.shown[-1][2] == []


def test_no_notification_service_falls_back_to_the_terminal(deployment: Deployment, due_user: ClientHome) -> None:
    res = _auto_logon(due_user, {"DBUS_SESSION_BUS_ADDRESS": ""}, DUE)
    assert res.returncode == 0, res.stderr
    assert "could not be shown" in res.stdout and "mailkms-client logon" in res.stdout
    assert due_user.run("status", "--json", offset_days=DUE).json()["pending"] is None  # type: ignore[index]
    # the next log-on in a terminal asks
    res2 = due_user.run("logon", offset_days=DUE, input_text="n\n")
    assert PROMPT in res2.out


def test_askpass_unlocks_the_store_when_there_is_no_terminal(
    deployment: Deployment, due_user: ClientHome, notifications: NotificationServer, session_bus: str, tmp_path: Path
) -> None:
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' '{CLIENT_PASSPHRASE}'\n")
    askpass.chmod(0o700)
    env = _env({"DBUS_SESSION_BUS_ADDRESS": session_bus, "MAILKMS_ASKPASS": str(askpass)}, DUE)
    env["FAKETIME_DONT_FAKE_MONOTONIC"] = "0"  # timed waits (askpass, notify-send) under libfaketime
    env.pop("MAILKMS_CLIENT_PASSPHRASE", None)
    notifications.click = "no"
    cmd = [str(BIN / "mailkms-client"), "--home", str(due_user.home), "logon", "--auto"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert notifications.shown and notifications.shown[0][1] == PROMPT

    # without any way to the passphrase: nothing unlocked, the user is told where to answer
    env.pop("MAILKMS_ASKPASS")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert "key store stays locked" in res.stdout
    assert notifications.shown[-1][2] == []  # a plain notice, no Yes/No that could not be honoured
    assert "mailkms-client logon" in notifications.shown[-1][1]


def test_install_autostart_writes_units_and_entry_that_the_tools_accept(deployment: Deployment, tmp_path: Path) -> None:
    deployment.start()
    alice = enrolled(deployment, tmp_path, "alice@example.org")
    config = tmp_path / "xdg-config"
    env = _env({"MAILKMS_CLIENT_PASSPHRASE": CLIENT_PASSPHRASE, "XDG_CONFIG_HOME": str(config)}, None)
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    cmd = [str(BIN / "mailkms-client"), "--home", str(alice.home), "install-autostart"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    service = config / "systemd/user/mailkms-logon.service"
    timer = config / "systemd/user/mailkms-logon.timer"
    desktop = config / "autostart/mailkms-logon.desktop"
    assert service.exists() and timer.exists() and desktop.exists()
    assert (config / "systemd/user/timers.target.wants/mailkms-logon.timer").resolve() == timer

    # outside judges: systemd's own parser and the freedesktop validator
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(service), str(timer)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr
    validated = subprocess.run(["desktop-file-validate", str(desktop)], capture_output=True, text=True)
    assert validated.returncode == 0 and not validated.stdout.strip(), validated.stdout + validated.stderr

    # the command they run works as written (the desktop entry's Exec, unquoted as the spec says)
    entry = configparser.ConfigParser(interpolation=None)
    entry.read(desktop)
    argv = shlex.split(entry["Desktop Entry"]["Exec"])
    assert argv[-2:] == ["logon", "--auto"]
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stderr
    assert "You are logged on to advanced security." in ran.stdout

    removed = subprocess.run([*cmd, "--remove"], env=env, capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0
    assert not service.exists() and not desktop.exists() and not timer.exists()


def test_two_auto_logons_at_once_ask_once(tmp_path: Path) -> None:
    from mailkms.client._autostart import single_auto_logon

    with single_auto_logon(tmp_path) as first, single_auto_logon(tmp_path) as second:
        assert first is True and second is False
    with single_auto_logon(tmp_path) as again:
        assert again is True


@pytest.fixture(autouse=True)
def _tools() -> None:
    missing = [
        t for t in ("dbus-daemon", "notify-send", "systemd-analyze", "desktop-file-validate") if not shutil.which(t)
    ]
    if missing:
        pytest.fail(f"missing {missing}: scripts/system-deps.sh installs them")
