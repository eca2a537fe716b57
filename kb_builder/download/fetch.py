"""The one HTTP fetch of the download stage, put in place of img2dataset's `download_image`.

img2dataset fetches with `urllib.request.urlopen(url, timeout)`: every scheme urllib knows (`file:`,
`data:`, `ftp:`), the whole body into memory, and a timeout per socket operation only (a server that
drips a byte every few seconds holds a thread forever). Its resizer decodes an image before looking at
its size, so a small decompression bomb is decoded in full. This fetch, with the same signature and
the same error texts for what it shares with urllib (`failure_class` reads them):

- accepts `http` and `https` only, redirects included; other URLs are not opened
  ("unsupported url scheme ...", class `unsupported_scheme`);
- stops at `max_bytes` (the Content-Length is checked before the body; a body without one is counted
  as it arrives): "response over max_bytes ...", class `too_many_bytes`;
- gives the whole request `deadline` seconds (connect, headers and body; each socket read waits at
  most the time left): "deadline of ... exceeded", class `deadline_exceeded`;
- reads the image's size from its header (Pillow, nothing decoded) and refuses more than `max_pixels`:
  "image of WxH pixels is over max_pixels ...", class `too_many_pixels`.

`SafeDownloader` is img2dataset's Downloader with this fetch in place while it downloads a shard, in
this process or in the spawned processes of `img2dataset.download()` (the limits travel with the
pickled downloader). Importing this module imports img2dataset.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import img2dataset.downloader as _i2d
from img2dataset.downloader import Downloader
from PIL import Image, UnidentifiedImageError

from retformer.kb_builder.download.settings_schema import DownloadSettings

ALLOWED_SCHEMES = ("http", "https")
_READ_SIZE = 1 << 16
# img2dataset's browser-like agent string (servers answer it as they answer img2dataset).
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


@dataclass(frozen=True)
class FetchLimits:
    """Per-request limits (download settings `max_bytes`, `max_pixels`, `deadline`)."""

    max_bytes: int
    max_pixels: int
    deadline: float


class FetchRefused(Exception):
    """A response this fetch will not take (its text is the sample's error_message)."""


def _check_scheme(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise FetchRefused(f"unsupported url scheme {scheme or '(none)'!r}: only http and https are fetched")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp: too; these stay on http(s)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        _check_scheme(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # Only these handlers: no file:, data: or ftp: handler to open what the scheme check missed.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


_OPENER = _opener()


def _set_read_timeout(response: Any, seconds: float) -> None:
    """Let the next socket read of `response` wait at most `seconds` (a private attribute chain of
    http.client; without it each read waits up to the request's timeout, past the deadline)."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


def _image_pixels(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, None when Pillow does not know the format (then
    OpenCV's own limit applies when img2dataset decodes it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError:
        return (-1, -1)  # over twice Pillow's MAX_IMAGE_PIXELS: over any max_pixels this stage allows
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def fetch(url: str, timeout: float, limits: FetchLimits, user_agent: str = _USER_AGENT) -> tuple[bytes, Any]:
    """(body, response headers) of one GET within `limits`; FetchRefused or urllib's errors otherwise."""
    _check_scheme(url)
    deadline = time.monotonic() + limits.deadline
    request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
    with _OPENER.open(request, timeout=min(timeout, limits.deadline)) as response:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limits.max_bytes:
            raise FetchRefused(f"response over max_bytes={limits.max_bytes} (Content-Length {length})")
        body = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchRefused(f"deadline of {limits.deadline:g} s exceeded after {len(body)} bytes")
            _set_read_timeout(response, min(timeout, left))
            try:
                chunk = response.read1(_READ_SIZE)
            except TimeoutError:
                if deadline - time.monotonic() <= 0:
                    raise FetchRefused(
                        f"deadline of {limits.deadline:g} s exceeded after {len(body)} bytes"
                    ) from None
                raise
            if not chunk:
                break
            body += chunk
            if len(body) > limits.max_bytes:
                raise FetchRefused(f"response over max_bytes={limits.max_bytes} (no Content-Length)")
        return bytes(body), response.headers


def fetch_image(
    row: tuple[int, str],
    timeout: float,
    user_agent_token: str | None,
    disallowed_header_directives: set[str] | None,
    *,
    limits: FetchLimits,
) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's `download_image(row, timeout, user_agent_token, disallowed_header_directives)`
    within `limits`: (key, image stream, None) or (key, None, error message)."""
    key, url = row
    agent = _USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        data, headers = fetch(url, timeout, limits, agent)
        if disallowed_header_directives and _i2d.is_disallowed(
            headers, user_agent_token, disallowed_header_directives
        ):
            return key, None, "Use of image disallowed by X-Robots-Tag directive"
        size = _image_pixels(data)
        if size is not None and (size[0] < 0 or size[0] * size[1] > limits.max_pixels):
            shown = "more than twice Pillow's limit of" if size[0] < 0 else f"{size[0]}x{size[1]}"
            return key, None, f"image of {shown} pixels is over max_pixels={limits.max_pixels}"
        return key, io.BytesIO(data), None
    except Exception as err:  # noqa: BLE001 - as img2dataset: every failure is the sample's message
        return key, None, str(err)


_PATCH_LOCK = threading.Lock()
_patch_depth = 0
_ORIGINAL = _i2d.download_image


@contextlib.contextmanager
def fetch_with_limits(limits: FetchLimits) -> Iterator[None]:
    """img2dataset's downloader module fetches with `fetch_image` within `limits` inside this block
    (its `download_image_with_retry` looks the function up at each call)."""
    global _patch_depth
    import functools

    with _PATCH_LOCK:
        _i2d.download_image = functools.partial(fetch_image, limits=limits)
        _patch_depth += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _patch_depth -= 1
            if _patch_depth == 0:
                _i2d.download_image = _ORIGINAL


class SafeDownloader(Downloader):
    """img2dataset's Downloader, fetching with `fetch_image` within `limits` (a FetchLimits, or
    `SafeDownloader.default_limits` where img2dataset's `download()` builds the downloader itself)."""

    default_limits: FetchLimits | None = None

    def __init__(self, *args: Any, limits: FetchLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits or type(self).default_limits
        if self.limits is None:
            raise ValueError("SafeDownloader needs limits")

    def download_shard(self, row: Any) -> Any:
        with fetch_with_limits(self.limits):
            return super().download_shard(row)


def install_in_download(limits: dict[str, Any]) -> None:
    """Make `img2dataset.download()` (run in this interpreter) use SafeDownloader with `limits`."""
    import img2dataset.main

    SafeDownloader.default_limits = FetchLimits(**limits)
    img2dataset.main.Downloader = SafeDownloader


def limits_from_settings(settings: DownloadSettings) -> FetchLimits:
    """The FetchLimits of normalised download settings."""
    return FetchLimits(
        max_bytes=int(settings.max_bytes),
        max_pixels=int(settings.max_pixels),
        deadline=float(settings.deadline),
    )


__all__ = [
    "ALLOWED_SCHEMES",
    "FetchLimits",
    "FetchRefused",
    "SafeDownloader",
    "fetch",
    "fetch_image",
    "fetch_with_limits",
    "install_in_download",
    "limits_from_settings",
]
