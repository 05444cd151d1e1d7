"""HTTP surfaces: the HTTPS API with OpenAPI, and the plain-http publication app."""

from mailkms.api._app import create_app, create_http_app
from mailkms.api._observability import create_metrics_app
from mailkms.api._ocsp_listener import OCSPListeners

__all__ = ["OCSPListeners", "create_app", "create_http_app", "create_metrics_app"]
