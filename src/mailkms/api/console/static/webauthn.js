// mailkms console: passkey registration and log-in (WebAuthn). Served from /admin/static/; the
// pages that load it allow script-src 'self' only. Options come from the server as WebAuthn JSON.
"use strict";

async function mailkmsPost(url, csrf, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(answer.detail || `refused (${response.status})`);
  }
  return answer;
}

function mailkmsStatus(text) {
  document.getElementById("passkey-status").textContent = text;
}

async function mailkmsRegister(event) {
  event.preventDefault();
  const form = event.target;
  const csrf = form.dataset.csrf;
  try {
    const options = await mailkmsPost("/admin/passkeys/options", csrf, {});
    const created = await navigator.credentials.create({
      publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options),
    });
    await mailkmsPost("/admin/passkeys", csrf, { credential: created.toJSON(), label: document.getElementById("label").value });
    mailkmsStatus("Passkey registered.");
    window.location.reload();
  } catch (error) {
    mailkmsStatus(`The passkey was not registered: ${error.message}`);
  }
}

async function mailkmsLogin(event) {
  event.preventDefault();
  const form = event.target;
  const csrf = form.dataset.csrf;
  try {
    const options = await mailkmsPost("/admin/login/passkey/options", csrf, {
      name: document.getElementById("name").value,
      password: document.getElementById("password").value,
    });
    const asserted = await navigator.credentials.get({
      publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options),
    });
    const done = await mailkmsPost("/admin/login/passkey", csrf, { credential: asserted.toJSON() });
    window.location.assign(done.next);
  } catch (error) {
    mailkmsStatus(`Log-in failed: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const register = document.getElementById("passkey-register");
  if (register) register.addEventListener("submit", mailkmsRegister);
  const login = document.getElementById("passkey-login");
  if (login) login.addEventListener("submit", mailkmsLogin);
});
