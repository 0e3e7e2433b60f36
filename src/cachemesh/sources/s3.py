"""S3-compatible object stores: AWS S3, Alibaba Cloud OSS, MinIO, Ceph, R2…

``s3://bucket/prefix`` with ``--endpoint-url`` for anything but AWS;
``oss://bucket/prefix`` is the same source with virtual-host addressing (what
OSS requires) and an endpoint that must be given. A prefix that names one
object pulls that object (as ``<its name>``); a prefix that is a "directory"
pulls every object below it, at paths relative to the prefix. Keys that would
not be safe file paths (``..``, absolute, backslashes, control characters) are
skipped with a warning in the cache's events.

Configuration comes from the environment the settings were built from
(``Settings.environ``), as the AWS tools read it: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, ``AWS_CA_BUNDLE`` (else ``Settings.ca_bundle``); for
``oss://`` also ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``,
``OSS_SESSION_TOKEN``. Without keys or a profile,
boto3's own chain (config files, instance roles) is asked, and without any
credentials at all requests go unsigned (public buckets). Credentials never
appear in the source URI, the cache's spec, events or messages.

Checksums, best first: the object's full-object sha256
(``x-amz-checksum-sha256``, asked for with ``ChecksumMode=ENABLED``; a
multipart upload's composite checksum is a checksum of part checksums and is
not used), else the ETag when it is the MD5 of the bytes (single-part upload,
no SSE-KMS or SSE-C encryption), else only the size. Finding them costs one
HEAD per object, issued in parallel. Ranged reads carry ``If-Match`` with the
listed ETag (and the version id where the bucket is versioned), so an object
replaced during a pull fails cleanly instead of mixing two versions.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ..errors import (
    AccessDeniedError,
    InvalidInputError,
    SourceChangedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
    UnsafePathError,
)
from ..store.names import check_relpath
from .base import Listing, RemoteFile, RemoteSource, check_options, safe_name

if TYPE_CHECKING:
    from ..config import Settings

T = TypeVar("T")

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
# Bytes per read from the response body (boto's StreamingBody).
READ_CHUNK = 1024 * 1024
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestTimeTooSkewed", "OperationAborted", "RequestLimitExceeded",
}
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "AccountProblem", "InvalidSecurity",
}


# One boto3 session per profile for the process: a session loads botocore's
# service models once (creating a client from a warm session takes ~10 ms
# instead of ~200 ms). Credentials are given per client.
_SESSIONS: dict[str | None, Any] = {}
_SESSIONS_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Head:
    size: int
    etag: str
    version_id: str | None
    sha256: str | None
    md5: str | None


def _sha256_from_head(head: Mapping[str, Any]) -> str | None:
    """The full-object sha256 (hex) from a HEAD with ChecksumMode=ENABLED, if there is one."""
    value = head.get("ChecksumSHA256")
    if not value or "-" in value:  # "<b64>-N": composite, a checksum of part checksums
        return None
    kind = head.get("ChecksumType")
    multipart = "-" in str(head.get("ETag", ""))
    if kind == "COMPOSITE" or (multipart and kind != "FULL_OBJECT"):
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None


def _md5_from_head(head: Mapping[str, Any]) -> str | None:
    """The ETag as an MD5 of the bytes, when it is one."""
    match = _MD5_ETAG.match(str(head.get("ETag", "")))
    if not match:
        return None  # multipart ("-N" suffix) or not an MD5 at all
    headers = {k.lower(): v for k, v in
               head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).items()}
    sse = str(head.get("ServerSideEncryption") or headers.get("x-oss-server-side-encryption")
              or "").lower()
    if "kms" in sse or head.get("SSECustomerAlgorithm"):
        return None  # encrypted with KMS or a customer key: the ETag is not the MD5
    return match.group(1).lower()


class S3Source(RemoteSource):
    schemes = ("s3", "oss")
    options = ("endpoint_url",)

    def __init__(self, scheme: str, bucket: str, prefix: str, settings: Settings, *,
                 endpoint_url: str | None = None) -> None:
        super().__init__(settings)
        self.scheme, self.bucket, self.prefix = scheme, bucket, prefix
        self.endpoint_url = endpoint_url
        self.uri = f"{scheme}://{bucket}/{prefix}"
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._versions: dict[str, str] = {}

    # -- parsing -------------------------------------------------------------------------

    @classmethod
    def from_uri(cls, uri: str, options: Mapping[str, Any], settings: Settings) -> S3Source:
        check_options(cls, options)
        scheme, _, rest = uri.partition("://")
        scheme = scheme.lower()
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            raise InvalidInputError(
                f"{scheme}:// URIs take no credentials or ports: use AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY (or a profile) for credentials and --endpoint-url for"
                " the server"
            )
        if not _BUCKET_RE.match(bucket):
            raise InvalidInputError(f"{scheme}://: {bucket!r} is not a valid bucket name")
        env = settings.environ
        endpoint = (options.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3")
                    or env.get("AWS_ENDPOINT_URL") or None)
        if scheme == "oss" and not endpoint:
            raise InvalidInputError(
                "oss:// needs the endpoint of the OSS region: --endpoint-url"
                " https://oss-cn-hangzhou.aliyuncs.com (or AWS_ENDPOINT_URL_S3)"
            )
        if endpoint is not None:
            endpoint = _check_endpoint(str(endpoint))
        return cls(scheme, bucket, prefix, settings, endpoint_url=endpoint)

    def default_name(self) -> str:
        tail = self.prefix.rstrip("/").rsplit("/", 1)[-1]
        return safe_name(tail or self.bucket)

    def object_name(self, file: RemoteFile) -> str:
        return f"{self.scheme}://{self.bucket}/{file.locator}"

    def identity(self, file: RemoteFile) -> str:
        if file.sha256:
            return super().identity(file)
        version = self._versions.get(file.locator, "")
        return (f"s3\n{self.endpoint_url or 'aws'}\n{self.bucket}\n{file.locator}"
                f"\n{file.origin_tag}\n{version}\n{file.size}")

    # -- the client ----------------------------------------------------------------------

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.exceptions import BotoCoreError
        except ImportError:
            raise SourceError("s3:// sources need boto3: pip install 'cachemesh[s3]'") from None
        env = self.settings.environ
        oss = self.scheme == "oss"
        key = env.get("AWS_ACCESS_KEY_ID") or (env.get("OSS_ACCESS_KEY_ID") if oss else None)
        secret = env.get("AWS_SECRET_ACCESS_KEY") or (
            env.get("OSS_ACCESS_KEY_SECRET") if oss else None)
        token = env.get("AWS_SESSION_TOKEN") or (env.get("OSS_SESSION_TOKEN") if oss else None)
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        profile = None if key and secret else (env.get("AWS_PROFILE") or None)
        with _SESSIONS_LOCK:  # boto3 sessions are not thread-safe; their clients are
            try:
                session = _SESSIONS.get(profile)
                if session is None:
                    session = _SESSIONS[profile] = boto3.session.Session(profile_name=profile)
                signed = bool(key and secret) or session.get_credentials() is not None
            except BotoCoreError as exc:
                raise InvalidInputError(
                    f"{self.uri}: AWS configuration: {type(exc).__name__}") from exc
            return session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=region,
                verify=env.get("AWS_CA_BUNDLE") or self.settings.ca_bundle or None,
                aws_access_key_id=key if key and secret else None,
                aws_secret_access_key=secret if key and secret else None,
                aws_session_token=(token or None) if key and secret else None,
                config=self._config(signed, oss),
            )

    def _config(self, signed: bool, oss: bool) -> Any:
        import botocore
        from botocore.config import Config

        s = self.settings
        return Config(
            signature_version=None if signed else botocore.UNSIGNED,
            max_pool_connections=s.range_concurrency + s.fetch_concurrency,
            connect_timeout=min(30.0, s.fetch_timeout_s),
            read_timeout=s.fetch_timeout_s,
            # One attempt: our retries resume where a read stopped (fetch/retry.py).
            retries={"mode": "standard", "total_max_attempts": 1},
            s3={"addressing_style": "virtual" if oss else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one boto call with our retries, its errors translated."""

        def once() -> T:
            try:
                return fn()
            except Exception as exc:
                translated = translate(exc, what)
                if translated is None:
                    raise
                raise translated from exc

        return self.retry.call(once)

    # -- listing --------------------------------------------------------------------------

    def list_files(self) -> Listing:
        notes: list[str] = []
        where = f"{self.scheme}://{self.bucket}/{self.prefix}"
        base = self.prefix if self.prefix == "" or self.prefix.endswith("/") else self.prefix + "/"
        keys = self._call(where, lambda: self._list(base))
        if not keys and self.prefix and not self.prefix.endswith("/"):
            head = self._head_or_none(self.prefix)
            if head is None:
                raise SourceNotFoundError(f"{where}: no such object or prefix")
            name = self.prefix.rsplit("/", 1)[-1]
            try:
                check_relpath(name, "object name")
            except UnsafePathError as exc:
                raise UnsafePathError(f"{where}: {exc}") from None
            return Listing([self._file(name, self.prefix, head)])
        if not keys:
            raise SourceNotFoundError(f"{where}: no objects under this prefix")
        wanted: list[tuple[str, str]] = []
        for key in keys:
            rel = key[len(base):]
            try:
                rel = check_relpath(rel, "object key")
            except UnsafePathError as exc:
                notes.append(f"skipped object {key!r}: {exc}")
                continue
            wanted.append((rel, key))
        if not wanted:
            raise UnsafePathError(f"{where}: no object below the prefix has a safe name"
                                  f" ({notes[0].removeprefix('skipped ')})")
        workers = max(2, self.settings.fetch_concurrency)
        with ThreadPoolExecutor(workers, "cachemesh-s3-head") as pool:
            heads = list(pool.map(lambda rk: self._head(rk[1]), wanted))
        files = [self._file(rel, key, head) for (rel, key), head in zip(wanted, heads, strict=True)]
        files.sort(key=lambda f: f.path)
        return Listing(files, notes=notes)

    def _list(self, base: str) -> list[str]:
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") and obj.get("Size", 0) == 0:
                    continue  # a "folder" marker made by consoles
                keys.append(key)
        return keys

    def _head_call(self, key: str) -> _Head:
        raw = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        return _Head(size=int(raw["ContentLength"]), etag=str(raw.get("ETag", "")),
                     version_id=raw.get("VersionId"), sha256=_sha256_from_head(raw),
                     md5=_md5_from_head(raw))

    def _head(self, key: str) -> _Head:
        return self._call(f"{self.scheme}://{self.bucket}/{key}", lambda: self._head_call(key))

    def _head_or_none(self, key: str) -> _Head | None:
        try:
            return self._head(key)
        except SourceNotFoundError:
            return None

    def _file(self, rel: str, key: str, head: _Head) -> RemoteFile:
        if head.version_id and head.version_id != "null":
            self._versions[key] = head.version_id
        return RemoteFile(rel, head.size, sha256=head.sha256, md5=head.md5,
                          origin_tag=head.etag or None, locator=key)

    # -- reading --------------------------------------------------------------------------

    def read_range(self, file: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        what = self.object_name(file)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": file.locator,
                                "Range": f"bytes={start}-{end - 1}"}
        if file.origin_tag:
            args["IfMatch"] = file.origin_tag
        version = self._versions.get(file.locator)
        if version:
            args["VersionId"] = version
        try:
            response = self.client.get_object(**args)
            body = response["Body"]
            try:
                _check_content_range(response.get("ContentRange"), start, end, file.size, what)
                yield from body.iter_chunks(READ_CHUNK)
            finally:
                body.close()
        except SourceError:
            raise
        except Exception as exc:
            translated = translate(exc, what)
            if translated is None:
                raise
            raise translated from exc


def _check_endpoint(endpoint: str) -> str:
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        raise InvalidInputError("--endpoint-url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError("--endpoint-url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError("--endpoint-url must not contain credentials; use"
                                " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if parts.query or parts.fragment:
        raise InvalidInputError("--endpoint-url must not have a query or fragment")
    return endpoint.rstrip("/")


def _check_content_range(value: str | None, start: int, end: int, size: int, what: str) -> None:
    if value is None:
        if start == 0 and end == size:
            return  # a whole-object answer to a whole-object range
        raise SourceError(f"{what}: the server ignored a Range request")
    match = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", value.strip())
    if not match:
        raise SourceError(f"{what}: unexpected Content-Range {value!r}")
    first, last, total = match.groups()
    if total != "*" and int(total) != size:
        raise SourceChangedError(f"{what} changed at the origin (now {total} bytes, listed with"
                                 f" {size}); pull again")
    if (int(first), int(last)) != (start, end - 1):
        raise SourceError(f"{what}: asked for bytes {start}-{end - 1}, got {value!r}")


def translate(exc: BaseException, what: str) -> SourceError | None:
    """Our error for a boto/urllib3 exception, or None if it is not one of theirs.

    Messages name the object and the error code; never the exception's text,
    which for some botocore errors quotes request details.
    """
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchBucket",):
            return SourceNotFoundError(f"{what}: the bucket does not exist")
        if code in ("NoSuchKey", "NotFound", "NoSuchVersion") or status == 404:
            return SourceNotFoundError(f"{what}: no such object")
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDeniedError(f"{what}: access denied ({code or status}); check the"
                                     " credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the"
                                     " bucket policy")
        if code == "PreconditionFailed" or status == 412:
            return SourceChangedError(f"{what} changed at the origin while it was being pulled;"
                                      " pull again")
        if code == "InvalidRange" or status == 416:
            return SourceChangedError(f"{what} is shorter at the origin than when it was listed;"
                                      " pull again")
        if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500:
            return TransientSourceError(f"{what}: the server answered {code or status}")
        return SourceError(f"{what}: {code or status}")
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return AccessDeniedError(f"{what}: no usable credentials (set AWS_ACCESS_KEY_ID and"
                                 " AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(exc, bx.ParamValidationError):
        return SourceError(f"{what}: invalid request ({type(exc).__name__})")
    transient = (bx.EndpointConnectionError, bx.ConnectionError, bx.ReadTimeoutError,
                 bx.ConnectTimeoutError, bx.IncompleteReadError, bx.ResponseStreamingError,
                 ux.HTTPError, ConnectionError, TimeoutError)
    if isinstance(exc, transient):
        return TransientSourceError(f"{what}: {type(exc).__name__} while talking to the server")
    if isinstance(exc, bx.BotoCoreError):
        return SourceError(f"{what}: {type(exc).__name__}")
    return None
