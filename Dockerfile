# One image for the web server and the workers.
#   docker build -t mistudio .
#   docker run -p 8000:8000 -e REDIS_URL=… -e DATABASE_URL=… -v data:/data mistudio          # web
#   docker run --gpus all -e REDIS_URL=… -e DATABASE_URL=… -v data:/data mistudio worker     # worker
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MISTUDIO_DATA_DIR=/data \
    ALLOWED_HOSTS=* \
    DISABLE_CUDA=1

WORKDIR /app
COPY requirements.txt .
# PyPI's torch wheel carries CUDA, which the GPU workers want.
RUN pip install -r requirements.txt
COPY . .
RUN mkdir -p /data
VOLUME /data
EXPOSE 8000

ENTRYPOINT ["scripts/docker-entrypoint"]
CMD ["web"]
