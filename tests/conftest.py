import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `models` (zoo, shipped data) and `tests.helpers` are imported from the repo root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
