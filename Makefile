# Every target runs inside .venv, created on first use from the lock (requirements/lock.txt:
# exact versions and hashes of everything, made by `uv pip compile`; `make lock` refreshes it).
# uv is pinned and installed into the venv by pip; it resolves from the registry only, so a local
# CPU-only torch wheel (find-links in pip.conf) cannot break torchvision's ops, which timm imports.
# --compile-bytecode: uv installs no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set none
# is ever cached, so every process compiled torch, torchvision (which imports torch._dynamo) and timm
# from source: ~10 s of CPU per process, paid by each torchrun worker (test_multinode: 115 -> 52 s CPU).
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

.PHONY: venv test test-latest test-lowest lock demo compare-demo figures bench bench-kernels bench-gpu clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(BIN)/pip install --quiet "$(UV)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r $(LOCK)
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
	.venv-latest/bin/uv pip install --quiet --compile-bytecode --python .venv-latest/bin/python --upgrade -e ".[dev]"
	.venv-latest/bin/python -c "import torch, timm; print('test-latest: torch', torch.__version__, 'timm', timm.__version__)"
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# The lower bounds pyproject.toml states for torch and timm (with the torchvision of that torch).
test-lowest:
	rm -rf .venv-lowest
	$(PYTHON) -m venv .venv-lowest
	PIP_FIND_LINKS= .venv-lowest/bin/pip install --quiet "$(UV)"
	.venv-lowest/bin/uv pip install --quiet --compile-bytecode --python .venv-lowest/bin/python -e ".[dev]" \
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

# The paper's protocol on real photos (docs/photo_folder.py: a class-sorted ImageFolder of
# scikit-image's sample photos, 10 classes): train dense once, fine-tune every method from its
# best.pt at the same compute (K = 50) for each of SEEDS, then one table: mean +- std over seeds.
# The model (8 blocks of width 128, 4 heads, at 128 px) is one where every method reaches K = 50
# (`dynatrain flops --method all`: all within 1 % of Dyna-ViT's MACs; on 6 blocks EViT cannot).
CMP         ?= out/compare-demo
SEEDS       ?= 1 2 3
CMP_METHODS ?= dynavit tome evit dynamicvit tnt cropr
CMP_DATA    ?= --n-train 1500 --n-val 500 --size 128
CMP_MODEL    = --model vit_tiny_patch16_224 --model-kwargs '{"depth": 8, "embed_dim": 128, "num_heads": 4}' --batch-size 32 --workers 2
CMP_DENSE   ?= --epochs 5 --lr 2e-3 --sched cosine --warmup-epochs 1 --seed 0
CMP_FT      ?= --epochs 3 --lr 5e-4 --sched cosine --warmup-epochs 1
CMP_TIMING  ?=
compare-demo: $(STAMP)
	rm -rf $(CMP)
	$(BIN)/python docs/photo_folder.py $(CMP)/photos $(CMP_DATA)
	$(BIN)/dynaprep index --data imagefolder --src $(CMP)/photos --image-size 128 --k 50 \
		--shard-size 250 --out $(CMP)/data
	$(BIN)/dynatrain --shards $(CMP)/data --out $(CMP)/runs/dense --k 100 $(CMP_MODEL) $(CMP_DENSE)
	for m in $(CMP_METHODS); do for s in $(SEEDS); do \
		$(BIN)/dynatrain --shards $(CMP)/data --out $(CMP)/runs/$$m-s$$s --k 50 --method $$m \
			--checkpoint $(CMP)/runs/dense/best.pt --seed $$s $(CMP_MODEL) $(CMP_FT) || exit 1; \
	done; done
	$(BIN)/dynatrain compare $(CMP)/runs/dense $(foreach m,$(CMP_METHODS),$(foreach s,$(SEEDS),$(CMP)/runs/$(m)-s$(s))) \
		--out $(FIGS)/compare $(CMP_TIMING)

figures:
	$(MAKE) demo compare-demo FIGS=docs/demo

bench-kernels: $(STAMP)
	$(BIN)/python -m dynavit.pipeline.bench.kernels

bench: $(STAMP)
	$(BIN)/dynatrain bench-report --out docs/BENCHMARKS.md
	@echo "loader start vs sample count (docs/BENCHMARKS.md, 'Loader start against sample count'):"
	$(BIN)/python -m dynavit.trainer.bench.start
	@echo "streaming vs random access (docs/BENCHMARKS.md, 'Streaming against random access'):"
	$(BIN)/python -m dynavit.trainer.bench.stream

# One command for a lent GPU (issue 25): index BENCH_GPU_N demo images at 224 px, then `dynatrain bench`
# (train step, inference, loader-fed steps) and `dynatrain bench-compare` (the six methods at matched
# exact MACs) on ViT-B/16 bf16 at K=100/70/50/25; writes docs/BENCHMARKS.md's GPU section. Under 8 min
# on one H100 by design (never run on one yet). A dry run of the plumbing on CPU with a tiny model:
#   make bench-gpu BENCH_GPU_DEVICE=cpu BENCH_GPU_MODEL_KWARGS='{"depth": 4}' BENCH_GPU_N=256 \
#       BENCH_GPU_SIZE=64 BENCH_GPU_BATCH=8 BENCH_GPU_STEPS=2 BENCH_GPU_REPEATS=1 BENCH_GPU_DOC=out/bench-gpu/dry.md
BENCH_GPU_DEVICE       ?= cuda
BENCH_GPU_AMP          ?= bf16
BENCH_GPU_MODEL        ?= vit_base_patch16_224
BENCH_GPU_MODEL_KWARGS ?= {}
BENCH_GPU_N            ?= 4000
BENCH_GPU_SIZE         ?= 224
BENCH_GPU_K            ?= 100,70,50,25
BENCH_GPU_BATCH        ?= 128
BENCH_GPU_STEPS        ?= 10
BENCH_GPU_REPEATS      ?= 3
BENCH_GPU_OUT          ?= out/bench-gpu
BENCH_GPU_DOC          ?= docs/BENCHMARKS.md
bench-gpu: $(STAMP)
	$(BIN)/python -m dynavit.trainer.bench.gpu --device $(BENCH_GPU_DEVICE) --amp $(BENCH_GPU_AMP) \
		--model $(BENCH_GPU_MODEL) --model-kwargs '$(BENCH_GPU_MODEL_KWARGS)' --n $(BENCH_GPU_N) \
		--image-size $(BENCH_GPU_SIZE) --k $(BENCH_GPU_K) --batch-size $(BENCH_GPU_BATCH) --steps $(BENCH_GPU_STEPS) \
		--repeats $(BENCH_GPU_REPEATS) --out $(BENCH_GPU_OUT) --doc $(BENCH_GPU_DOC)

clean:
	rm -rf out .pytest_cache
