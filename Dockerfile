FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
RUN pip install --no-cache-dir .
EXPOSE 8080
USER nobody
CMD ["tollway", "serve", "--config", "/app/config/tollway.yaml", "--host", "0.0.0.0", "--port", "8080"]
