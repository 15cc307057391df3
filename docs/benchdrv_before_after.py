"""Side-by-side floor vs dynaprep for one code tree (PYTHONPATH picks the tree)."""
import json, sys
from pathlib import Path
from dynavit.pipeline.bench.index import make_jpegs, run_floor, run_dynaprep
import dynavit.pipeline.decode as d
if __name__ == '__main__':
    tag, mix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    work = Path("/tmp/benchwork")
    src = make_jpegs(work / f"src-{mix}", n, mix=mix)
    rows = []
    for w in (1, 2):
        run_floor(src, w, 250, 224, 16, "jpg", 95)
        floor = run_floor(src, w, 250, 224, 16, "jpg", 95)
        ours = run_dynaprep(src, work / f"out-{tag}", w, 250, 224, 16, "jpg", 95, [70, 50, 25], ["l2"])
        rows.append({"tree": tag, "mix": mix, "workers": w, "floor": round(floor, 1), "dynaprep": round(ours, 1), "ratio": round(ours / floor, 3)})
        print(json.dumps(rows[-1]), flush=True)
