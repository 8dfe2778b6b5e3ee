# llamatron on NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, Transformer Engine and a torch built for
# them): the image for `llamatron launch` with launch.container_image (pyxis/enroot), or any Docker host.
#
#   docker build -t llamatron .
#   enroot import -o llamatron.sqsh dockerd://llamatron    # then launch.container_image = "/shared/llamatron.sqsh"
#
# A newer NGC release works the same (--build-arg BASE=...); it needs a torch >= 2.6 (25.03 and later).
ARG BASE=nvcr.io/nvidia/pytorch:25.06-py3
FROM ${BASE}

WORKDIR /opt/llamatron
COPY pyproject.toml README.md ./
COPY llamatron ./llamatron
# The image's torch stays: a constraint pins the installed build so that resolving llamatron's
# dependencies can never replace it with a CPU or differently built wheel from PyPI.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /opt/llamatron/keep-torch.txt \
 && PIP_CONSTRAINT="/opt/llamatron/keep-torch.txt ${PIP_CONSTRAINT:-}" pip install --no-cache-dir . \
 && python -m llamatron flops --model llama3.1-8b > /dev/null \
 && python -c "import torch, llamatron; print('llamatron', llamatron.__version__, 'on torch', torch.__version__)"

WORKDIR /workspace
