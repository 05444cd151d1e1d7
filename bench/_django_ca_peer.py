"""django-ca's Python API as a peer: run ONLY inside the separate bench venv that has django-ca.

usage: python _django_ca_peer.py WORKDIR KEYTYPE(rsa3072|p256) CSR_DIR N
Prints one JSON line: {"version": ..., "rate": certs/s, "n": N}. A CA is made (not timed), then
`Certificate.objects.create_cert` is timed over the N CSRs (SQLite, as in django-ca's quick start).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

work, key_type, csr_dir, n = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
work.mkdir(parents=True, exist_ok=True)
(work / "bench_urls.py").write_text(
    'from django.urls import include, path\nurlpatterns = [path("django_ca/", include("django_ca.urls"))]\n'
)
sys.path.insert(0, str(work))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

settings.configure(
    SECRET_KEY="bench-only",
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django_ca"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(work / "db.sqlite3")}},
    STORAGES={
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(work)}},
        "django-ca": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(work / "ca")},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    },
    CA_DEFAULT_HOSTNAME="ca.example.org",
    ROOT_URLCONF="bench_urls",
    USE_TZ=True,
    CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
)
django.setup()

import django_ca  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django_ca.key_backends import key_backends  # noqa: E402
from django_ca.models import Certificate, CertificateAuthority  # noqa: E402

call_command("migrate", verbosity=0)
backend = key_backends["default"]
kt, size, curve = ("RSA", 3072, None) if key_type == "rsa3072" else ("EC", None, "secp256r1")
try:
    options = backend.get_create_private_key_options(kt, size, curve, {"password": None, "path": Path("ca")})
except KeyError:
    prefix = backend.options_prefix
    options = backend.get_create_private_key_options(
        kt, size, curve, {f"{prefix}password": None, f"{prefix}path": Path("ca")}
    )
not_after = datetime.now(UTC) + timedelta(days=3650)
ca = CertificateAuthority.objects.init(
    name="bench",
    key_backend=backend,
    key_backend_options=options,
    subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]),
    not_after=not_after,
    key_type=kt,
)
use = backend.get_use_private_key_options(ca, {})
csrs = [x509.load_pem_x509_csr(p.read_bytes()) for p in sorted(csr_dir.glob("*.csr"))[:n]]
subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
start = time.perf_counter()
for csr in csrs:
    Certificate.objects.create_cert(ca, use, csr, subject=csr.subject, not_after=timedelta(days=500))
elapsed = time.perf_counter() - start
print(json.dumps({"version": django_ca.__version__, "rate": len(csrs) / elapsed, "n": len(csrs)}))
