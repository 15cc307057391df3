# CUDA runtime image with dynavit installed: `docker build -t dynavit .`
# then e.g. `docker run --gpus all -v /data:/data dynavit dynatrain --shards /data/imagenet-dyna --k 70`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dynavit
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY requirements requirements
# the exact versions (and hashes) the tests ran with; then dynavit itself, without resolving again
RUN pip install -r requirements/lock.txt
COPY pipeline pipeline
COPY trainer trainer
COPY manifests manifests
RUN pip install --no-deps ".[viz]"

# Numba compiles the saliency kernels on first use and caches them next to the package.
RUN python -c "import numpy as np; from dynavit.pipeline.saliency import score_patches; \
[score_patches(np.zeros((1,32,32,3),np.uint8),16,s) for s in ('l2','sobel','entropy')]"
CMD ["dynaprep", "--help"]
