"""Repository-level dependency sorting (tasks/code/depsort.py): import resolution per language, the order with its
cycle breaks, the placement of non-code files, the Markdown document, and a run over the CPython standard library.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import pytest

from tasks.code.depsort import (
    RepoIndex,
    SourceFile,
    dependency_order,
    imports_in,
    local_imports,
    repository_markdown,
)


def py(path: str, text: str) -> SourceFile:
    return SourceFile(path, text, "python")


def imports_of(files: list[SourceFile], path: str) -> set[str]:
    by_path = {f.path: f for f in files}
    return local_imports(by_path[path], set(by_path))


# A package whose __init__ imports every module, a subpackage whose reader and writer import each other, relative
# imports at one and two levels, a TYPE_CHECKING-only import and a self-import, tests beside the package (a source
# root: `from helpers import make`), READMEs at the root and in the subpackage, and non-code files.
REPO = [
    SourceFile("README.md", "# Demo\n", "markdown"),
    SourceFile("LICENSE", "MIT\n", "text"),
    SourceFile("docs/guide.md", "How to use it.\n", "markdown"),
    py("setup.py", "import setuptools\nfrom mypkg import __version__\n"),
    py("mypkg/__init__.py", "from . import core, models, utils\nfrom .io import reader, writer\n__version__ = '1'\n"),
    py("mypkg/core.py", "from .utils import helper\nfrom . import models\n"),
    py("mypkg/models.py", "import mypkg.utils\n"),
    py(
        "mypkg/utils.py",
        "import os\nimport mypkg.utils\nfrom typing import TYPE_CHECKING\n\n"
        "if TYPE_CHECKING:\n    from .core import Core\n\n\ndef helper():\n    return os.sep\n",
    ),
    SourceFile("mypkg/io/README.md", "Readers and writers.\n", "markdown"),
    SourceFile("mypkg/io/formats.toml", "csv = true\n", "toml"),
    py("mypkg/io/__init__.py", "from .reader import read\n"),
    py("mypkg/io/reader.py", "from ..utils import helper\nfrom .writer import Writer\n\n\ndef read():\n    pass\n"),
    py("mypkg/io/writer.py", "from .reader import read\n\n\nclass Writer:\n    pass\n"),
    py("tests/helpers.py", "def make():\n    pass\n"),
    py("tests/test_core.py", "import pytest\nfrom mypkg.core import helper\nimport mypkg.io.reader\n"
                             "from helpers import make\n"),
]


def test_python_imports_resolve_to_repo_files() -> None:
    assert imports_of(REPO, "mypkg/__init__.py") == {
        "mypkg/core.py", "mypkg/models.py", "mypkg/utils.py",
        "mypkg/io/__init__.py", "mypkg/io/reader.py", "mypkg/io/writer.py",
    }  # fmt: skip
    assert imports_of(REPO, "mypkg/core.py") == {"mypkg/utils.py", "mypkg/models.py"}  # helper: a name in utils
    assert imports_of(REPO, "mypkg/models.py") == {"mypkg/utils.py"}  # not its own package's __init__
    assert imports_of(REPO, "mypkg/utils.py") == set()  # self-import and TYPE_CHECKING import dropped
    assert imports_of(REPO, "mypkg/io/reader.py") == {"mypkg/utils.py", "mypkg/io/writer.py"}
    assert imports_of(REPO, "setup.py") == {"mypkg/__init__.py"}  # __version__ is a name in the package
    # a submodule import runs every package __init__ on the way; `helpers` is found under the tests/ source root
    assert imports_of(REPO, "tests/test_core.py") == {
        "mypkg/__init__.py", "mypkg/core.py", "mypkg/io/__init__.py", "mypkg/io/reader.py", "tests/helpers.py",
    }  # fmt: skip
    assert imports_of(REPO, "README.md") == set()


def test_python_repository_order() -> None:
    result = dependency_order(REPO)
    # utils has no imports, then models and core (ready one after the other), the tests' helper (ready since the
    # start, alphabetically after them); then nothing is ready: reader <-> writer is a cycle, broken at reader (the
    # alphabetically first), which lets io/__init__, writer, the package __init__ and its importers follow.
    # Non-code files: the root README first, then LICENSE, then docs/ (no code: the root's spot); the io README and
    # formats.toml open the io subpackage.
    assert result.order == [
        "README.md",
        "LICENSE",
        "docs/guide.md",
        "mypkg/utils.py",
        "mypkg/models.py",
        "mypkg/core.py",
        "tests/helpers.py",
        "mypkg/io/README.md",
        "mypkg/io/formats.toml",
        "mypkg/io/reader.py",
        "mypkg/io/__init__.py",
        "mypkg/io/writer.py",
        "mypkg/__init__.py",
        "setup.py",
        "tests/test_core.py",
    ]
    assert result.cycle_breaks == ["mypkg/io/reader.py"]
    assert result.edges == 6 + 2 + 1 + 0 + 1 + 2 + 1 + 1 + 5
    assert result.back_edges == 1  # reader -> writer


def test_absolute_imports_from_a_top_level_package_src_and_a_script_folder() -> None:
    stdlib_style = [
        py("asyncio/__init__.py", "from .base_events import *\n"),
        py("asyncio/base_events.py", "import asyncio.events\nfrom asyncio import coroutines\nimport json\n"),
        py("asyncio/events.py", ""),
        py("asyncio/coroutines.py", ""),
    ]
    assert imports_of(stdlib_style, "asyncio/base_events.py") == {"asyncio/events.py", "asyncio/coroutines.py"}
    src_layout = [
        py("src/shop/__init__.py", ""),
        py("src/shop/cart.py", "from shop.money import Money\nimport shop.db.session\n"),
        py("src/shop/money.py", ""),
        py("src/shop/db/__init__.py", ""),
        py("src/shop/db/session.py", ""),
        py("scripts/admin/run.py", "import tool\nfrom shop import cart\n"),
        py("scripts/admin/tool.py", ""),
    ]
    assert imports_of(src_layout, "src/shop/cart.py") == {
        "src/shop/money.py", "src/shop/db/__init__.py", "src/shop/db/session.py",
    }  # fmt: skip
    assert imports_of(src_layout, "scripts/admin/run.py") == {
        "scripts/admin/tool.py", "src/shop/__init__.py", "src/shop/cart.py",
    }  # fmt: skip


def test_cycle_broken_at_alphabetically_first_file_of_the_cycle() -> None:
    files = [
        py("a.py", "import m\n"),  # waits on the cycle but is not in it: never the break point
        py("m.py", "import z\n"),
        py("z.py", "import m\n"),
    ]
    result = dependency_order(files)
    assert result.order == ["m.py", "a.py", "z.py"]  # once m is out, a and z are both ready: a goes first
    assert result.cycle_breaks == ["m.py"]
    assert (result.edges, result.back_edges) == (3, 1)


def test_cycle_break_prefers_a_file_whose_pending_imports_are_deferred() -> None:
    files = [
        py("a.py", "import b\n"),
        py("b.py", "def late():\n    import a\n    return a\n"),  # b needs a only when late() runs
    ]
    result = dependency_order(files)
    assert result.order == ["b.py", "a.py"]
    assert result.cycle_breaks == ["b.py"]
    assert result.back_edges == 1


def test_python_syntax_error_contributes_no_imports() -> None:
    files = [py("good.py", "import broken\n"), py("broken.py", "import good\ndef oops(:\n")]
    assert imports_of(files, "broken.py") == set()
    result = dependency_order(files)
    assert result.order == ["broken.py", "good.py"]
    assert (result.edges, result.back_edges, result.cycle_breaks) == (1, 0, [])


def test_c_includes() -> None:
    files = [
        SourceFile("src/main.c", '#include <stdio.h>\n#include "util.h"\n#include "net/socket.h"\n'
                   '# include <acme/api.h>\n#include "../config.h"\n#include "missing.h"\n#include <zlib.h>\n', "c"),
        SourceFile("src/util.h", "int util(void);\n", "c"),
        SourceFile("src/util.c", '#include "util.h"\n', "c"),
        SourceFile("net/socket.h", "", "c"),
        SourceFile("include/acme/api.h", "", "cpp"),
        SourceFile("config.h", "", "c"),
        SourceFile("third_party/zlib/zlib.h", "", "c"),  # <zlib.h>: not on any search path we know
    ]
    assert imports_of(files, "src/main.c") == {"src/util.h", "net/socket.h", "include/acme/api.h", "config.h"}
    assert imports_of(files, "src/util.c") == {"src/util.h"}
    assert dependency_order(files).order[:3] == ["config.h", "include/acme/api.h", "net/socket.h"]


def test_c_quoted_include_falls_back_to_a_unique_path_suffix() -> None:
    files = [
        SourceFile("app/main.cpp", '#include "core/engine.hpp"\n#include "dup.h"\n', "cpp"),
        SourceFile("src/core/engine.hpp", "", "cpp"),
        SourceFile("a/dup.h", "", "c"),
        SourceFile("b/dup.h", "", "c"),  # two candidates: ambiguous, not guessed
    ]
    assert imports_of(files, "app/main.cpp") == {"src/core/engine.hpp"}


def test_javascript_and_typescript_relative_imports() -> None:
    app = """import { a } from './util';
import b from './lib/b.js';
import Button from './components';
import type { T } from "./types";
import { h } from './helper.js';
import React from 'react';
import {
  x,
  y,
} from '../shared/xy';
export * from './reexport';
import './polyfill';
const cfg = require('../config');
const lazy = () => import('./lazy');
const fs = require('fs');
"""
    files = [
        SourceFile("src/app.ts", app, "typescript"),
        SourceFile("src/util.ts", "", "typescript"),
        SourceFile("src/lib/b.js", "", "javascript"),
        SourceFile("src/components/index.tsx", "", "typescript"),
        SourceFile("src/types.ts", "", "typescript"),
        SourceFile("src/helper.ts", "", "typescript"),  # './helper.js' in TypeScript's ESM style
        SourceFile("shared/xy.mjs", "", "javascript"),
        SourceFile("src/reexport.ts", "", "typescript"),
        SourceFile("src/polyfill.cjs", "", "javascript"),
        SourceFile("config.js", "", "javascript"),
        SourceFile("src/lazy.jsx", "", "javascript"),
        SourceFile("src/react.js", "", "javascript"),  # 'react' is a package, not this file
    ]
    assert imports_of(files, "src/app.ts") == {
        "src/util.ts", "src/lib/b.js", "src/components/index.tsx", "src/types.ts", "src/helper.ts", "shared/xy.mjs",
        "src/reexport.ts", "src/polyfill.cjs", "config.js", "src/lazy.jsx",
    }  # fmt: skip


def test_go_imports_name_package_folders() -> None:
    main = """package main

import (
\t"fmt"
\tstore "github.com/acme/shop/internal/store"
\t_ "github.com/lib/pq" // driver (registers itself)
\t"github.com/acme/shop/api"
)
"""
    files = [
        SourceFile("go.mod", "module github.com/acme/shop\n", "text"),
        SourceFile("cmd/server/main.go", main, "go"),
        SourceFile("api/api.go", 'package api\n\nimport "github.com/acme/shop/internal/store"\n', "go"),
        SourceFile("internal/store/db.go", "package store\n", "go"),
        SourceFile("internal/store/cache.go", "package store\n", "go"),
        SourceFile("internal/store/db_test.go", 'package store\n\nimport "testing"\n', "go"),
        SourceFile("legacy/store/old.go", "package store\n", "go"),  # matches only the last component
    ]
    assert imports_of(files, "cmd/server/main.go") == {"api/api.go", "internal/store/cache.go", "internal/store/db.go"}
    assert imports_of(files, "api/api.go") == {"internal/store/cache.go", "internal/store/db.go"}
    assert imports_of(files, "internal/store/db.go") == set()
    order = dependency_order(files).order
    assert order.index("internal/store/db.go") < order.index("api/api.go") < order.index("cmd/server/main.go")


def test_java_single_class_and_wildcard_imports() -> None:
    main = """package com.acme.app;

import java.util.List;
import com.acme.model.User;
import com.acme.util.*;
import static com.acme.model.Roles.ADMIN;
import org.junit.Test;

public class Main {}
"""
    root = "src/main/java/com/acme"
    files = [
        SourceFile(f"{root}/app/Main.java", main, "java"),
        SourceFile(f"{root}/app/Helper.java", "package com.acme.app;\n", "java"),  # same package: not an import
        SourceFile(f"{root}/model/User.java", "package com.acme.model;\n", "java"),
        SourceFile(f"{root}/model/Roles.java", "package com.acme.model;\n", "java"),
        SourceFile(f"{root}/model/Order.java", "package com.acme.model;\n", "java"),
        SourceFile(f"{root}/util/Dates.java", "package com.acme.util;\n", "java"),
        SourceFile(f"{root}/util/Strings.java", "package com.acme.util;\n", "java"),
        SourceFile(f"{root}/util/inner/Deep.java", "package com.acme.util.inner;\n", "java"),
    ]
    assert imports_of(files, f"{root}/app/Main.java") == {
        f"{root}/model/User.java", f"{root}/model/Roles.java", f"{root}/util/Dates.java", f"{root}/util/Strings.java",
    }  # fmt: skip


def test_non_code_placement_without_code_and_in_code_free_folders() -> None:
    only_docs = [
        SourceFile("docs/intro.md", "", "markdown"),
        SourceFile("NOTES.txt", "", "text"),
        SourceFile("README.rst", "", "text"),
    ]
    assert dependency_order(only_docs).order == ["README.rst", "NOTES.txt", "docs/intro.md"]
    mixed = [
        py("pkg/a/x.py", "from ..b import y\n"),
        py("pkg/b/y.py", ""),
        SourceFile("pkg/a/data/table.csv", "", "csv"),  # data/ has no code: placed with pkg/a
        SourceFile("pkg/README.md", "", "markdown"),  # pkg's subtree starts with pkg/b/y.py
        SourceFile("pkg/a/notes.md", "", "markdown"),
    ]
    assert dependency_order(mixed).order == [
        "pkg/README.md", "pkg/b/y.py", "pkg/a/notes.md", "pkg/a/data/table.csv", "pkg/a/x.py",
    ]  # fmt: skip


def test_repository_markdown() -> None:
    files = [
        SourceFile("README.md", "# Tool\n\nDoes things.\n", "markdown"),
        py("tool/cli.py", 'USAGE = """\n```\ntool run\n```\n"""\n'),
        SourceFile("tool/fast.c", "int main(void) { return 0; }", "c"),
        SourceFile("pyproject.toml", "[project]\nname = 'tool'\n", "toml"),
    ]
    order = ["README.md", "pyproject.toml", "tool/cli.py", "tool/fast.c"]
    assert repository_markdown("acme/tool", files, order) == (
        "# acme/tool\n\n"
        "## README.md\n\n# Tool\n\nDoes things.\n\n"
        "## pyproject.toml\n\n```\n[project]\nname = 'tool'\n```\n\n"
        '## tool/cli.py\n\n````python\nUSAGE = """\n```\ntool run\n```\n"""\n````\n\n'
        "## tool/fast.c\n\n```c\nint main(void) { return 0; }\n```\n"
    )


def test_repository_markdown_rejects_an_order_that_does_not_match_the_files() -> None:
    files = [py("a.py", ""), py("b.py", "")]
    with pytest.raises(ValueError, match=r"missing from order: \['b.py'\]; not in files: \['c.py'\]"):
        repository_markdown("r", files, ["a.py", "c.py"])
    with pytest.raises(ValueError, match=r"repeated in order: \['a.py'\]"):
        repository_markdown("r", files, ["a.py", "b.py", "a.py"])
    with pytest.raises(ValueError, match="repo must be a non-empty name"):
        repository_markdown(" ", files, ["a.py", "b.py"])


def test_dependency_order_rejects_bad_and_repeated_paths() -> None:
    with pytest.raises(ValueError, match=r"repeated: \['a.py'\]"):
        dependency_order([py("a.py", ""), py("a.py", "x = 1")])
    with pytest.raises(ValueError, match="repo-relative POSIX paths"):
        dependency_order([py("/abs/a.py", "")])
    with pytest.raises(ValueError, match="repo-relative POSIX paths"):
        dependency_order([py("pkg\\a.py", "")])


# ------------------------------------------------------------------------------------------- CPython stdlib

SKIPPED_PACKAGES = {"test", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip"}


def stdlib_packages() -> dict[str, list[SourceFile]]:
    """Each top-level stdlib package (with an __init__.py) as a repository of its .py files, paths like
    ``asyncio/events.py``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = {}
    for folder in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        if folder.name not in SKIPPED_PACKAGES:
            packages[folder.name] = [
                py(path.relative_to(root).as_posix(), path.read_text("utf-8", errors="replace"))
                for path in sorted(folder.rglob("*.py"))
            ]
    return packages


def test_cpython_stdlib_packages() -> None:
    packages = stdlib_packages()
    totals = {"packages": len(packages), "files": 0, "edges": 0, "back_edges": 0, "cycle_breaks": 0}
    start = time.perf_counter()
    print(f"\n{'package':<18}{'files':>6}{'edges':>7}{'back':>6}{'breaks':>8}")
    for name, files in packages.items():
        result = dependency_order(files)
        assert sorted(result.order) == sorted(f.path for f in files)
        # recount from the imports: every edge precedes its importer except the back edges, and back edges only
        # come from cycle breaks
        index = RepoIndex.build(f.path for f in files)
        position = {path: i for i, path in enumerate(result.order)}
        edges = [(f.path, dep) for f in files for dep in imports_in(f, index)]
        assert len(edges) == result.edges
        assert sum(position[dep] > position[path] for path, dep in edges) == result.back_edges
        if not result.cycle_breaks:
            assert result.back_edges == 0
        print(f"{name:<18}{len(files):>6}{result.edges:>7}{result.back_edges:>6}{len(result.cycle_breaks):>8}")
        totals["files"] += len(files)
        totals["edges"] += result.edges
        totals["back_edges"] += result.back_edges
        totals["cycle_breaks"] += len(result.cycle_breaks)
    print(totals, f"{time.perf_counter() - start:.2f} s")
    assert totals["packages"] >= 20 and totals["edges"] > 500
    assert totals["back_edges"] / totals["edges"] < 0.05
