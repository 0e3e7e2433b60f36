# The cachemesh image: the node (`cachemesh serve`) and the operator
# (`python -m cachemesh.operator`), as the Helm chart runs them.
#
#   docker build -t cachemesh/cachemesh:0.1.0 .
#
# constraints.txt pins torch's version; TORCH_INDEX_URL is where pip finds its build. The
# default is PyTorch's CPU index (an image of about 1 GB); for GPU nodes build with
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126, which brings the
# CUDA libraries (several GB). An empty value takes PyPI's default build (CUDA on x86_64).
# Extras: serve (HTTP, and gRPC with grpc.health.v1, which the chart's readiness probe
# calls: Kubernetes' own gRPC probe, no probe binary in the image), cluster (the nodes join
# etcd), operator (kopf), and the sources and runtimes.
FROM python:3.11-slim AS build
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN python -m venv /opt/cachemesh \
 && /opt/cachemesh/bin/pip install --upgrade pip \
 && /opt/cachemesh/bin/pip install -c constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        '.[s3,hf,load,serve,cluster,transformers,operator]'

FROM python:3.11-slim
# The server's user owns the store on the hostPath (the chart's init container hands a
# new one over); the image itself is read-only at run time.
RUN groupadd --gid 1000 cachemesh \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home cachemesh
COPY --from=build /opt/cachemesh /opt/cachemesh
ENV PATH=/opt/cachemesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    CACHEMESH_HOME=/var/lib/cachemesh \
    CACHEMESH_SERVE_HOST=0.0.0.0
USER 1000:1000
EXPOSE 8008 8033
ENTRYPOINT []
CMD ["cachemesh", "serve"]
