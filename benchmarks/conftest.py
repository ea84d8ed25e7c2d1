"""Stream every benchmark's result as a JSON line while the suite runs (``$MASKDM_BENCH_JSONL``), so a run cut
off by a time limit still leaves each finished row: pytest-benchmark writes its own JSON only at the end."""

from __future__ import annotations

import os

import pytest

from .summarize import JSONL_ENV, append_jsonl


@pytest.fixture(autouse=True)
def _stream_result(request):
    stream = bool(os.environ.get(JSONL_ENV)) and "benchmark" in request.fixturenames
    bm = request.getfixturevalue("benchmark") if stream else None  # the test's own fixture, taken before teardown
    yield
    stats = getattr(getattr(bm, "stats", None), "stats", None)
    if stats is None:  # not streaming, or skipped / failed before timing
        return
    append_jsonl({"name": request.node.name, "file": request.node.path.name, "group": bm.group,
                  "median_s": stats.median, "rounds": stats.rounds, **bm.extra_info})
