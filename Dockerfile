# syntax=docker/dockerfile:1
#
# loraserve images. Two targets:
#   docker build -t loraserve .                 # default: `cuda` (NVIDIA CUDA 12 + cuDNN 9, falls back to CPU)
#   docker build -t loraserve:cpu --target cpu . # CPU only, smaller
#   docker run --gpus all -p 8080:8080 -v $PWD/models:/models -e MODEL_PATH=/models/my-llama loraserve
# With MODEL_PATH unset the service writes and serves its small embedded default model.
#
# scripts/container-smoke.sh replays the `build` stage's COPY/ENV/RUN steps and the final CMD and
# HEALTHCHECK on a machine without a Docker engine (test/container-smoke.test.ts runs it), so keep
# every build-stage step a plain COPY from the context, ENV or RUN.

# Node 24 LTS: Node 20 reached its end of life in April 2026 (the test suite runs on both; README)
ARG NODE_IMAGE=node:24.21.0-bookworm-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS build
WORKDIR /app
# The repo's .npmrc says onnxruntime-node-install=skip so that offline machines can `npm ci`;
# the environment variable wins over it (onnxruntime-node's script/install-utils.js reads
# ONNXRUNTIME_NODE_INSTALL first), so here the CUDA 12 execution provider
# (libonnxruntime_providers_cuda.so, libonnxruntime_providers_shared.so) is fetched from NuGet
# into node_modules/onnxruntime-node/bin/napi-v6/linux/x64/. The CUDA runtime and cuDNN it needs
# come from the runtime image. On arm64 there is no CUDA provider to fetch and the flag is a no-op.
ENV ONNXRUNTIME_NODE_INSTALL=true
ENV NODE_ENV=development
COPY package.json package-lock.json .npmrc ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json openapi.yaml ./
COPY bin ./bin
COPY src ./src
COPY routes ./routes
# type gate: the image is never built from sources that do not compile
RUN npm run build
# bin/loraserve.js runs the sources through tsx, which is a runtime dependency and survives this
RUN npm prune --omit=dev --no-audit --no-fund

# ---------------------------------------------------------------------------------------------
# the official Node binary, copied into the CUDA image below (it needs only glibc and libstdc++)
FROM ${NODE_IMAGE} AS node

# ---------------------------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS cpu
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8080 \
    DEVICE=cpu \
    ADAPTER_DIR=/data/adapters \
    DEFAULT_MODEL_DIR=/data/default-model \
    CACHE_DIR=/data/cache
WORKDIR /app
RUN groupadd --system --gid 10001 loraserve \
 && useradd --system --uid 10001 --gid loraserve --home-dir /app --shell /usr/sbin/nologin loraserve \
 && mkdir -p /models /data/adapters /data/default-model /data/cache \
 && chown -R loraserve:loraserve /models /data
COPY --from=build --chown=root:root /app/package.json /app/package-lock.json /app/openapi.yaml ./
COPY --from=build --chown=root:root /app/node_modules ./node_modules
COPY --from=build --chown=root:root /app/bin ./bin
COPY --from=build --chown=root:root /app/src ./src
COPY --from=build --chown=root:root /app/routes ./routes
USER loraserve
VOLUME ["/models", "/data/adapters", "/data/cache"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.PORT||8080)+'/readyz').then(r=>process.exit(r.status===200?0:1),()=>process.exit(1))"]
STOPSIGNAL SIGTERM
CMD ["node", "bin/loraserve.js", "serve"]

# ---------------------------------------------------------------------------------------------
# default target (last stage)
FROM ${CUDA_IMAGE} AS cuda
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8080 \
    DEVICE=auto \
    ADAPTER_DIR=/data/adapters \
    DEFAULT_MODEL_DIR=/data/default-model \
    CACHE_DIR=/data/cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=node /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
RUN groupadd --system --gid 10001 loraserve \
 && useradd --system --uid 10001 --gid loraserve --home-dir /app --shell /usr/sbin/nologin loraserve \
 && mkdir -p /models /data/adapters /data/default-model /data/cache \
 && chown -R loraserve:loraserve /models /data \
 && node --version
COPY --from=build --chown=root:root /app/package.json /app/package-lock.json /app/openapi.yaml ./
COPY --from=build --chown=root:root /app/node_modules ./node_modules
COPY --from=build --chown=root:root /app/bin ./bin
COPY --from=build --chown=root:root /app/src ./src
COPY --from=build --chown=root:root /app/routes ./routes
USER loraserve
VOLUME ["/models", "/data/adapters", "/data/cache"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.PORT||8080)+'/readyz').then(r=>process.exit(r.status===200?0:1),()=>process.exit(1))"]
STOPSIGNAL SIGTERM
CMD ["node", "bin/loraserve.js", "serve"]
