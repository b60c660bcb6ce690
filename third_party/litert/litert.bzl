"""@litert: libLiteRt.so from the installed ai-edge-litert wheel.

The wheel (pinned in pyproject.toml) ships LiteRT's C API in libLiteRt.so and
no headers; native/litert/litert_c_api.h declares what the runtime uses, for
the release native/CMakeLists.txt names (SMTM_LITERT_VERSION). This rule
finds the wheel with `python3` from PATH (as native/CMakeLists.txt does),
refuses any other release, links the library in as `@litert//:litert`, and
writes its SHA-256 to `@litert//:defs.bzl` so the runtime checks at start-up
that it loads this very file.
"""

_FIND = """
import hashlib, importlib.metadata as m, os, ai_edge_litert as a
path = os.path.join(os.path.dirname(a.__file__), "libLiteRt.so")
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(m.version("ai-edge-litert"))
print(path)
print(digest)
"""

def _declared_version(ctx):
    cmake = ctx.read(ctx.path(Label("//native:CMakeLists.txt")))
    for line in cmake.splitlines():
        if line.startswith("set(SMTM_LITERT_VERSION "):
            return line.split('"')[1]
    fail("native/CMakeLists.txt does not set SMTM_LITERT_VERSION.")

def _litert_wheel_impl(ctx):
    want = _declared_version(ctx)
    python = ctx.which("python3")
    if not python:
        fail("python3 is not on PATH: @litert takes libLiteRt.so from its ai-edge-litert wheel.")
    found = ctx.execute([python, "-c", _FIND])
    if found.return_code != 0:
        fail("Cannot find the ai-edge-litert wheel with %s: pip install ai-edge-litert==%s\n%s" %
             (python, want, found.stderr))
    version, path, digest = found.stdout.strip().split("\n")
    if version != want:
        fail("ai-edge-litert %s is installed; the native runtime declares LiteRT %s's C API: " %
             (version, want) + "pip install ai-edge-litert==%s." % want)
    ctx.symlink(path, "libLiteRt.so")
    ctx.file("defs.bzl", "LITERT_VERSION = \"%s\"\nLITERT_SHA256 = \"%s\"\n" % (version, digest))
    ctx.file("BUILD", """
cc_import(
    name = "litert",
    shared_library = "libLiteRt.so",
    visibility = ["//visibility:public"],
)
""")

litert_wheel = repository_rule(
    implementation = _litert_wheel_impl,
    environ = ["PATH"],
    local = True,
)
