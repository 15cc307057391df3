# Every target runs inside .venv, created on first use from the lock (requirements/lock.txt:
# exact versions and hashes of everything, made by `uv pip compile`; `make lock` refreshes it).
# uv is pinned and installed into the venv by pip; it resolves from the registry only, so a local
# CPU-only torch wheel (find-links in pip.conf) cannot break torchvision's ops, which timm imports.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements/lock.txt
UV     := uv==0.13.9
DEMO   ?= out/demo
# make demo writes only under out/; `make figures` refreshes the README's pictures in docs/demo on purpose.
FIGS   ?= $(DEMO)/figures
# A 6-block ViT-Ti at 128 px (8x8 = 64 patches) learns the demo in a few CPU epochs.
DEMO_TRAIN = --model vit_tiny_patch16_224 --model-kwargs '{"depth": 6}' --epochs 5 --batch-size 32 \
             --lr 2e-3 --sched cosine --warmup-epochs 1 --workers 2 --seed 42

.PHONY: venv test test-latest test-lowest lock demo compare-demo figures bench bench-kernels clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(BIN)/pip install --quiet "$(UV)"
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# The newest versions pyproject.toml allows, for Linux, macOS and Windows, Python >= 3.11.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(BIN)/pip install --quiet "$(UV)"
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra viz --extra bench --universal --python-version 3.11 \
		--generate-hashes --upgrade --custom-compile-command "make lock" -o $(LOCK)

# Without the lock: what `pip install -e ".[dev]"` resolves today, in a fresh venv of its own.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	PIP_FIND_LINKS= .venv-latest/bin/pip install --quiet "$(UV)"
	.venv-latest/bin/uv pip install --quiet --python .venv-latest/bin/python --upgrade -e ".[dev]"
	.venv-latest/bin/python -c "import torch, timm; print('test-latest: torch', torch.__version__, 'timm', timm.__version__)"
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The lower bounds pyproject.toml states for torch and timm (with the torchvision of that torch).
test-lowest:
	rm -rf .venv-lowest
	$(PYTHON) -m venv .venv-lowest
	PIP_FIND_LINKS= .venv-lowest/bin/pip install --quiet "$(UV)"
	.venv-lowest/bin/uv pip install --quiet --python .venv-lowest/bin/python -e ".[dev]" \
		"torch==2.14.1" "torchvision==0.29.1" "timm==1.0.25"
	.venv-lowest/bin/python -c "import torch, timm; print('test-lowest: torch', torch.__version__, 'timm', timm.__version__)"
	.venv-lowest/bin/python -m pytest -q -p no:cacheprovider

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The whole product on generated data: index (3 scorers, K=50,25), verify, look at the
# selections, train dense / K=50 / K=25 / K=25-random, and report the sweep. ~8 min on 2 cores.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/dynaprep index --data demo -o n_train=1500 -o n_val=500 --image-size 128 --k 50,25 \
		--scorer l2,sobel,entropy --shard-size 250 --out $(DEMO)/data
	$(BIN)/dynaprep verify $(DEMO)/data
	$(BIN)/dynaprep show $(DEMO)/data --split val --n 4 --k 50,25 --seed 1 --out $(FIGS)/show.png
	$(BIN)/dynatrain --shards $(DEMO)/data --out $(DEMO)/runs/dense --k 100 $(DEMO_TRAIN)
	$(BIN)/dynatrain --shards $(DEMO)/data --out $(DEMO)/runs/k50 --k 50 $(DEMO_TRAIN)
	$(BIN)/dynatrain --shards $(DEMO)/data --out $(DEMO)/runs/k25 --k 25 $(DEMO_TRAIN)
	$(BIN)/dynatrain --shards $(DEMO)/data --out $(DEMO)/runs/k25-random --k 25 --select random $(DEMO_TRAIN)
	$(BIN)/dynatrain report $(DEMO)/runs/dense $(DEMO)/runs/k50 $(DEMO)/runs/k25 $(DEMO)/runs/k25-random --out $(FIGS)
	@echo "demo done: data in $(DEMO), figures and the K-sweep table in $(FIGS)/ (sweep.md)"

# Every method at the same compute (K = 50) on the demo data, and the comparison table.
compare-demo: $(STAMP)
	test -f $(DEMO)/data/dataset.json || $(MAKE) demo
	for m in dynavit tome evit dynamicvit tnt cropr; do \
		$(BIN)/dynatrain --shards $(DEMO)/data --out $(DEMO)/cmp/$$m --overwrite --k 50 --method $$m $(DEMO_TRAIN) || exit 1; \
	done
	$(BIN)/dynatrain compare $(foreach m,dynavit tome evit dynamicvit tnt cropr,$(DEMO)/cmp/$(m)) --out $(FIGS)/compare

figures:
	$(MAKE) demo compare-demo FIGS=docs/demo

bench-kernels: $(STAMP)
	$(BIN)/python -m dynavit.pipeline.bench_kernels

bench: $(STAMP)
	$(BIN)/dynatrain bench-report --out docs/BENCHMARKS.md
	@echo "loader start vs sample count (docs/BENCHMARKS.md, 'Loader start against sample count'):"
	$(BIN)/python -m dynavit.trainer.bench_start

clean:
	rm -rf out .pytest_cache
