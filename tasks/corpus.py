"""The built-in corpus: raw JSONL shards made from what any Python install (and a Debian-like system) carries.

Text sources, each a `source` name in the records:
  stdlib_doc       one document per standard-library module: its docstring plus its public classes'/functions'
  pkg_description  installed distributions' long descriptions (README-like markdown/reST)
  pkg_license      installed distributions' licence/notice files (many near-duplicates: dedup has work to do)
  sysdoc           /usr/share/doc READMEs, changelogs (decompressed), copyright files, NEWS
  manpage          /usr/share/man/man1 pages, raw roff markup kept on purpose
Code: the standard library's packages as `cpython-stdlib/<package>` repositories.

Nothing is imported or executed: modules are read with `ast`. Output depends only on the files present, so two
builds on one machine are byte-identical. When a preset caps the size, candidates are taken round-robin across
sources (code: across repositories), each source in a fixed pseudo-random order (hash of its path) so the sample
spreads over the whole alphabet rather than the first N names; the output is then sorted by (source, path).
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import sysconfig
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, NamedTuple

from pydantic import BaseModel

from infra import storage
from infra.settings import get_logger

log = get_logger(__name__)

TEXT_SOURCES = ("manpage", "pkg_description", "pkg_license", "stdlib_doc", "sysdoc")
SKIPPED_STDLIB = frozenset({"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
SYSDOC_PREFIXES = ("readme", "changelog", "news", "copyright", "authors", "thanks", "todo", "history", "faq")
SYSDOC_ROOT = Path("/usr/share/doc")
MAN1_ROOT = Path("/usr/share/man/man1")
MAX_CODE_BYTES = 200_000
SELF_DISTRIBUTION = "lmforge"  # our own package is not "text nobody here wrote"
_READ_ERRORS = (OSError, EOFError, zlib.error, SyntaxError, ValueError, RecursionError)


@dataclass(frozen=True)
class CorpusConfig:
    """How much of the built-in corpus to build. `None` = everything found."""

    max_text_docs: int | None
    max_code_files: int | None
    shard_docs: int
    min_chars: int
    max_doc_bytes: int | None = None  # larger text docs and code files are left out (not cut): small stays small

    def __post_init__(self) -> None:
        for name in ("max_text_docs", "max_code_files"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"CorpusConfig.{name}={value}: expected None (no limit) or an integer >= 0")
        if self.shard_docs < 1:
            raise ValueError(f"CorpusConfig.shard_docs={self.shard_docs}: expected at least 1 record per shard")
        if self.min_chars < 0:
            raise ValueError(f"CorpusConfig.min_chars={self.min_chars}: expected an integer >= 0")
        if self.max_doc_bytes is not None and self.max_doc_bytes < 1:
            raise ValueError(f"CorpusConfig.max_doc_bytes={self.max_doc_bytes}: expected None (no limit) or >= 1")


CORPUS_PRESETS: dict[str, CorpusConfig] = {
    "smoke": CorpusConfig(max_text_docs=300, max_code_files=60, shard_docs=100, min_chars=200, max_doc_bytes=8_000),
    "tiny": CorpusConfig(max_text_docs=3000, max_code_files=200, shard_docs=500, min_chars=200, max_doc_bytes=8_000),
    "small": CorpusConfig(
        max_text_docs=8000, max_code_files=None, shard_docs=1000, min_chars=200, max_doc_bytes=256_000
    ),
    "full": CorpusConfig(max_text_docs=None, max_code_files=None, shard_docs=2000, min_chars=200),
}
_PAPER_PRESETS = ("internlm2-1_8b", "internlm2-7b", "internlm2-20b")  # the paper's shapes take the whole corpus


def corpus_config(preset: str) -> CorpusConfig:
    """The corpus size for a pipeline preset name."""
    if preset in CORPUS_PRESETS:
        return CORPUS_PRESETS[preset]
    if preset in _PAPER_PRESETS:
        return CORPUS_PRESETS["full"]
    known = ", ".join([*CORPUS_PRESETS, *_PAPER_PRESETS])
    raise ValueError(f"unknown corpus preset {preset!r}: expected one of {known}")


class ShardInfo(BaseModel):
    path: str  # relative to the corpus root, e.g. "text/shard-00000.jsonl"
    records: int
    bytes: int
    sha1: str


class CorpusManifest(BaseModel):
    """What `build_corpus` wrote; also stored as `manifest.json` beside the shards."""

    config: dict[str, int | None]
    text_docs: int
    code_files: int
    docs_per_source: dict[str, int]
    bytes_per_source: dict[str, int]  # UTF-8 bytes of the `text` fields
    files_per_repo: dict[str, int]
    text_shards: list[ShardInfo]
    code_shards: list[ShardInfo]

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in [*self.text_shards, *self.code_shards])


@dataclass(frozen=True)
class Candidate:
    """A document that could be read: listing these is cheap, `read()` happens only for selected ones."""

    group: str  # the source name (text) or the repository (code): what selection balances across
    path: str  # unique within the group; the sort key; text records carry it as meta["path"]
    read: Callable[[], str] = field(compare=False, repr=False)
    meta: dict[str, str] = field(default_factory=dict, compare=False)
    family: str = ""  # near-identical siblings (one package's files, `gcloud_*` man pages); "" = its own family


# ---------------------------------------------------------------- reading helpers


def _decode(data: bytes) -> str:
    """Bytes → str, invalid UTF-8 replaced (the records must be JSON; the mess in the text itself stays)."""
    return data.decode("utf-8", errors="replace")


def _utf8_safe(text: str) -> str:
    """Docstrings can hold lone surrogates through escapes; JSON-as-UTF-8 cannot."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _read_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if b"\x00" in data[:4096]:
        raise ValueError(f"{path} looks binary")
    return _decode(data)


def _stable_id(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- standard library


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_stdlib_top(name: str) -> bool:
    top = name.removesuffix(".py")
    return top in sys.stdlib_module_names and top not in SKIPPED_STDLIB and not top.startswith("_")


def _keep_dir(rel_dir: str, name: str) -> bool:
    """Descend only into public standard-library packages, never into tests or caches."""
    if name == "__pycache__" or name in TEST_DIRS:
        return False
    return bool(rel_dir) or _is_stdlib_top(name)


def stdlib_files(root: Path) -> list[Path]:
    """Public, non-test `.py` files of the standard library, as sorted paths relative to `root`."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/").removeprefix(".")
        dirnames[:] = [d for d in dirnames if _keep_dir(rel_dir, d)]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_") and (rel_dir or _is_stdlib_top(name)):
                found.append(f"{rel_dir}/{name}" if rel_dir else name)
    return [Path(rel) for rel in sorted(found)]


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _def_header(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)})"


def _public_defs(body: list[ast.stmt]) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            yield node


def _doc_sections(body: list[ast.stmt], indent: str = "") -> Iterator[str]:
    """`header\\n    docstring` for each public definition, recursing one level into classes (their methods)."""
    for node in _public_defs(body):
        doc = ast.get_docstring(node)
        if doc:
            yield f"{indent}{_def_header(node)}\n" + "\n".join(f"{indent}    {line}" for line in doc.splitlines())
        if isinstance(node, ast.ClassDef) and not indent:
            yield from _doc_sections(node.body, indent="    ")


def module_doc_text(path: Path) -> str:
    """A pydoc-like text of a module: its docstring, then each public class/function with its docstring."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    sections = [ast.get_docstring(tree) or "", *_doc_sections(tree.body)]
    return _utf8_safe("\n\n".join(s for s in sections if s))


def stdlib_doc_candidates(root: Path) -> Iterator[Candidate]:
    for rel in stdlib_files(root):
        meta = {"module": _module_name(rel), "path": rel.as_posix()}
        yield Candidate("stdlib_doc", rel.as_posix(), partial(module_doc_text, root / rel), meta, family=rel.parts[0])


def code_candidates(root: Path) -> Iterator[Candidate]:
    """Files of standard-library *packages* (directories), each package one repository."""
    for rel in stdlib_files(root):
        if len(rel.parts) < 2 or (root / rel).stat().st_size > MAX_CODE_BYTES:
            continue
        repo = f"cpython-stdlib/{rel.parts[0]}"
        yield Candidate(repo, rel.as_posix(), lambda p=root / rel: _utf8_safe(_decode(p.read_bytes())))


# ---------------------------------------------------------------- installed distributions


class InstalledDist(NamedTuple):
    name: str  # normalised: lower case, runs of -_. as one "-"
    version: str
    dist: importlib.metadata.Distribution


def _installed(dist: importlib.metadata.Distribution) -> InstalledDist:
    metadata = dist.metadata  # parsed on every access: read it once
    name = re.sub(r"[-_.]+", "-", (metadata["Name"] or "").lower())
    return InstalledDist(name, metadata["Version"] or "", dist)


def installed_distributions() -> list[InstalledDist]:
    """One distribution per normalised name (the lowest version), sorted by name, lmforge itself left out."""
    found = sorted((_installed(d) for d in importlib.metadata.distributions()), key=lambda d: (d.name, d.version))
    by_name: dict[str, InstalledDist] = {}
    for item in found:
        if item.name and item.name != SELF_DISTRIBUTION:
            by_name.setdefault(item.name, item)
    return list(by_name.values())


def _description(dist: importlib.metadata.Distribution) -> str:
    metadata = dist.metadata
    body = metadata.get_payload() if hasattr(metadata, "get_payload") else None  # type: ignore[attr-defined]
    return _utf8_safe(str(body or metadata.get("Description") or ""))


def pkg_description_candidates(dists: Iterable[InstalledDist]) -> Iterator[Candidate]:
    for name, version, dist in dists:
        meta = {"package": name, "version": version, "path": name}
        yield Candidate("pkg_description", name, lambda d=dist: _description(d), meta)


def _is_license_name(path: str) -> bool:
    return path.rsplit("/", 1)[-1].upper().startswith(LICENSE_PREFIXES)


def _license_files(dist: importlib.metadata.Distribution) -> list[str]:
    """Licence-like files a distribution installed, from RECORD directly (`dist.files` builds a Path per entry)."""
    record = dist.read_text("RECORD")
    if record is None:
        names = [f.as_posix() for f in dist.files or []]
    else:
        names = [row[0] for row in csv.reader(record.splitlines()) if row]
    return sorted({n for n in names if _is_license_name(n)})


def pkg_license_candidates(dists: Iterable[InstalledDist]) -> Iterator[Candidate]:
    for name, version, dist in dists:
        for file in _license_files(dist):
            location = Path(str(dist.locate_file(file)))
            meta = {"package": name, "version": version, "path": f"{name}/{file}", "file": file}
            yield Candidate("pkg_license", meta["path"], lambda p=location: _read_file(p), meta, family=name)


# ---------------------------------------------------------------- system documentation


def _is_sysdoc_name(name: str) -> bool:
    lower = name.lower()
    return lower.startswith(SYSDOC_PREFIXES) and not lower.endswith((".html", ".htm", ".pdf", ".png"))


def sysdoc_candidates(root: Path = SYSDOC_ROOT) -> Iterator[Candidate]:
    """/usr/share/doc READMEs, changelogs, NEWS, copyright files (symlinks skipped: they repeat another file)."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if _is_sysdoc_name(name) and not path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    for rel in sorted(found):
        meta = {"package": rel.split("/", 1)[0], "path": rel}
        yield Candidate("sysdoc", rel, lambda p=root / rel: _read_file(p), meta, family=meta["package"])


def manpage_candidates(root: Path = MAN1_ROOT) -> Iterator[Candidate]:
    """Section-1 man pages as raw roff (`.so` redirect stubs fall to `min_chars`)."""
    if not root.is_dir():
        return
    names = sorted(e.name for e in os.scandir(root) if e.name.endswith(".gz") and not e.is_symlink())
    for name in names:
        meta = {"name": name.removesuffix(".gz"), "path": f"{root.name}/{name}"}
        family = re.split(r"[-_.]", name, maxsplit=1)[0]  # gcloud_compute_… (thousands of pages) is one family
        yield Candidate("manpage", meta["path"], lambda p=root / name: _read_file(p), meta, family=family)


def text_candidates(
    stdlib_root: Path | None = None, sysdoc_root: Path = SYSDOC_ROOT, man_root: Path = MAN1_ROOT
) -> Iterator[Candidate]:
    """Every text candidate, each source listed in sorted path order."""
    dists = installed_distributions()
    yield from stdlib_doc_candidates(stdlib_root or stdlib_dir())
    yield from pkg_description_candidates(dists)
    yield from pkg_license_candidates(dists)
    yield from sysdoc_candidates(sysdoc_root)
    yield from manpage_candidates(man_root)


# ---------------------------------------------------------------- selection


@dataclass(frozen=True)
class SizeFilter:
    """Which loaded texts count as documents: at least `min_chars` non-blank-edged characters, at most `max_bytes`."""

    min_chars: int
    max_bytes: int | None = None

    def __call__(self, text: str) -> bool:
        if len(text.strip()) < self.min_chars:
            return False
        return self.max_bytes is None or len(text.encode("utf-8")) <= self.max_bytes


def _load(candidate: Candidate, keep: SizeFilter) -> str | None:
    """The candidate's text, or None when unreadable or filtered out by size (logged, never fatal)."""
    try:
        text = candidate.read()
    except _READ_ERRORS as err:
        log.debug("skipping %s %s: %s", candidate.group, candidate.path, err)
        return None
    return text if keep(text) else None


def _group(candidates: Iterable[Candidate]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.group, []).append(c)
    return {g: sorted(cs, key=lambda c: c.path) for g, cs in sorted(groups.items())}


def _path_hash(c: Candidate) -> bytes:
    return hashlib.sha1(c.path.encode("utf-8")).digest()


def _spread(candidates: list[Candidate]) -> Iterator[Candidate]:
    """A fixed pseudo-random order (by path hash) that visits every family once before any family twice.

    So a capped sample covers the whole sorted list, and one machine's 16k `gcloud_*` man pages do not crowd out
    every other command.
    """
    rank: Counter[str] = Counter()
    keyed = []
    for c in sorted(candidates, key=_path_hash):
        family = c.family or c.path
        keyed.append((rank[family], _path_hash(c), c))
        rank[family] += 1
    return (c for _, _, c in sorted(keyed, key=lambda k: k[:2]))


def _next_loaded(pool: Iterator[Candidate], keep: SizeFilter) -> tuple[Candidate, str] | None:
    for candidate in pool:
        text = _load(candidate, keep)
        if text is not None:
            return candidate, text
    return None


def _round_robin(groups: dict[str, list[Candidate]], limit: int, keep: SizeFilter) -> list[tuple[Candidate, str]]:
    """Take one loadable candidate from each group in turn until `limit` or every group runs dry."""
    pools = {g: _spread(cs) for g, cs in groups.items()}
    chosen: list[tuple[Candidate, str]] = []
    while pools and len(chosen) < limit:
        for g in list(pools):
            if len(chosen) == limit:
                break
            picked = _next_loaded(pools[g], keep)
            if picked is None:
                del pools[g]
            else:
                chosen.append(picked)
    return sorted(chosen, key=lambda pair: (pair[0].group, pair[0].path))


def select(candidates: Iterable[Candidate], limit: int | None, keep: SizeFilter) -> Iterator[tuple[Candidate, str]]:
    """Loaded (candidate, text) pairs in (group, path) order: all that `keep` accepts, or a group-balanced `limit`."""
    groups = _group(candidates)
    if limit is not None:
        yield from _round_robin(groups, limit, keep)
        return
    for members in groups.values():  # no cap: stream, so the full corpus never sits in memory
        for candidate in members:
            text = _load(candidate, keep)
            if text is not None:
                yield candidate, text


# ---------------------------------------------------------------- records and shards


def text_record(candidate: Candidate, text: str) -> dict[str, Any]:
    meta: dict[str, Any] = {**candidate.meta, "bytes": len(text.encode("utf-8"))}
    return {
        "id": _stable_id(candidate.group, candidate.path, text),
        "text": text,
        "source": candidate.group,
        "meta": meta,
    }


def code_record(candidate: Candidate, text: str) -> dict[str, Any]:
    return {
        "id": _stable_id(candidate.group, candidate.path, text),
        "repo": candidate.group,
        "path": candidate.path,
        "lang": "python",
        "text": text,
    }


def _write_lines(f: IO[bytes], records: Iterable[dict[str, Any]], rel: str) -> ShardInfo:
    """One JSON object a line, streamed (a shard of big changelogs never sits in memory twice)."""
    digest, count, size = hashlib.sha1(), 0, 0
    for record in records:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        f.write(line)
        digest.update(line)
        count, size = count + 1, size + len(line)
    return ShardInfo(path=rel, records=count, bytes=size, sha1=digest.hexdigest())


def write_shards(records: Iterable[dict[str, Any]], out_url: str, kind: str, shard_docs: int) -> list[ShardInfo]:
    """`<kind>/shard-00000.jsonl`, … of `shard_docs` records each, every shard written atomically."""
    shards: list[ShardInfo] = []
    iterator = iter(records)
    while (first := next(iterator, None)) is not None:
        rel = f"{kind}/shard-{len(shards):05d}.jsonl"
        with storage.atomic_write(storage.join(out_url, rel)) as f:
            shards.append(_write_lines(f, chain([first], islice(iterator, shard_docs - 1)), rel))
    return shards


def _forget_manifest(out_url: str) -> None:
    """Drop an old manifest first: a build that dies half-way must not look like a finished corpus."""
    storage.remove(storage.join(out_url, "manifest.json"), missing_ok=True)


def _remove_stale_shards(out_url: str, kind: str, keep: list[ShardInfo]) -> None:
    """A rebuild with fewer shards must not leave old ones that a glob would pick up."""
    wanted = {storage.join(out_url, s.path) for s in keep}
    for url in storage.list_files(storage.join(out_url, kind), "shard-*.jsonl"):
        if url not in wanted:
            storage.remove(url)
            log.info("removed stale shard %s", url)


def _tally(
    records: Iterable[dict[str, Any]], key: str, counts: Counter[str], sizes: Counter[str]
) -> Iterator[dict[str, Any]]:
    for record in records:
        counts[record[key]] += 1
        sizes[record[key]] += len(record["text"].encode("utf-8"))
        yield record


# ---------------------------------------------------------------- the build


def _size_filter(config: CorpusConfig) -> SizeFilter:
    return SizeFilter(min_chars=config.min_chars, max_bytes=config.max_doc_bytes)


def _build_text(
    out_url: str, config: CorpusConfig, sources: Iterable[Candidate]
) -> tuple[list[ShardInfo], Counter[str], Counter[str]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    records = (text_record(c, t) for c, t in select(sources, config.max_text_docs, _size_filter(config)))
    shards = write_shards(_tally(records, "source", counts, sizes), out_url, "text", config.shard_docs)
    if not shards:
        raise ValueError(
            f"the built-in corpus found no text documents of at least {config.min_chars} characters "
            f"(looked in the standard library, installed packages, {SYSDOC_ROOT} and {MAN1_ROOT}); "
            "lower min_chars or point the data flow at your own JSONL"
        )
    return shards, counts, sizes


def _build_code(
    out_url: str, config: CorpusConfig, sources: Iterable[Candidate]
) -> tuple[list[ShardInfo], Counter[str]]:
    counts: Counter[str] = Counter()
    records = (code_record(c, t) for c, t in select(sources, config.max_code_files, _size_filter(config)))
    shards = write_shards(_tally(records, "repo", counts, Counter()), out_url, "code", config.shard_docs)
    return shards, counts


def build_corpus(
    out_url: str,
    config: CorpusConfig,
    text_sources: Iterable[Candidate] | None = None,
    code_sources: Iterable[Candidate] | None = None,
) -> CorpusManifest:
    """Write the built-in corpus (text and code shards plus `manifest.json`) under `out_url`, local or s3://.

    `text_sources` / `code_sources` default to this machine's; pass other candidates to build from elsewhere.
    """
    text_sources = text_candidates() if text_sources is None else text_sources
    code_sources = code_candidates(stdlib_dir()) if code_sources is None else code_sources
    _forget_manifest(out_url)
    text_shards, docs, text_bytes = _build_text(out_url, config, text_sources)
    code_shards, files = _build_code(out_url, config, code_sources)
    _remove_stale_shards(out_url, "text", text_shards)
    _remove_stale_shards(out_url, "code", code_shards)
    manifest = CorpusManifest(
        config=asdict(config),
        text_docs=sum(docs.values()),
        code_files=sum(files.values()),
        docs_per_source=dict(sorted(docs.items())),
        bytes_per_source=dict(sorted(text_bytes.items())),
        files_per_repo=dict(sorted(files.items())),
        text_shards=text_shards,
        code_shards=code_shards,
    )
    storage.write_json(storage.join(out_url, "manifest.json"), manifest.model_dump(mode="json"))
    log.info(
        "built-in corpus at %s: %d text docs %s, %d code files, %.1f MB",
        out_url,
        manifest.text_docs,
        manifest.docs_per_source,
        manifest.code_files,
        manifest.total_bytes / 1e6,
    )
    return manifest


def load_manifest(out_url: str) -> CorpusManifest:
    """The manifest a previous `build_corpus` left under `out_url`."""
    return CorpusManifest.model_validate(storage.read_json(storage.join(out_url, "manifest.json")))
