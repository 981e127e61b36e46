# One image for every stage: the command picks it (`millimetric gateway|processor|sink`).
# Build: docker build -t millimetric-ingest .    Lint: hadolint Dockerfile (tests/test_deploy.py)

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/millimetric
WORKDIR /src
# Dependencies first, in their own layer: a code change does not reinstall them. No extra: the
# image runs against a ClickHouse server and Kafka, without dev's embedded services (chdb, Tansu).
COPY pyproject.toml ./
RUN mkdir millimetric millimetric_app ingest gateway processors sinks \
    && /opt/millimetric/bin/pip install --no-compile . \
    && /opt/millimetric/bin/pip uninstall -y millimetric-ingest
COPY millimetric millimetric
COPY millimetric_app millimetric_app
COPY ingest ingest
COPY gateway gateway
COPY processors processors
COPY sinks sinks
RUN /opt/millimetric/bin/pip install --no-deps --no-compile . \
    && /opt/millimetric/bin/python -m compileall -q /opt/millimetric/lib

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 millimetric \
    && useradd --system --uid 10001 --gid millimetric --home-dir /var/lib/millimetric \
       --create-home --shell /usr/sbin/nologin millimetric
COPY --from=build /opt/millimetric /opt/millimetric
# The gateway listens on every interface in a container; data_dir would hold only what the
# embedded services keep (the dev extra, not installed here).
ENV PATH=/opt/millimetric/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MILLIMETRIC_GATEWAY_HOST=0.0.0.0 \
    MILLIMETRIC_DATA_DIR=/var/lib/millimetric
USER 10001:10001
WORKDIR /var/lib/millimetric
EXPOSE 8787
ENTRYPOINT ["millimetric"]
CMD ["gateway"]
