"""One root for every refusal mailkms makes.

Each class has a stable `code` (the tail of the problem type URI), a user-safe
`detail`, and an HTTP status. Surfaces map them in one place each:
`api/_problems.py` (RFC 9457), `cli/_exit.py` (exit codes), `client` (user text).
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_BASE = "urn:mailkms:problem:"


class MailkmsError(Exception):
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, detail: str | None = None, **extra: object) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)

    @classmethod
    def problem_type(cls) -> str:
        return PROBLEM_BASE + cls.code


# --- families -----------------------------------------------------------------
class Malformed(MailkmsError):
    code = "malformed"
    title = "The request is malformed"
    http_status = 400
    exit_code = 2


class Unauthorized(MailkmsError):
    code = "unauthorized"
    title = "Not authorised"
    http_status = 401
    exit_code = 3


class NotFound(MailkmsError):
    code = "not-found"
    title = "Not found"
    http_status = 404
    exit_code = 4


class Conflict(MailkmsError):
    code = "conflict"
    title = "Conflict with the current state"
    http_status = 409
    exit_code = 5


class PolicyRefused(MailkmsError):
    code = "policy-refused"
    title = "Refused by policy"
    http_status = 403
    exit_code = 6


class Internal(MailkmsError):
    code = "internal"
    title = "Internal error"
    http_status = 500
    exit_code = 1


class ConfigError(MailkmsError):
    code = "bad-configuration"
    title = "The configuration is not valid"
    http_status = 500
    exit_code = 78


# --- malformed input ------------------------------------------------------------
class KeyStoreUnavailable(MailkmsError):
    """The PKCS#11 token that holds the CA keys is gone, locked or refuses: nothing was issued;
    the next request opens the token again."""

    code = "key-store-unavailable"
    title = "The CA key store is not available"
    http_status = 503
    exit_code = 75  # EX_TEMPFAIL: try again when the token is back


class BadCSR(Malformed):
    code = "bad-csr"
    title = "The certificate request is not valid"


class BadCSRSignature(BadCSR):
    code = "bad-csr-signature"
    title = "The certificate request's signature does not verify"


class BadKey(Malformed):
    code = "bad-key"
    title = "The key type or size is not allowed"


class BadMessage(Malformed):
    code = "bad-message"
    title = "The message is not a valid mailkms message"


class BadJWS(Malformed):
    code = "bad-jws"
    title = "The signed request is malformed"


class URLMismatch(Unauthorized):
    code = "url-mismatch"
    title = "The signed request was made for another URL"


# --- tokens ---------------------------------------------------------------------
class TokenInvalid(Unauthorized):
    code = "token-invalid"
    title = "The enrolment token is not valid"


class TokenUsed(Unauthorized):
    code = "token-used"
    title = "The enrolment token has already been used"


class TokenExpired(Unauthorized):
    code = "token-expired"
    title = "The enrolment token has expired"


class TokenWrongMailbox(Unauthorized):
    code = "token-wrong-mailbox"
    title = "The enrolment token was issued for another mailbox"


class TokenReplaced(TokenInvalid):
    code = "token-replaced"
    title = "The enrolment token was replaced by a newer one"


# --- signed requests --------------------------------------------------------------
class BadSignature(Unauthorized):
    code = "bad-signature"
    title = "The request's signature does not verify"


class UnknownIssuer(Unauthorized):
    code = "unknown-issuer"
    title = "The certificate was not issued by this CA"


class NotCurrentCertificate(Unauthorized):
    code = "not-current-certificate"
    title = "The certificate is not the user's current signing certificate"


class NotOwner(Unauthorized):
    code = "not-owner"
    title = "The certificate belongs to another mailbox"


class BadNonce(Unauthorized):
    code = "bad-nonce"
    title = "The nonce is unknown to this server"


class ReplayedNonce(BadNonce):
    code = "nonce-reused"
    title = "The nonce has already been used (replayed request)"


class NonceRequired(BadNonce):
    code = "nonce-required"
    title = "The request must carry a fresh nonce from this server"


class StaleNonce(BadNonce):
    code = "nonce-stale"
    title = "The nonce has expired; fetch a fresh one"


class MetricsTokenInvalid(Unauthorized):
    code = "metrics-token"
    title = "/metrics wants the configured bearer token"


# --- lifecycle ---------------------------------------------------------------------
class ReenrolmentRequired(PolicyRefused):
    code = "reenrolment-required"
    title = "The certificates have expired; enrolment by an administrator is required"


class Revoked(PolicyRefused):
    code = "revoked"
    title = "The certificates have been revoked; enrolment by an administrator is required"


class ReservedMailbox(PolicyRefused):
    code = "reserved-mailbox"
    title = "This address is the server's own and cannot be a user"


class NotDue(PolicyRefused):
    code = "not-due"
    title = "The certificates are not yet due for renewal"


class UserNotFound(NotFound):
    code = "user-not-found"
    title = "No such user"


class UserExists(Conflict):
    code = "user-exists"
    title = "The user already exists"


class CertificateNotFound(NotFound):
    code = "certificate-not-found"
    title = "No certificate with that serial number was issued by this CA"


class CRLNotFound(NotFound):
    code = "crl-not-found"
    title = "No such CRL partition"


class AlreadyRevoked(Conflict):
    code = "already-revoked"
    title = "Already revoked"


class BadRevocationReason(Malformed):
    code = "bad-revocation-reason"
    title = "The revocation reason is not allowed"


class NothingToResend(NotFound):
    code = "nothing-to-resend"
    title = "There is no reply to send again"


# --- archive recovery (M-of-N quorum) ----------------------------------------------------
class RecoveryRefused(Unauthorized):
    """The recovery officers' shares did not unlock the recovery key. Nothing was revealed."""

    code = "recovery-refused"
    title = "The recovery quorum was refused"


class QuorumNotMet(RecoveryRefused):
    code = "quorum-not-met"
    title = "Fewer shares than the recovery threshold were given"


class ShareFromEarlierCeremony(RecoveryRefused):
    code = "share-from-earlier-ceremony"
    title = "A share belongs to a recovery ceremony that has been replaced"


class ShareDuplicate(RecoveryRefused):
    code = "share-duplicate"
    title = "The same share was given twice"


class ShareWrongPassphrase(RecoveryRefused):
    code = "share-wrong-passphrase"
    title = "The passphrase does not open the share"


class ShareTampered(RecoveryRefused):
    code = "share-tampered"
    title = "A share file was altered after it was written"


class ShareUnreadable(RecoveryRefused):
    code = "share-unreadable"
    title = "The file is not a mailkms recovery share"


class NoRecoveryCeremony(ConfigError):
    code = "no-recovery-ceremony"
    title = "There is no recovery key"


class NothingArchived(NotFound):
    code = "nothing-archived"
    title = "No archived encryption keys"


# --- client side ---------------------------------------------------------------------
class DeliveryRefused(MailkmsError):
    """A delivery mail the client will not install."""

    code = "delivery-refused"
    title = "The delivery mail was refused"
    exit_code = 7


class ClientStateError(MailkmsError):
    code = "client-state"
    title = "The client's key store is not in a usable state"
    exit_code = 8


class WrongPassphrase(ClientStateError):
    code = "wrong-passphrase"
    title = "The passphrase does not unlock the key store"


class ServerRefused(MailkmsError):
    """The server answered the client with a problem document."""

    code = "server-refused"
    title = "The server refused the request"
    exit_code = 6

    def __init__(self, status: int, problem: dict[str, object]) -> None:
        self.status = status
        self.problem_type_uri = str(problem.get("type", ""))
        self.problem_code = self.problem_type_uri.rsplit(":", 1)[-1]
        super().__init__(str(problem.get("detail") or problem.get("title") or f"HTTP {status}"))


class ServerUnreachable(MailkmsError):
    code = "server-unreachable"
    title = "The server cannot be reached"
    exit_code = 10


class FingerprintMismatch(MailkmsError):
    code = "fingerprint-mismatch"
    title = "The CA fingerprint does not match"
    exit_code = 11


class ServerNotPinned(FingerprintMismatch):
    """After enrolment: the server's TLS certificate does not chain to the pinned root (or is not
    for its host name). Not "unreachable": something answers, and it is not the user's server."""

    code = "server-not-pinned"
    title = "The server's TLS certificate is not from the pinned CA"


# --- the user's mailbox (Maildir or IMAP), where deliveries arrive ------------------------------
class MailboxError(MailkmsError):
    """The mailbox could not be read. Each cause has its own exit code, for scripts."""

    code = "mailbox-error"
    title = "The mailbox could not be read"
    http_status = 502
    exit_code = 12


class BadMailboxURL(Malformed):
    code = "bad-mailbox-url"
    title = "The mailbox URL is not valid (imaps://user@host[:port]/FOLDER or imap://...)"


class MailboxUnreachable(MailboxError):
    code = "mailbox-unreachable"
    title = "The IMAP server cannot be reached"
    exit_code = 13


class MailboxLoginFailed(MailboxError):
    code = "mailbox-login-failed"
    title = "The IMAP server refused the user name or password"
    exit_code = 14


class MailboxTLSUntrusted(MailboxError):
    code = "mailbox-tls-untrusted"
    title = "The IMAP server's TLS certificate is not trusted"
    exit_code = 15


class MailboxFolderMissing(MailboxError):
    code = "mailbox-folder-missing"
    title = "The mailbox folder does not exist"
    exit_code = 16


# --- the mail program's key store (NSS, gpgsm) ---------------------------------------------
class MailStoreError(MailkmsError):
    """Installing into a mail program's key store failed. The keys stay safe in mailkms's own store."""

    code = "mail-store"
    title = "The mail program's key store could not be updated"
    exit_code = 17


class MailStoreToolMissing(MailStoreError):
    code = "mail-store-tool-missing"
    title = "A program needed to write the mail program's key store is not installed"


class MailStorePassword(MailStoreError):
    code = "mail-store-password"
    title = "The password of the mail program's key store is missing or wrong"
    exit_code = 18


# --- EST (RFC 7030) ---------------------------------------------------------------------
class UnsupportedMediaType(Malformed):
    code = "unsupported-media-type"
    title = "The request's content type is not the one this operation takes"
    http_status = 415


class BadBase64(Malformed):
    code = "bad-base64"
    title = "The body is not base64 (RFC 7030 §4, RFC 8951)"


class BodyTooLarge(Malformed):
    code = "body-too-large"
    title = "The request body is too large"
    http_status = 413


class EncryptedKeyUnsupported(Malformed):
    code = "encrypted-key-unsupported"
    title = "Server-generated keys are returned over TLS only (no DecryptKeyIdentifier attributes)"


class CredentialsRequired(Unauthorized):
    code = "credentials-required"
    title = "HTTP Basic credentials are required: the mailbox and its one-time enrolment token"


class StaleRequest(Unauthorized):
    code = "stale-request"
    title = "The signed request is too old or from the future (signingTime); sign it again"


class NoKeyToCollect(PolicyRefused):
    code = "no-key-to-collect"
    title = "No server-generated key is waiting for these credentials"


# --- CMP (RFC 4210/9480, RFC 9483) ---------------------------------------------------------------
# A refusal may name the PKIFailureInfo bit it stands for (`fail=` in extra); the CMP surface maps
# the others by class (api/_cmp.py).
class BadCMPMessage(Malformed):
    code = "bad-cmp-message"
    title = "The CMP message is malformed or asks for something this server does not do"


class BadCMPProtection(Unauthorized):
    code = "bad-cmp-protection"
    title = "The CMP message's protection (MAC or signature) does not verify"


class BadPOP(Malformed):
    code = "bad-pop"
    title = "The proof of possession of the requested key does not verify"


class CMPTransactionInUse(Conflict):
    code = "cmp-transaction-in-use"
    title = "This CMP transactionID was used before; start a new transaction"


class CMPUnknownTransaction(Conflict):
    code = "cmp-unknown-transaction"
    title = "No open CMP transaction has this transactionID, or its nonces do not match"


# --- secure e-mail (S/MIME) -------------------------------------------------------------------
class NotSigned(BadMessage):
    code = "not-signed"
    title = "The message is not signed"


class NotARecipient(BadMessage):
    code = "not-a-recipient"
    title = "The message is not encrypted to any of your keys"


class NotInDirectory(NotFound):
    code = "not-in-directory"
    title = "No current encryption certificate is published for this address"


class UntrustedCertificate(Unauthorized):
    code = "untrusted-certificate"
    title = "The certificate is not trusted for this use"


# --- what a client may cost the server --------------------------------------------------------
class RateLimited(MailkmsError):
    """Too many requests from one client address; `retry_after` (seconds) goes in Retry-After."""

    code = "rate-limited"
    title = "Too many requests; try again later"
    http_status = 429
    exit_code = 12


class RequestTimeout(Malformed):
    code = "request-timeout"
    title = "The request body did not arrive in time"
    http_status = 408


class MethodNotAllowed(Malformed):
    code = "method-not-allowed"
    title = "The method is not allowed on this path"
    http_status = 405


# --- administrators (console and admin API) ---------------------------------------------------
class AdminNotFound(NotFound):
    code = "admin-not-found"
    title = "No such administrator"


class AdminExists(Conflict):
    code = "admin-exists"
    title = "The administrator already exists"


class LoginFailed(Unauthorized):
    """Wrong name, password or second factor: which one is not said."""

    code = "login-failed"
    title = "The name, password or one-time code is wrong"


class AccountLocked(Unauthorized):
    code = "account-locked"
    title = "Too many failed log-ins; the account is locked for a while"


class AdminAuthRequired(Unauthorized):
    code = "admin-auth-required"
    title = "An administrator's API token (Authorization: Bearer) or console session is required"


class RoleForbidden(PolicyRefused):
    code = "role-forbidden"
    title = "The administrator's role does not allow this"


class CSRFRefused(PolicyRefused):
    code = "csrf-refused"
    title = "The form's CSRF token is missing or wrong"


# --- ACME (RFC 8555, RFC 8823): api/_acme.py maps these to urn:ietf:params:acme:error:* -------
class ACMEBadSignatureAlgorithm(Malformed):
    code = "acme-bad-signature-algorithm"
    title = "The JWS algorithm is not supported (RS256, ES256, ES384)"


class ACMEAccountDoesNotExist(Unauthorized):
    code = "acme-account-does-not-exist"
    title = "No ACME account is known for this key"


class ACMEUnsupportedIdentifier(Malformed):
    code = "acme-unsupported-identifier"
    title = "Only one identifier of type email is served"


class ACMERejectedIdentifier(PolicyRefused):
    code = "acme-rejected-identifier"
    title = "This server does not issue for that mailbox's domain"


class ACMEIncorrectResponse(Unauthorized):
    code = "acme-incorrect-response"
    title = "The challenge reply does not prove control of the mailbox"


class ACMEOrderNotReady(Conflict):
    code = "acme-order-not-ready"
    title = "The order is not ready to be finalized"


class ACMENotFound(NotFound):
    code = "acme-not-found"
    title = "No such ACME resource for this account"


class ACMEAccountDeactivated(Unauthorized):
    code = "acme-account-deactivated"
    title = "The ACME account was deactivated; its key is refused (RFC 8555 §7.3.6)"


class ACMEKeyInUse(Conflict):
    code = "acme-key-in-use"
    title = "The new key already belongs to an ACME account (RFC 8555 §7.3.5)"


class ApprovalNotFound(NotFound):
    code = "approval-not-found"
    title = "No such approval request"


class ApprovalClosed(Conflict):
    """Released already, expired, or this officer has approved it already."""

    code = "approval-closed"
    title = "The approval request takes no more approvals from you"


class PasskeyRequired(LoginFailed):
    """`mailkms admin require-passkey NAME`: a password and a TOTP code are not enough."""

    code = "passkey-required"
    title = "This administrator must log in with a passkey"
