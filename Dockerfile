# One image for every role: tracker, publisher, peer (swarm fetch), and the demo.
FROM python:3.11-slim
WORKDIR /opt/swarm
COPY pyproject.toml README.md ./
COPY swarm ./swarm
COPY tracker ./tracker
COPY seeder ./seeder
COPY cli ./cli
COPY simulations ./simulations
RUN pip install --no-cache-dir . && useradd --create-home swarm
USER swarm
ENTRYPOINT ["swarm"]
CMD ["--help"]
