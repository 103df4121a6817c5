"""Storage settings (``--data-dir oss://...``, ``--oss-endpoint``, ``--cache-dir`` ...), one frozen value.

Credentials come from the environment only (``OSS_ACCESS_KEY_ID``,
``OSS_ACCESS_KEY_SECRET``, optional ``OSS_SECURITY_TOKEN`` / ``OSS_SESSION_TOKEN``)
so they never show up in a process list.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..options import add_option
from .errors import StorageConfigError
from .location import OssLocation, is_oss_url

DEFAULT_CACHE_MAX_GB = 100.0
DEFAULT_URL_EXPIRES_S = 3600
DEFAULT_PART_SIZE_BYTES = 16 * 1024 * 1024
DEFAULT_DOWNLOAD_WORKERS = 8
DEFAULT_INPUT_LIST_TTL_S = 10.0


@dataclass(frozen=True)
class StorageSettings:
    """Where the bucket is and how we use it; ``location`` is None for a mounted data dir."""

    location: OssLocation | None = None  # --data-dir oss://BUCKET/PREFIX
    endpoint: str | None = None
    access_key_id: str | None = None
    access_key_secret: str | None = None
    security_token: str | None = None
    cache_dir: Path | None = None
    cache_max_gb: float = DEFAULT_CACHE_MAX_GB
    prefetch_models: bool = False
    url_expires_s: int = DEFAULT_URL_EXPIRES_S
    # A mounted data dir that is also reachable as this bucket prefix (signed URLs for outputs).
    mounted_location: OssLocation | None = None
    output_url_base: str | None = None
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    download_workers: int = DEFAULT_DOWNLOAD_WORKERS
    # How old the listing of PREFIX/input may get before LoadImage's choices ask the bucket again.
    input_list_ttl_s: float = DEFAULT_INPUT_LIST_TTL_S

    def __repr__(self) -> str:  # keep the secret out of logs
        return (f"StorageSettings(location={self.location}, endpoint={self.endpoint!r}, "
                f"cache_dir={self.cache_dir}, mounted_location={self.mounted_location})")

    @property
    def bucket_location(self) -> OssLocation | None:
        """The bucket prefix that holds the data dir (oss:// or mounted with --oss-bucket)."""
        return self.location or self.mounted_location

    @property
    def cache_max_bytes(self) -> int:
        return int(self.cache_max_gb * 1024**3)

    @property
    def local_root(self) -> Path:
        """The local mirror of an oss:// data dir: custom_nodes, cached models, input/output."""
        assert self.cache_dir is not None
        return self.cache_dir / "data"

    def check(self) -> None:
        if self.bucket_location is not None:
            if not self.endpoint:
                raise StorageConfigError("--oss-endpoint is required with an oss:// data dir or --oss-bucket")
            if not self.access_key_id or not self.access_key_secret:
                raise StorageConfigError(
                    "OSS credentials missing: set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET")
        if self.cache_max_gb <= 0:
            raise StorageConfigError("--cache-max-gb must be positive")
        if self.url_expires_s <= 0:
            raise StorageConfigError("--url-expires must be positive (seconds)")
        if self.input_list_ttl_s < 0:
            raise StorageConfigError("--input-list-ttl must not be negative (seconds)")


def add_storage_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The storage flags every edition accepts (``--data-dir`` itself belongs to the edition)."""
    add_option(parser, "--oss-endpoint", default=None,
               help="OSS endpoint for an oss:// data dir or --oss-bucket, e.g. https://oss-cn-hangzhou-internal.aliyuncs.com"
                    " (credentials: OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET, OSS_SECURITY_TOKEN)")
    add_option(parser, "--cache-dir", default=None,
               help="local disk for an oss:// data dir: synced custom_nodes, cached models, input/output"
                    " (default ~/.cache/comfyserve/oss/<bucket>-<hash>)")
    add_option(parser, "--cache-max-gb", type=float, default=DEFAULT_CACHE_MAX_GB,
               help="bound of the model cache; least recently used models go first")
    add_option(parser, "--prefetch-models", action="store_true",
               help="download every model into the cache at start instead of on first use")
    add_option(parser, "--url-expires", type=int, default=DEFAULT_URL_EXPIRES_S,
               help="lifetime in seconds of the signed URLs given for outputs")
    add_option(parser, "--input-list-ttl", type=float, default=DEFAULT_INPUT_LIST_TTL_S,
               help="oss:// data dir: seconds before LoadImage's list of the bucket's input/ is listed again"
                    " (images uploaded through other instances show up after this)")
    add_option(parser, "--oss-bucket", default=None,
               help="oss://BUCKET/PREFIX that a mounted --data-dir is, to hand out signed URLs for outputs")
    add_option(parser, "--output-url-base", default=None,
               help="public base URL of the output folder (URL = base/subfolder/filename) instead of signed URLs")


def storage_settings_from_args(args: argparse.Namespace, data_dir: str | None) -> StorageSettings | None:
    """Storage settings, or None when the data dir is local and no bucket/URL base is named."""
    oss_bucket = getattr(args, "oss_bucket", None)
    output_url_base = getattr(args, "output_url_base", None)
    if not is_oss_url(data_dir) and not oss_bucket and not output_url_base:
        return None
    location = OssLocation.parse(data_dir) if is_oss_url(data_dir) else None
    mounted = OssLocation.parse(oss_bucket) if oss_bucket else None
    cache_dir = getattr(args, "cache_dir", None)
    if location is not None and not cache_dir:
        digest = hashlib.sha256(str(location).encode()).hexdigest()[:12]
        cache_dir = Path("~/.cache/comfyserve/oss").expanduser() / f"{location.bucket}-{digest}"
    settings = StorageSettings(
        location=location,
        endpoint=getattr(args, "oss_endpoint", None),
        access_key_id=os.environ.get("OSS_ACCESS_KEY_ID"),
        access_key_secret=os.environ.get("OSS_ACCESS_KEY_SECRET"),
        security_token=os.environ.get("OSS_SECURITY_TOKEN") or os.environ.get("OSS_SESSION_TOKEN") or None,
        cache_dir=Path(cache_dir).expanduser().resolve() if cache_dir else None,
        cache_max_gb=getattr(args, "cache_max_gb", DEFAULT_CACHE_MAX_GB),
        prefetch_models=bool(getattr(args, "prefetch_models", False)),
        url_expires_s=getattr(args, "url_expires", DEFAULT_URL_EXPIRES_S),
        input_list_ttl_s=getattr(args, "input_list_ttl", DEFAULT_INPUT_LIST_TTL_S),
        mounted_location=mounted,
        output_url_base=output_url_base.rstrip("/") if output_url_base else None,
    )
    settings.check()
    return settings


def instance_flags(settings: StorageSettings) -> list[str]:
    """Flags that give a spawned ``comfyserve standard`` the same storage (an edition that starts
    local instances passes these on; credentials stay in the inherited environment).

    With an oss:// data dir this includes ``--data-dir oss://...``; each child should get its
    own ``--cache-dir`` only if the caller overrides it (sharing one is safe: downloads lock).
    """
    flags: list[str] = []
    if settings.location is not None:
        flags += ["--data-dir", str(settings.location)]
    if settings.endpoint:
        flags += ["--oss-endpoint", settings.endpoint]
    if settings.cache_dir is not None:
        flags += ["--cache-dir", str(settings.cache_dir)]
    flags += ["--cache-max-gb", str(settings.cache_max_gb), "--url-expires", str(settings.url_expires_s),
              "--input-list-ttl", str(settings.input_list_ttl_s)]
    if settings.prefetch_models:
        flags.append("--prefetch-models")
    if settings.mounted_location is not None:
        flags += ["--oss-bucket", str(settings.mounted_location)]
    if settings.output_url_base:
        flags += ["--output-url-base", settings.output_url_base]
    return flags
