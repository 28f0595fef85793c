FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
RUN pip install --no-cache-dir . \
 && mkdir -p /app/data && chown nobody /app/data
# The embedded store lives in /app/data (mount a volume there); TOLLWAY_ADMIN_KEY and client keys
# come from the environment. For the semantic cache: pip install torch==2.13.0 '.[semantic]'.
VOLUME ["/app/data"]
EXPOSE 8080
USER nobody
CMD ["tollway", "serve", "--config", "/app/config/tollway.yaml", "--host", "0.0.0.0", "--port", "8080"]
