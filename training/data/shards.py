"""Webdataset shards: URL lists (brace expansion, local files, `pipe:` commands) and tar -> samples.

A shard is a tar file (optionally gzip-compressed). A sample is a run of consecutive members sharing a
key, the member path up to the first dot of its file name, as img2dataset (`--output_format webdataset`)
writes them: 000000123.jpg, 000000123.txt, 000000123.json -> key "000000123", members {"jpg", "txt",
"json"}. Members without a dot in the name (or hidden ones, ".foo") belong to no sample and are passed over.

Trust model: a `pipe:` URL is a shell command; it is run as written in the config with the training user's
rights (`shell=True`), like webdataset's `pipe:` URLs, and its stdout is read as the tar. Anyone who can
edit the config can run commands through it: use configs you trust. Local paths are opened as files,
without a shell.
"""
from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

from training.errors import DataError

PIPE = "pipe:"
_NAME = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]*)$")   # (key, extension) of a member path
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardReadError(Exception):
    """The tar itself is damaged (truncated, not a tar): the rest of that shard is left out and reported."""


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: "a-{000..002}.tar" -> a-000.tar a-001.tar a-002.tar (zero padding kept when
    either end has it), "{x,y}" -> x y; several groups multiply, groups may nest. ValueError if unbalanced."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in {pattern!r}")
        return [pattern]
    depth, end, commas = 0, -1, []
    for i in range(start, len(pattern)):
        c = pattern[i]
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 1:
            commas.append(i)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise ValueError(f"unbalanced '{{' in {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    if commas:
        cuts = [start, *commas, end]
        choices = [c for a, b in zip(cuts, cuts[1:]) for c in expand_braces(pattern[a + 1:b])]
    elif (m := _RANGE.match(body)):
        choices = _number_range(m.group(1), m.group(2))
    else:
        raise ValueError(f"'{{{body}}}' in {pattern!r} is neither a list {{a,b}} nor a range {{000..099}}")
    if "}" in head:
        raise ValueError(f"unbalanced '}}' in {pattern!r}")
    return [head + c + t for c in choices for t in expand_braces(tail)]


def _number_range(a: str, b: str) -> list[str]:
    lo, hi = int(a), int(b)
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
    width = max(len(a), len(b)) if padded else 0
    step = 1 if hi >= lo else -1
    return [str(i).zfill(width) for i in range(lo, hi + step, step)]


def expand_urls(spec, key: str) -> list[str]:
    """data.path (a string or a list of strings, each brace-expanded) -> shard URLs. Local shards must exist."""
    items = [spec] if isinstance(spec, str) else spec
    if not items or not isinstance(items, list) or not all(isinstance(s, str) and s.strip() for s in items):
        raise DataError(f"{key} = {spec!r}: expected tar shards as a path, a brace list like "
                        "'shards-{000000..000099}.tar', a 'pipe:COMMAND', or a list of those")
    urls = []
    for s in items:
        try:
            urls += expand_braces(s.strip())
        except ValueError as e:
            raise DataError(f"{key}: {e}") from None
    missing = [u for u in urls if not u.startswith(PIPE) and not Path(u).is_file()]
    if missing:
        shown = "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
        raise DataError(f"{key}: {len(missing)} of {len(urls)} shard(s) not found:\n  {shown}")
    return urls


def split_name(name: str):
    """Member path -> (key, lower-case extension), or (None, None) for a member of no sample."""
    m = _NAME.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


class Shard:
    """An open shard: a local file (random access: skipped members are not read) or a pipe's stdout."""

    def __init__(self, url: str):
        self.url, self.proc, self.stderr = url, None, None
        try:
            if url.startswith(PIPE):
                self.stderr = tempfile.TemporaryFile()
                self.proc = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE,
                                             stderr=self.stderr)
                self.tar = tarfile.open(fileobj=self.proc.stdout, mode="r|*")
            else:
                self.tar = tarfile.open(url, mode="r:*")
        except (tarfile.TarError, EOFError, zlib.error) as e:
            self._fail_if_pipe_failed()
            self.close()
            raise ShardReadError(f"{url}: not a readable tar ({type(e).__name__}: {e})") from None
        except OSError as e:
            self.close()
            raise DataError(f"shard {url}: cannot open ({e})") from None

    def samples(self, skip: int = 0):
        """(key, {extension: bytes}) in tar order; the first `skip` samples are passed over unread. Each is
        yielded with `last` (True: the shard ends after it), known because the next member was seen."""
        pending = None
        try:
            for group in self._groups(skip):
                if pending is not None:
                    yield (*pending, False)
                pending = group
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            if pending is not None:
                yield (*pending, True)
            self._fail_if_pipe_failed()
            raise ShardReadError(f"{self.url}: damaged tar after the sample shown last "
                                 f"({type(e).__name__}: {e})") from None
        if pending is not None:
            yield (*pending, True)
        self._fail_if_pipe_failed(drain=True)

    def _groups(self, skip: int):
        key, members, seen = None, {}, 0
        for info in self.tar:
            k, ext = split_name(info.name) if info.isfile() else (None, None)
            if k is None:
                continue
            if k != key:
                if members:
                    yield key, members
                key, members, seen = k, {}, seen + 1
            if seen > skip:
                members[ext] = self.tar.extractfile(info).read()
        if members:
            yield key, members

    def _fail_if_pipe_failed(self, drain=False):
        """A pipe: command that exited non-zero stops the run (a retry after --resume reads the same data).
        drain: the tar ended normally; read what the command still writes (end-of-archive padding)."""
        if self.proc is None:
            return
        while drain and self.proc.stdout.read(1 << 16):
            pass
        self.proc.stdout.close()
        code = self.proc.wait()
        if code != 0:
            self.stderr.seek(0)
            tail = self.stderr.read()[-500:].decode("utf-8", "replace").strip()
            raise DataError(f"shard {self.url}: the command exited with status {code}" + (f": {tail}" if tail else ""))

    def close(self):
        if getattr(self, "tar", None) is not None:
            self.tar.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()        # stopped early (resume, end of run): not a failure
            self.proc.wait()
        if self.stderr is not None:
            self.stderr.close()
