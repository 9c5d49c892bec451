"""cntk_gram.pipeline: config, data, plan, store, scheduling, solve, report and CLI (docs/ARCHITECTURE.md)."""
# One importable name per module: never a second copy of this package under the folder's bare name.
if __name__ != "cntk_gram.pipeline":
    raise ImportError(f"the folder pipeline/ is the package cntk_gram.pipeline and cannot be imported as {__name__!r}: "
                      "install the package (pip install -e . in the repository root) and import cntk_gram.pipeline")
