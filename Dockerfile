# One image for every role a cluster runs: the tracker, the node agent, publishing,
# and swarm fetch in an init container. It carries no demo S3 server (`swarm[demo]`).
FROM python:3.11-slim
WORKDIR /opt/swarm
COPY pyproject.toml README.md ./
COPY core ./core
COPY swarm ./swarm
COPY tracker ./tracker
COPY seeder ./seeder
COPY cli ./cli
COPY simulations ./simulations
# Compiled at install, so no process compiles modules at start-up (an init container
# starts one per pod). /models: where the compose peers write, owned by the user.
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --create-home swarm \
    && mkdir -p /models && chown 10001:10001 /models
USER 10001
# swarm stops cleanly on SIGTERM (exit 143 for a fetch, 0 for a service).
STOPSIGNAL SIGTERM
ENTRYPOINT ["swarm"]
CMD ["--help"]
