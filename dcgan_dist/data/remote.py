"""Shard sets that live elsewhere: `http(s)://host/prefix/`, `s3://bucket/prefix/`, `gs://bucket/prefix/`,
or a command template, `pipe:CMD ... {name} ...`, whose stdout is the file. Files are named as on disk
under the prefix and read whole (a shard is 5-50 MB, fetched ahead by threads while the reader works).
s3:// and gs:// go through fsspec (s3fs, gcsfs) where it is installed, else the provider's CLI.

What comes back is not trusted (docs/TRUST.md): a download is read up to the size the manifest gives and
no further, within one deadline for the whole file, not a timeout per socket read; HTTP redirects stay
within the scheme and a 4xx is not retried; a `pipe:` template is split into words once, as a shell would,
and run without a shell, so `{name}` is part of one argument whatever it holds (`$VAR` is expanded, so a
token need not be written into the config; nothing else is interpreted).
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import os
import select
import shlex
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, TypeVar, Union
from urllib.parse import unquote, urlsplit, urlunsplit

from dcgan_dist.errors import UserError
from dcgan_dist.redact import redact

PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")
# For slow or flaky storage (and quick tests), from the environment: tries per file, the first backoff
# (doubled after each failure), and a download's fixed time allowance.
ATTEMPTS = int(os.environ.get("DCGAN_REMOTE_ATTEMPTS", "4"))
BACKOFF_S = float(os.environ.get("DCGAN_REMOTE_BACKOFF_S", "0.5"))
TIMEOUT_S = float(os.environ.get("DCGAN_REMOTE_TIMEOUT_S", "60"))
MIN_BYTES_PER_S = 1 << 20           # ... plus its size at this rate: a 12 MB shard gets 72 s in all
MAX_UNSIZED_BYTES = 64 << 20        # a file the manifest gives no size for (the manifest itself)
UPLOAD_REPLY_BYTES = 1 << 20        # what an upload's command or server may print back (read, then dropped)
AHEAD = 2                           # shards fetched ahead of the reader
T = TypeVar("T")


class PermanentError(OSError):
    """A failure that another try would only repeat (HTTP 4xx, a refused redirect, a missing CLI)."""


def is_remote(location: Union[str, os.PathLike]) -> bool:
    return str(location).startswith(PREFIXES)


def member(location: str, name: str) -> str:
    """Where file `name` of the set at `location` is, as text: a URL, or for pipe: the command (with
    `$VAR` left unexpanded: this is what messages show)."""
    if location.startswith("pipe:"):
        return "pipe:" + shlex.join(pipe_argv(location, name, expand=False))
    if location.startswith(("http://", "https://")):
        parts = urlsplit(location)                 # the name goes into the path; a ?token=... stays last
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))
    return location.rstrip("/") + "/" + name


def pipe_argv(location: str, name: str, expand: bool = True) -> list[str]:
    """The command for file `name` of a `pipe:` set: the template's words, with `$VAR` expanded from
    the environment (unless `expand` is false) and then `{name}` replaced inside them."""
    template, shown = location[len("pipe:"):], redact(location)
    if "{name}" not in template:
        raise UserError(f"data.shards '{shown}': a pipe: set needs '{{name}}' where the file name goes, e.g. "
                        "pipe:curl -fsS https://host/celeba64/{name}")
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UserError(f"data.shards '{shown}': cannot split the pipe: command into words ({exc})") from None
    if not words:
        raise UserError(f"data.shards '{shown}': the pipe: command is empty")
    return [(os.path.expandvars(word) if expand else word).replace("{name}", name) for word in words]


def read_command(url: str) -> list[str]:
    """The CLI that writes the object at an s3:// or gs:// URL to stdout."""
    return ["aws", "s3", "cp", "--only-show-errors", url, "-"] if url.startswith("s3://") else \
        ["gcloud", "storage", "cat", url]


def write_command(url: str) -> list[str]:
    """The CLI that stores its stdin as the object at an s3:// or gs:// URL."""
    return ["aws", "s3", "cp", "--only-show-errors", "-", url] if url.startswith("s3://") else \
        ["gcloud", "storage", "cp", "-", url]


def fsspec_filesystem(url: str):
    """fsspec's filesystem for an s3:// or gs:// URL when its backend (s3fs, gcsfs) is installed, else None."""
    try:
        __import__({"s3://": "s3fs", "gs://": "gcsfs"}[url[:5]])
        import fsspec
    except (KeyError, ImportError):
        return None
    return fsspec.filesystem(url[:2])


def _deadline(size: Optional[int]) -> float:
    return time.monotonic() + TIMEOUT_S + (size or 0) / MIN_BYTES_PER_S


def fetch(location: str, name: str, size: Optional[int] = None) -> bytes:
    """One attempt at file `name` of the set at `location`: exactly `size` bytes when given (the
    manifest's), else at most MAX_UNSIZED_BYTES. Every failure is an OSError, a short or long read too."""
    limit, deadline, url = size if size is not None else MAX_UNSIZED_BYTES, _deadline(size), member(location, name)
    if location.startswith("pipe:"):
        data = _run(pipe_argv(location, name), limit, deadline)
    elif url.startswith(("http://", "https://")):
        request, timeout = _request(url, deadline)
        with _http_errors(), _OPENER.open(request, timeout=timeout) as response:
            data = _read_capped(response.read1, limit, deadline)
            promised = response.headers.get("Content-Length")
        if promised is not None and promised.isdigit() and int(promised) != len(data):
            raise OSError(f"cut short: {len(data)} of the {promised} bytes the server announced")
    else:
        fs = fsspec_filesystem(url)
        data = fs.cat_file(url, start=0, end=limit + 1) if fs is not None else _run(read_command(url), limit, deadline)
    if len(data) > limit:
        raise OSError(f"more than the {limit} bytes expected")
    if size is not None and len(data) != size:
        raise OSError(f"cut short: {len(data)} of the {size} bytes its manifest gives")
    return data


def upload(location: str, name: str, data: bytes) -> None:
    """One attempt at storing `data` as file `name` of the set at `location`."""
    deadline, url = _deadline(len(data)), member(location, name)
    if location.startswith("pipe:"):
        _run(pipe_argv(location, name), UPLOAD_REPLY_BYTES, deadline, stdin=data)   # e.g. curl -T prints a reply
    elif url.startswith(("http://", "https://")):
        request, timeout = _request(url, deadline, data=data, method="PUT")
        request.add_header("Content-Type", "application/octet-stream")
        with _http_errors(), _OPENER.open(request, timeout=timeout) as response:
            _read_capped(response.read1, UPLOAD_REPLY_BYTES, deadline)
    elif (fs := fsspec_filesystem(url)) is not None:
        fs.pipe_file(url, data)
    else:
        _run(write_command(url), UPLOAD_REPLY_BYTES, deadline, stdin=data)


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """https -> http would hand the rest of the exchange to anyone on the path: refuse it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlsplit(req.full_url).scheme, urlsplit(newurl).scheme
        if new != old:
            raise PermanentError(f"refused a redirect from {old} to {new} ({redact(newurl)})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameSchemeRedirects)


def _request(url: str, deadline: float, **kwargs) -> tuple[urllib.request.Request, float]:
    """A request for `url` with any user:password in it sent as Basic auth (never to a redirect's
    target), and the socket timeout that keeps one read within the deadline."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=host)), **kwargs)
    if userinfo:
        token = base64.b64encode(unquote(userinfo).encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request, max(0.1, min(TIMEOUT_S, deadline - time.monotonic()))


@contextlib.contextmanager
def _http_errors():
    """HTTP failures as OSErrors whose text is the status line; a 4xx (bar 408 and 429) as permanent."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
        raise (PermanentError if permanent else OSError)(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise exc.reason if isinstance(exc.reason, PermanentError) else exc from None
    except OSError:
        raise
    except ValueError as exc:                   # a malformed URL (http.client.InvalidURL is one)
        raise PermanentError(f"malformed URL ({exc})") from None
    except http.client.HTTPException as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from None


def _read_capped(read1: Callable[[int], bytes], limit: int, deadline: float) -> bytes:
    """read1() until EOF; an OSError once more than `limit` bytes came or the deadline passed."""
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise OSError(f"not finished within its deadline ({total} bytes in)")
        chunk = read1(1 << 20)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise OSError(f"more than the {limit} bytes expected")
        chunks.append(chunk)


def _run(argv: list[str], limit: int, deadline: float, stdin: Optional[bytes] = None) -> bytes:
    """Run `argv` (no shell) and return its stdout, at most `limit` bytes, within the deadline."""
    name = argv[0]
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=errors)
        except FileNotFoundError:
            raise PermanentError(f"'{name}' not found: install it, or the fsspec backend (pip install s3fs / "
                                 "gcsfs)") from None
        except OSError as exc:
            raise PermanentError(f"cannot run '{name}' ({exc.strerror})") from None

        def feed() -> None:
            with contextlib.suppress(OSError):   # a command that exits early: its exit code says why
                proc.stdin.write(stdin)
                proc.stdin.close()

        if stdin is not None:
            threading.Thread(target=feed, daemon=True).start()

        def read1(n: int) -> bytes:          # a read that waits for data no longer than the deadline
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
                raise OSError(f"'{name}' not finished within its deadline")
            return os.read(proc.stdout.fileno(), n)

        try:
            out = _read_capped(read1, limit, deadline)
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            proc.wait()
            raise exc if isinstance(exc, OSError) else OSError(f"'{name}' not finished within its deadline") from None
        finally:
            proc.stdout.close()
        if code != 0:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            raise OSError(f"'{name}' exited {code}: {redact(lines[-1]) if lines else 'no message'}")
    return out


def with_retries(action: Callable[[], T], what: str, on_retry: Optional[Callable[[str], None]] = None) -> T:
    """`action()`, tried ATTEMPTS times with exponential backoff; the last OSError says how many tries.
    A PermanentError is not tried again. `what` is shown redacted."""
    for attempt in range(ATTEMPTS):
        try:
            return action()
        except PermanentError as exc:
            raise PermanentError(f"{exc} (not retried)") from None
        except OSError as exc:
            reason = str(exc.reason if isinstance(exc, urllib.error.URLError) else exc) or type(exc).__name__
            if attempt == ATTEMPTS - 1:
                raise OSError(f"{reason} (tried {ATTEMPTS} times)") from None
            if on_retry is not None:
                on_retry(f"{redact(what)}: {reason}; retrying")
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


def fetch_ahead(jobs: list[T], get: Callable[[T], Union[bytes, OSError]]) -> Iterator[tuple[T, Union[bytes, OSError]]]:
    """(job, get(job)) in order, with the next AHEAD jobs running in threads while the caller reads the
    current one; `get` returns the error that stopped it rather than raising."""
    pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="shard-fetch")
    try:
        pending = deque(pool.submit(get, j) for j in jobs[:AHEAD])
        for i, job in enumerate(jobs):
            if i + AHEAD < len(jobs):
                pending.append(pool.submit(get, jobs[i + AHEAD]))
            yield job, pending.popleft().result()
    finally:                   # a reader that stops early (training ended) starts no further downloads
        pool.shutdown(wait=False, cancel_futures=True)
