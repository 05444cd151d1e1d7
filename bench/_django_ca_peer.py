"""django-ca's Python API as a peer: run ONLY inside the separate bench venv that has django-ca.

usage: python _django_ca_peer.py WORKDIR CA_KEY.pem CA_CERT.pem CSR_DIR N
Prints one JSON line: {"version": ..., "rate": certs/s, "n": N}. mailkms's issuing CA (same key,
same certificate) is imported with `manage.py import_ca` (not timed; django-ca itself only makes
power-of-two RSA keys), then `Certificate.objects.create_cert` is timed over the N CSRs (SQLite).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

work, ca_key, ca_cert = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
csr_dir, n = Path(sys.argv[4]), int(sys.argv[5])
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
call_command("import_ca", "bench", ca_key, ca_cert, verbosity=0)
ca = CertificateAuthority.objects.get(name="bench")
backend = key_backends["default"]
use = backend.get_use_private_key_options(ca, {})
csrs = [x509.load_pem_x509_csr(p.read_bytes()) for p in sorted(csr_dir.glob("*.csr"))[:n]]


def subject_of(csr: x509.CertificateSigningRequest) -> x509.Name:
    mailbox = str(csr.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value)
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mailbox), *csr.subject])


start = time.perf_counter()
for csr in csrs:
    Certificate.objects.create_cert(ca, use, csr, subject=subject_of(csr), not_after=timedelta(days=500))
elapsed = time.perf_counter() - start
print(json.dumps({"version": django_ca.__version__, "rate": len(csrs) / elapsed, "n": len(csrs)}))
