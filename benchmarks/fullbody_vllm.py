"""tests/fakevllm.py serving benchmarks/vllm_parse.py's full-size vLLM body instead of the tests'
abridged one; same command line (`... vllm serve MODEL --port PORT ...`), so discovery finds it.
Used by `node_cost.py --full-bodies` and `floor.py --full-bodies`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "agent")]

from benchmarks.vllm_parse import full_size_body  # noqa: E402
from tests import fakevllm  # noqa: E402

_init = fakevllm.FakeVllm.__init__


def _full_size(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    self.template = full_size_body(template=True)


fakevllm.FakeVllm.__init__ = _full_size

if __name__ == "__main__":
    fakevllm.main(sys.argv[1:])
