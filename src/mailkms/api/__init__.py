"""HTTP surfaces: the HTTPS API with OpenAPI, and the plain-http publication app."""

from mailkms.api._app import create_app, create_http_app

__all__ = ["create_app", "create_http_app"]
