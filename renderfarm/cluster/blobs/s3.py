"""Blobs in an S3-compatible object store (MinIO in the compose file; AWS S3; anything that speaks S3),
through boto3 (the optional extra `renderfarm[s3]`: importing this module does not need it, opening a store
does).

Where the store is: `s3://bucket/prefix`; the endpoint, region and credentials come from the options given
(`endpoint_url`, `region`, `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`), else from
boto3's own lookup (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws).
A custom endpoint is addressed path-style (http://host:9000/bucket/key), as MinIO expects. A bucket that does
not exist is created on the first write. A single PUT is atomic in S3: a reader sees all of a blob or none.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any

from renderfarm.cluster.blobs import BlobStore, BlobStoreError, validate_key

OPTIONS = ("endpoint_url", "region", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_REFUSED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
            "AccountProblem", "InvalidToken", "ExpiredToken", "Forbidden"}
# S3 itself never fills up; MinIO and quota-enforcing gateways do, and say so with these.
_FULL = {"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded", "InsufficientStorage",
         "XMinioDiskFull", "StorageFull"}
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def split(url: str) -> tuple[str, str]:
    """(bucket, key or prefix) of an s3:// URL; BlobStoreError ("invalid") naming the URL otherwise."""
    if not url.startswith("s3://"):
        raise BlobStoreError(f"S3 URL {url!r}: must start with s3://", "invalid")
    bucket, _, rest = url[len("s3://"):].partition("/")
    if not BUCKET.fullmatch(bucket):
        raise BlobStoreError(f"S3 URL {url!r}: bucket {bucket!r} is not a valid bucket name (3-63 characters: "
                             "lowercase letters, digits, '.', '-')", "invalid")
    return bucket, rest


def _error(exc: Exception, doing: str, where: str) -> BlobStoreError:
    """A BlobStoreError for a botocore exception raised while `doing` ("write", "read", ...) at `where`."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    writing = doing in ("write", "delete", "sweep", "create bucket")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"{code}: {err.get('Message') or 'no message'}"
        if code in _MISSING and not writing:
            return BlobStoreError(f"blob missing (deleted, or expired by retention): {where} ({code})", "missing")
        if code in _FULL or status == 507:
            return BlobStoreError(f"blob store full: cannot {doing} {where}: {message}", "full")
        if code in _REFUSED or status == 403:
            kind = "unwritable" if writing else "denied"
            return BlobStoreError(f"blob store refused to {doing} {where}: {message} (check the credentials: "
                                  "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and the bucket's policy)", kind)
        if status >= 500:
            return BlobStoreError(f"blob store unreachable: cannot {doing} {where}: {message} (HTTP {status})",
                                  "unreachable")
        return BlobStoreError(f"blob store cannot {doing} {where}: {message}", "unwritable" if writing else "denied")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return BlobStoreError(f"cannot {doing} {where}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                              f"AWS_SECRET_ACCESS_KEY): {exc}", "unwritable" if writing else "denied")
    return BlobStoreError(f"blob store unreachable: cannot {doing} {where}: {exc}", "unreachable")


class S3BlobStore(BlobStore):
    scheme = "s3"

    def __init__(self, url: str, options: dict[str, Any]):
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise BlobStoreError(f"S3 blob store {url!r}: unknown option(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(OPTIONS)}", "invalid")
        self.bucket, prefix = split(url)
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        super().__init__(f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else ""), options)
        try:
            import boto3  # noqa: F401  (checked now: a missing extra is said at open, not at the first write)
        except ImportError as exc:
            raise BlobStoreError(f"S3 blob store {url!r} needs boto3, which is not installed: "
                                 "pip install 'renderfarm[s3]'", "unavailable") from exc
        self._client: Any = None
        self._lock = threading.Lock()
        self._bucket_checked = False

    @classmethod
    def open(cls, url: str, options: dict[str, Any]) -> S3BlobStore:
        return cls(url, options)

    @classmethod
    def home_of(cls, url: str) -> str:
        return f"s3://{split(url)[0]}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use (making one loads botocore's service model: ~0.1 s)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                opts = self.options
                endpoint = opts.get("endpoint_url") or None
                region = opts.get("region") or os.environ.get("AWS_REGION") or None
                session = boto3.session.Session(
                    aws_access_key_id=opts.get("aws_access_key_id"),
                    aws_secret_access_key=opts.get("aws_secret_access_key"),
                    aws_session_token=opts.get("aws_session_token"),
                    region_name=region,
                )
                path_style = endpoint is not None or bool(os.environ.get("AWS_ENDPOINT_URL"))
                config = Config(
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S, signature_version="s3v4",
                    retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path"} if path_style else None,
                )
                self._client = session.client("s3", endpoint_url=endpoint, config=config)
            return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(validate_key(key))}"

    def put(self, key: str, data: bytes) -> str:
        url = self.url_of(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BlobStoreError(f"blob {key!r}: data must be bytes, got {type(data).__name__}", "invalid")
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Body": bytes(data)}
        content_type = _CONTENT_TYPES.get(os.path.splitext(key)[1].lower())
        if content_type:
            kwargs["ContentType"] = content_type
        try:
            try:
                self.client.put_object(**kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchBucket" or self._bucket_checked:
                    raise
                self._create_bucket()
                self.client.put_object(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise _error(exc, "write", url) from exc
        return url

    def _create_bucket(self) -> None:
        """Create the bucket, once per store (a first write into an empty MinIO); someone else's creating it
        meanwhile is fine."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._bucket_checked = True
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _error(exc, "create bucket", f"s3://{self.bucket}") from exc
        except BotoCoreError as exc:
            raise _error(exc, "create bucket", f"s3://{self.bucket}") from exc

    def _owns(self, url: str) -> bool:
        bucket, key = split(url)
        return bucket == self.bucket and bool(key) and (not self.prefix or key.startswith(self.prefix + "/"))

    def _object(self, url: str) -> str:
        key = split(url)[1]
        if not key:
            raise BlobStoreError(f"S3 URL {url!r}: names a bucket, not a blob", "invalid")
        return key

    def _call(self, doing: str, url: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self._object(url), **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise _error(exc, doing, url) from exc

    def _get(self, url: str) -> bytes:
        response = self._call("read", url, "get_object")
        from botocore.exceptions import BotoCoreError

        try:
            with response["Body"] as body:
                return body.read()
        except BotoCoreError as exc:  # the connection dropped mid-body
            raise _error(exc, "read", url) from exc

    def _delete(self, url: str) -> None:
        self._call("delete", url, "delete_object")  # S3 answers 204 for a key that is not there

    def _exists(self, url: str) -> bool:
        try:
            self._call("read", url, "head_object")
        except BlobStoreError as exc:
            if exc.kind == "missing":
                return False
            raise
        return True

    def _presign(self, url: str, expires_s: int) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._object(url)}, ExpiresIn=expires_s)
        except (BotoCoreError, ClientError) as exc:
            raise _error(exc, "presign", url) from exc

    def sweep(self, older_than_s: float) -> int:
        """Delete objects under this store's prefix whose LastModified (the store's clock) is more than
        `older_than_s` seconds ago; how many."""
        if not older_than_s >= 0:
            raise BlobStoreError(f"sweep older_than_s={older_than_s!r}: must be a number >= 0", "invalid")
        from botocore.exceptions import BotoCoreError, ClientError

        cutoff = datetime.fromtimestamp(time.time() - older_than_s, tz=timezone.utc)
        prefix = self.prefix + "/" if self.prefix else ""
        deleted = 0
        try:
            old: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                old += [o["Key"] for o in page.get("Contents", ()) if o["LastModified"] < cutoff]
                while len(old) >= DELETE_BATCH:
                    deleted += self._delete_many(old[:DELETE_BATCH])
                    old = old[DELETE_BATCH:]
            if old:
                deleted += self._delete_many(old)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return deleted  # nothing written yet
            raise _error(exc, "sweep", self.url) from exc
        except BotoCoreError as exc:
            raise _error(exc, "sweep", self.url) from exc
        return deleted

    def _delete_many(self, keys: list[str]) -> int:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise BlobStoreError(f"blob store refused to delete {len(errors)} of {len(keys)} blobs in {self.url}, "
                                 f"e.g. {first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}",
                                 "unwritable")
        return len(keys)
