"""Shard sets that live elsewhere: `http(s)://host/prefix/`, `s3://bucket/prefix/`, `gs://bucket/prefix/`,
or webdataset's `pipe:` form as a command template, `pipe:CMD ... {name} ...`, whose stdout is the file.

A set's files are named as on disk (`manifest.json`, `train-000000.tar`, ...) under the prefix. Reads
are whole files: a shard is 5-20 MB, fetched ahead by a thread while the previous one is consumed
(stream.py), and a download that fails part-way is simply fetched again, with backoff. s3:// and gs://
go through fsspec (s3fs, gcsfs) where that is installed, else through the provider's CLI (aws,
gcloud), which read their usual credentials from the environment.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from dcgan_dist.errors import UserError
from dcgan_dist.fsutil import atomic_write_bytes

PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")
ATTEMPTS = int(os.environ.get("DCGAN_REMOTE_ATTEMPTS", "4"))     # tries per file; tests may lower it
BACKOFF_S = float(os.environ.get("DCGAN_REMOTE_BACKOFF_S", "0.5"))   # doubles after each failure
TIMEOUT_S = 60.0
AHEAD = 2                                                        # shards fetched ahead of the reader


def is_remote(location: Union[str, os.PathLike]) -> bool:
    return str(location).startswith(PREFIXES)


def member(location: str, name: str) -> str:
    """Where file `name` of the set at `location` is: a URL, or for pipe: the command to run."""
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise UserError(f"data.shards '{location}': a pipe: set needs '{{name}}' where the file name goes, "
                            "e.g. pipe:curl -fsS https://host/celeba64/{name}")
        return location.replace("{name}", shlex.quote(name))
    return location.rstrip("/") + "/" + name


def read_command(url: str) -> list[str]:
    """The CLI that writes the object at an s3:// or gs:// URL to stdout."""
    if url.startswith("s3://"):
        return ["aws", "s3", "cp", "--only-show-errors", url, "-"]
    if url.startswith("gs://"):
        return ["gcloud", "storage", "cat", url]
    raise ValueError(url)


def write_command(url: str) -> list[str]:
    """The CLI that stores its stdin as the object at an s3:// or gs:// URL."""
    if url.startswith("s3://"):
        return ["aws", "s3", "cp", "--only-show-errors", "-", url]
    if url.startswith("gs://"):
        return ["gcloud", "storage", "cp", "-", url]
    raise ValueError(url)


def fsspec_filesystem(url: str):
    """fsspec's filesystem for an s3:// or gs:// URL when its backend (s3fs, gcsfs) is installed, else None."""
    backend = {"s3://": "s3fs", "gs://": "gcsfs"}.get(url[:5])
    if backend is None:
        return None
    try:
        __import__(backend)
        import fsspec
    except ImportError:
        return None
    return fsspec.filesystem(url[:2])


def fetch(url: str) -> bytes:
    """One attempt at the whole file. Every failure, a cut-off download included, is an OSError."""
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                return response.read()       # raises IncompleteRead if the body stops short of its length
        except http.client.HTTPException as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from None
    if url.startswith("pipe:"):
        return _run(url[len("pipe:"):], shell=True)
    fs = fsspec_filesystem(url)
    return fs.cat_file(url) if fs is not None else _run(read_command(url))


def upload(url: str, data: bytes) -> None:
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url, data=data, method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
    elif url.startswith("pipe:"):
        _run(url[len("pipe:"):], shell=True, stdin=data)
    else:
        fs = fsspec_filesystem(url)
        if fs is not None:
            fs.pipe_file(url, data)
        else:
            _run(write_command(url), stdin=data)


def _run(cmd, shell: bool = False, stdin: Optional[bytes] = None) -> bytes:
    name = cmd.split()[0] if shell else cmd[0]
    try:
        out = subprocess.run(cmd, shell=shell, input=stdin, capture_output=True, timeout=10 * TIMEOUT_S)
    except FileNotFoundError:
        raise OSError(f"'{name}' not found: install it, or the fsspec backend (pip install s3fs / gcsfs)") from None
    except subprocess.TimeoutExpired:
        raise OSError(f"'{name}' timed out") from None
    if out.returncode != 0:
        lines = out.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"'{name}' exited {out.returncode}: {lines[-1] if lines else 'no message'}")
    return out.stdout


def with_retries(action: Callable[[], bytes], what: str, on_retry: Optional[Callable[[str], None]] = None) -> bytes:
    """`action()`, tried ATTEMPTS times with exponential backoff; the last OSError says how many tries."""
    for attempt in range(ATTEMPTS):
        try:
            return action()
        except OSError as exc:
            reason = str(exc.reason if isinstance(exc, urllib.error.URLError) else exc) or type(exc).__name__
            if attempt == ATTEMPTS - 1:
                raise OSError(f"{reason} (tried {ATTEMPTS} times)") from None
            if on_retry is not None:
                on_retry(f"{what}: {reason}; retrying")
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


def fetch_ahead(urls: list[str], on_retry: Optional[Callable[[str], None]] = None, cache: Optional[Path] = None
                ) -> Iterator[tuple[str, Union[bytes, OSError]]]:
    """(url, its bytes or the error that stopped it), in order, with the next AHEAD files downloading
    in threads while the caller reads the current one. With `cache`, a folder on local disk, each file
    is kept there once downloaded and read from there on later passes."""
    def get(url: str) -> Union[bytes, OSError]:
        local = cache / (hashlib.sha1(url.encode()).hexdigest()[:24] + ".tar") if cache is not None else None
        if local is not None and local.is_file():
            return local.read_bytes()
        try:
            data = with_retries(lambda: fetch(url), url, on_retry)
        except OSError as exc:
            return exc
        if local is not None:
            try:
                atomic_write_bytes(local, data)
            except OSError:
                pass                      # a full or read-only cache only costs the next download
        return data

    pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="shard-fetch")
    try:
        pending = deque(pool.submit(get, u) for u in urls[:AHEAD])
        for i, url in enumerate(urls):
            if i + AHEAD < len(urls):
                pending.append(pool.submit(get, urls[i + AHEAD]))
            yield url, pending.popleft().result()
    finally:                   # a reader that stops early (training ended) starts no further downloads
        pool.shutdown(wait=False, cancel_futures=True)
