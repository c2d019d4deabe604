# The kit in one image: the lessons' LocalCluster runs its real processes inside the container.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server default-jre-headless zookeeper libslf4j-java \
        libfaketime make procps \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /labkit
COPY pyproject.toml README.md ./
COPY labkit ./labkit
RUN pip install --no-cache-dir -e '.[dev]' flower
COPY . .
EXPOSE 8888
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--no-browser", "--allow-root", "--notebook-dir=notebooks"]
